r"""Losses of the replay methods that keep outputs or mask classes: DER / DER++ and ER-ACE.

**DER / DER++** (Buzzega, Boschini, Porrello, Abati & Calderara, NeurIPS 2020, *Dark Experience for
General Continual Learning: a Strong, Simple Baseline*). A buffer keeps, per sample, the model's
outputs :math:`z` at the time the sample was stored; replaying a draw :math:`b` of it matches them:

.. math:: \ell_{\mathrm{DER}} = \operatorname{MSE}\big(f_\theta(x_b), z_b\big)
    = \frac{1}{N} \sum_{\text{elements}} \big(f_\theta(x_b) - z_b\big)^2

:func:`logit_mse`: the **mean over every element** (batch, channels and locations); ``channels``
keeps some channels first, and the mean is over those. The paper writes the squared Euclidean
distance :math:`\lVert z - h_\theta(x)\rVert_2^2` (a sum over the C logits of a sample, averaged over
samples); its published code averages over every element, the reduction its α were tuned with, and
this is it: the paper's formula is C times this. DER++ adds
:math:`\beta\,\mathrm{CE}(f_\theta(x_{b'}), y_{b'})` on a second, independent draw, an ordinary
cross-entropy (:func:`torch.nn.functional.cross_entropy`).

**ER-ACE** (Caccia, Aljundi, Asadi, Tuytelaars, Pineau & Belilovsky, ICLR 2022, *New Insights on
Reducing Abrupt Representation Change in Online Continual Learning*): the incoming batch's
cross-entropy over the classes present in that batch only, the others masked out of the softmax:

.. math:: \ell_{\mathrm{ACE}} = -\frac{1}{|V|} \sum_{i \in V}
    \Big( z_{i, y_i} - \log \sum_{c \in S} e^{z_{i,c}} \Big)

with V the labels that are not ``ignore_index`` (every location of a dense output) and S the classes
present: by default the classes of the labels in V; given ``present``, those classes **together with
the labels' own** (a label's class is always in its softmax, else the loss would be infinite). The
replayed batch takes the plain cross-entropy over every class. :func:`asymmetric_cross_entropy`.

Every loss computes in float32 or wider (the wider of float32 and the inputs' dtype).

Example:
    >>> import torch
    >>> from clreg.functional.logit_replay import asymmetric_cross_entropy, logit_mse
    >>> z = torch.tensor([[1.0, 2.0, 3.0]])
    >>> logit_mse(z, torch.zeros(1, 3)).item()   # (1 + 4 + 9) / 3
    4.666666507720947
    >>> y = torch.tensor([2])
    >>> round(asymmetric_cross_entropy(z, y).item(), 6)   # class 2 alone in the softmax
    0.0
    >>> round(asymmetric_cross_entropy(z, y, present=[1]).item(), 4)   # classes {1, 2}
    0.3133
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .distillation import _pick

__all__ = ["asymmetric_cross_entropy", "compute_dtype", "logit_mse", "present_classes"]


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype a loss computes in: the wider of float32 and ``t``'s dtype."""
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


def _class_dim(x: Tensor, class_dim: int, what: str) -> int:
    if x.dim() < 2:
        raise ValueError(f"{what} must be batched with a class dimension, (B, C, ...); got shape {tuple(x.shape)}")
    d = class_dim % x.dim()
    if d == 0:
        raise ValueError(f"class_dim {class_dim} is the batch dimension of {what} of shape {tuple(x.shape)}")
    return d


def logit_mse(
    current: Tensor,
    stored: Tensor,
    *,
    channels: Sequence[int] | Tensor | None = None,
    class_dim: int = 1,
) -> Tensor:
    """DER's term: the mean over every element of ``(current - stored)²`` (``stored`` is a constant).

    Args:
        current: the model's output on the replayed inputs, ``(B, ...)``.
        stored: the outputs kept at insertion, the same shape.
        channels: keep these indices of dim ``class_dim`` of both first (``None``: all).
        class_dim: the dimension ``channels`` indexes (1, or -1 for token logits ``(B, L, V)``).
    """
    if current.shape != stored.shape:
        raise ValueError(
            f"DER: the model's output on the replayed inputs has shape {tuple(current.shape)}, the stored "
            f"outputs {tuple(stored.shape)}; the output must keep its shape from insertion to replay"
        )
    dtype = compute_dtype(current)
    if channels is not None:
        d = _class_dim(current, class_dim, "a DER output with channels")
        current, stored = _pick(current, channels, d), _pick(stored, channels, d)
    return (current.to(dtype) - stored.detach().to(dtype)).square().mean()


def present_classes(labels: Tensor, num_classes: int, ignore_index: int | None = -100) -> Tensor:
    """A boolean mask (``num_classes``,) of the classes that occur in ``labels`` (``ignore_index``
    left out), built without a host synchronisation."""
    flat = labels.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_classes)
    if ignore_index is not None:
        valid &= flat != ignore_index
    idx = torch.where(valid, flat, torch.full_like(flat, num_classes))
    mask = torch.zeros(num_classes + 1, dtype=torch.bool, device=labels.device)
    return mask.index_fill(0, idx, True)[:num_classes]


def _present_mask(present: Sequence[int] | Tensor, num_classes: int, device: torch.device) -> Tensor:
    """``present`` (class indices or a boolean mask) as a boolean mask ``(num_classes,)`` on ``device``;
    indices are checked against the range where they are on the CPU (a GPU tensor is not read back)."""
    p = present if isinstance(present, Tensor) else torch.as_tensor(list(present))
    if p.dtype == torch.bool:
        if p.shape != (num_classes,):
            raise ValueError(f"present as a mask must have shape ({num_classes},), got {tuple(p.shape)}")
        return p.to(device)
    p = p.reshape(-1)
    if p.numel() == 0:
        return torch.zeros(num_classes, dtype=torch.bool, device=device)
    if p.is_floating_point() or p.is_complex():
        raise ValueError(f"present must be class indices (ints) or a boolean mask, got {p.dtype}")
    if p.device.type == "cpu" and not bool(((p >= 0) & (p < num_classes)).all()):
        raise ValueError(f"present holds classes outside [0, {num_classes}): {p.tolist()}")
    p = p.to(device).long().clamp(0, num_classes - 1)
    return torch.zeros(num_classes, dtype=torch.bool, device=device).index_fill(0, p, True)


def asymmetric_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    present: Sequence[int] | Tensor | None = None,
    *,
    class_dim: int = 1,
    ignore_index: int = -100,
) -> Tensor:
    """ER-ACE's incoming-batch loss: the cross-entropy with the classes outside S masked out of the
    softmax, averaged over the labels that are not ``ignore_index`` (0 when there are none).

    Args:
        logits: ``(B, C)`` or ``(B, C, *locations)`` (classes on ``class_dim``).
        labels: the logits' shape without the class dimension, integer classes.
        present: the classes kept in the softmax, as indices or a boolean mask ``(C,)``; the labels'
            own classes are always kept. ``None``: the classes of ``labels`` alone (the paper's).
        class_dim: the dimension of the classes (1, or -1 for ``(B, L, V)``).
        ignore_index: a label that does not count.
    """
    d = _class_dim(logits, class_dim, "logits")
    z = logits.movedim(d, 1) if d != 1 else logits
    expected = z.shape[:1] + z.shape[2:]
    if labels.shape != expected:
        raise ValueError(
            f"asymmetric_cross_entropy: labels of shape {tuple(labels.shape)} for logits of shape "
            f"{tuple(logits.shape)} (classes on dim {d}); expected {tuple(expected)}"
        )
    n_classes = z.shape[1]
    keep = present_classes(labels, n_classes, ignore_index)
    if present is not None:
        keep = keep | _present_mask(present, n_classes, z.device)
    z = z.to(compute_dtype(z))
    shape = [1, n_classes] + [1] * (z.dim() - 2)
    masked = z.masked_fill(~keep.view(shape), torch.finfo(z.dtype).min)
    total = F.cross_entropy(masked, labels.long(), ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().clamp_min(1)
    return total / count
