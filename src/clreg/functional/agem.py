r"""A-GEM's projection (Chaudhry, Ranzato, Rohrbach & Elhoseiny, ICLR 2019, *Efficient Lifelong
Learning with A-GEM*, eq. 11), as pure math over lists of tensors.

With g the gradient at hand and :math:`g_{ref}` the reference gradient (of the loss on a draw from the
memory of past tasks), A-GEM steps along

.. math::

    \tilde g = \begin{cases}
        g - \dfrac{g^\top g_{ref}}{g_{ref}^\top g_{ref}} \, g_{ref} & \text{if } g^\top g_{ref} < 0, \\
        g & \text{otherwise,}
    \end{cases}

the projection of g onto the half-space :math:`\{v : v^\top g_{ref} \ge 0\}`, so a step never increases
the memory's loss to first order. Conventions:

* a list of tensors is **one vector**: every dot product sums over every element of every tensor at
  once, never tensor by tensor;
* the dot products are computed in float32 or wider (float64 when any input is float64), whatever
  the gradients' dtype; the correction is cast to each gradient's dtype;
* :math:`g_{ref} = 0` (or :math:`g^\top g_{ref} \ge 0`) leaves g unchanged; so does a non-finite
  :math:`g^\top g_{ref}` or :math:`g_{ref}^\top g_{ref}` (nothing is divided by zero or by inf);
* after a projection :math:`\tilde g^\top g_{ref} = 0` (up to rounding) and
  :math:`\|\tilde g\|^2 = \|g\|^2 - (g^\top g_{ref})^2 / \|g_{ref}\|^2 \le \|g\|^2`.

The stateful side (the memory, the reference gradient, the optimizer hook, DDP) is
:class:`clreg.regularizers.agem.AGEM`.

Example:
    >>> import torch
    >>> from clreg.functional.agem import agem_project
    >>> g, ref = [torch.tensor([1.0, -2.0])], [torch.tensor([0.0, 1.0])]
    >>> agem_project(g, ref)[0]          # g·ref = -2 < 0: the ref component is removed
    tensor([1., 0.])
    >>> agem_project([torch.tensor([1.0, 2.0])], ref)[0]   # no conflict: unchanged
    tensor([1., 2.])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["agem_coefficient", "agem_dots", "agem_project", "agem_project_"]


def _check_pairs(grads: Sequence[Tensor], reference: Sequence[Tensor]) -> None:
    if len(grads) != len(reference):
        raise ValueError(f"expected as many reference tensors as gradients, got {len(reference)} and {len(grads)}")
    for i, (g, r) in enumerate(zip(grads, reference)):
        if g.shape != r.shape:
            raise ValueError(f"gradient {i} has shape {tuple(g.shape)} but its reference has {tuple(r.shape)}")


def _acc_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def agem_dots(grads: Sequence[Tensor], reference: Sequence[Tensor]) -> Tensor:
    r"""``tensor([g·g_ref, g_ref·g_ref])``, each summed over every element of every tensor, in float32 or
    wider (one pass over g, two over g_ref)."""
    _check_pairs(grads, reference)
    dtype = _acc_dtype([*grads, *reference])
    if not grads:
        return torch.zeros(2, dtype=dtype)
    with torch.no_grad():
        dot = torch.stack(
            [torch.dot(g.reshape(-1).to(dtype), r.reshape(-1).to(dtype)) for g, r in zip(grads, reference)]
        )
        ref_sq = torch.stack([torch.dot(r.reshape(-1).to(dtype), r.reshape(-1).to(dtype)) for r in reference])
        return torch.stack([dot.sum(), ref_sq.sum()])


def agem_coefficient(dot: float, ref_sq: float) -> float:
    r"""The factor c of the projection :math:`\tilde g = g - c\, g_{ref}`: :math:`g^\top g_{ref} / g_{ref}^\top
    g_{ref}` when :math:`g^\top g_{ref} < 0`, else 0 (also 0 when either number is not finite or
    :math:`g_{ref} = 0`)."""
    dot, ref_sq = float(dot), float(ref_sq)
    if not (math.isfinite(dot) and math.isfinite(ref_sq)) or ref_sq <= 0.0 or dot >= 0.0:
        return 0.0
    return dot / ref_sq


def agem_project_(grads: Sequence[Tensor], reference: Sequence[Tensor], coefficient: float) -> None:
    r""":math:`g \leftarrow g - c\, g_{ref}` in place (``coefficient`` from :func:`agem_coefficient`; 0 does
    nothing)."""
    _check_pairs(grads, reference)
    if coefficient == 0.0 or not grads:
        return
    with torch.no_grad():
        refs = [r if r.dtype == g.dtype else r.to(g.dtype) for g, r in zip(grads, reference)]
        torch._foreach_add_(list(grads), refs, alpha=-coefficient)


def agem_project(grads: Sequence[Tensor], reference: Sequence[Tensor]) -> list[Tensor]:
    r"""The projected gradient :math:`\tilde g` (new tensors; the inputs are not changed)."""
    dot, ref_sq = agem_dots(grads, reference).tolist()
    out = [g.detach().clone() for g in grads]
    agem_project_(out, reference, agem_coefficient(dot, ref_sq))
    return out
