r"""EWC's collapse of many past tasks into one quadratic (Kirkpatrick et al., 2017).

The EWC penalty over tasks t with importances F_t, anchors θ*_t and weights w_t,

.. math::

    \frac{\lambda}{2} \sum_t w_t \sum_i F_{t,i} (\theta_i - \theta^*_{t,i})^2
    = \frac{\lambda}{2} \sum_i \left[ A_i (\theta_i - m_i)^2 + C_i \right],

with :math:`A = \sum_t w_t F_t`, :math:`m = \sum_t w_t F_t \theta^*_t / A` and
:math:`C = \sum_t w_t F_t (\theta^*_t - m)^2`: O(P) whatever the number of tasks, the same gradient
and the exact value. A task (B = w F, anchor a) is added stably by

.. math::

    C \mathrel{+}= \frac{A B}{A + B} (m - a)^2, \quad m \mathrel{+}= \frac{B}{A + B}(a - m),
    \quad A \mathrel{+}= B,

and where A + B = 0, m = a and nothing is added. Only ΣC is kept (a scalar), as the penalty needs
no more.

Example:
    >>> import torch
    >>> from clreg.functional import ewc_merge_
    >>> A, m = [torch.tensor([1.0])], [torch.tensor([0.0])]
    >>> C = ewc_merge_(A, m, torch.tensor(0.0, dtype=torch.float64), [torch.tensor([1.0])], [torch.tensor([2.0])])
    >>> A[0].item(), m[0].item(), C.item()
    (2.0, 1.0, 2.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._sharding import local_all, shard_mesh, sum_over_mesh

__all__ = ["ewc_merge_"]


def ewc_merge_(
    importance: Sequence[Tensor],
    center: Sequence[Tensor],
    offset: Tensor,
    new_importance: Sequence[Tensor],
    new_anchor: Sequence[Tensor],
) -> Tensor:
    """Fold one task (weighted importance B, anchor a) into (A, m) in place; returns ΣC updated.

    Sharded tensors (FSDP2) are folded shard by shard; ΣC is then the sum over ranks of the shards'
    terms, the same on every rank."""
    mesh = shard_mesh(importance)
    if mesh is not None:
        importance, center = local_all(importance), local_all(center)
        new_importance, new_anchor = local_all(new_importance), local_all(new_anchor)
    total = offset.clone() if mesh is None else torch.zeros_like(offset)
    with torch.no_grad():
        for a_, m_, b_, anc in zip(importance, center, new_importance, new_anchor):
            b = b_.to(a_.dtype)
            anc = anc.to(m_.dtype)
            s = a_ + b
            pos = s > 0
            ratio = torch.where(pos, b / torch.where(pos, s, torch.ones_like(s)), torch.zeros_like(s))  # B/(A+B)
            # A·B/(A+B) = A·ratio: no product of two importances, so nothing overflows
            term = a_.to(total.dtype) * ratio.to(total.dtype) * (m_ - anc).to(total.dtype).square()
            total += term.sum()
            m_.copy_(torch.where(pos, m_ + ratio * (anc - m_), anc))
            a_.copy_(s)
    return total if mesh is None else offset + sum_over_mesh(total, mesh)
