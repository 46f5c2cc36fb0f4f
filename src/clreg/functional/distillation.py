r"""Distillation losses for Learning without Forgetting (Li & Hoiem, 2016; T² from Hinton et al., 2015).

Outputs are (B, C, *locations) with channels on dim 1 (or (B, C)). Every loss is **summed over
channels and averaged over locations and batch**; ``channels`` picks the old task's channels first.

* softmax, at temperature T > 0, with q = softmax(teacher / T), p = softmax(student / T):

  .. math:: \ell = T^2 \, \mathrm{KL}(q \,\|\, p) = T^2 \sum_c q_c (\log q_c - \log p_c)

  (KL rather than cross-entropy: 0 when the student equals the teacher, same gradient.)
* sigmoid (T = 1, no T²), per channel, with q = σ(teacher), p = σ(student):

  .. math:: \ell = \sum_c q_c \log\frac{q_c}{p_c} + (1 - q_c)\log\frac{1 - q_c}{1 - p_c}

* regression: :math:`\ell = \sum_c (s_c - t_c)^2` (or :math:`|s_c - t_c|`), and with a per-location
  weight w (e.g. the teacher's objectness) the mean becomes :math:`\sum w \ell / \max(\sum w, \epsilon)`.

Example:
    >>> import torch
    >>> from clreg.functional import softmax_distillation
    >>> z = torch.randn(2, 5)
    >>> softmax_distillation(z, z).item()
    0.0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["regression_distillation", "sigmoid_distillation", "softmax_distillation"]


def _pick(x: Tensor, channels: Sequence[int] | Tensor | None, dim: int = 1) -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"distilled outputs must be (B, C, ...), got shape {tuple(x.shape)}")
    if channels is None:
        return x
    idx = torch.as_tensor(channels, device=x.device)
    if idx.dtype == torch.bool:
        idx = idx.nonzero().flatten()
    return x.index_select(dim, idx.long())


def _check(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher outputs differ in shape: {tuple(student.shape)} vs {tuple(teacher.shape)}"
        )


def _mean_locations(per_location: Tensor) -> Tensor:
    """per_location: (B, *locations) summed over channels already → the mean."""
    return per_location.mean()


def softmax_distillation(
    student: Tensor,
    teacher: Tensor,
    temperature: float = 2.0,
    *,
    channels: Sequence[int] | Tensor | None = None,
    t_squared: bool = True,
    class_dim: int = 1,
) -> Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)) over the classes (dim ``class_dim``: 1, or -1
    for token logits (B, L, V)), mean over batch and locations."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check(student, teacher)
    d = class_dim % student.dim()
    s = _pick(student, channels, d).float() / temperature
    t = _pick(teacher, channels, d).detach().float() / temperature
    log_q = F.log_softmax(t, dim=d)
    kl = (log_q.exp() * (log_q - F.log_softmax(s, dim=d))).sum(dim=d)
    loss = _mean_locations(kl)
    return loss * temperature**2 if t_squared else loss


def sigmoid_distillation(student: Tensor, teacher: Tensor, *, channels: Sequence[int] | Tensor | None = None) -> Tensor:
    """Binary KL(σ(teacher) ‖ σ(student)) per channel, summed over channels, mean over the rest."""
    _check(student, teacher)
    s = _pick(student, channels).float()
    t = _pick(teacher, channels).detach().float()
    q = torch.sigmoid(t)
    log_q, log_1mq = F.logsigmoid(t), F.logsigmoid(-t)
    kl = q * (log_q - F.logsigmoid(s)) + (1 - q) * (log_1mq - F.logsigmoid(-s))
    return _mean_locations(kl.sum(dim=1))


def regression_distillation(
    student: Tensor,
    teacher: Tensor,
    *,
    weight: Tensor | None = None,
    channels: Sequence[int] | Tensor | None = None,
    norm: str = "l2",
    eps: float = 1e-8,
) -> Tensor:
    """Σ_c (s − t)² (or abs(s − t)) per location; mean over locations, or Σ wℓ / max(Σw, ε)."""
    _check(student, teacher)
    if norm not in ("l2", "l1"):
        raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")
    diff = _pick(student, channels).float() - _pick(teacher, channels).detach().float()
    per_loc = (diff.square() if norm == "l2" else diff.abs()).sum(dim=1)
    if weight is None:
        return _mean_locations(per_loc)
    w = weight.detach().float()
    if w.dim() == per_loc.dim() + 1 and w.shape[1] == 1:
        w = w.squeeze(1)
    try:
        w = w.expand_as(per_loc)
    except RuntimeError as err:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} does not fit locations of shape {tuple(per_loc.shape)}"
        ) from err
    if (w < 0).any():
        raise ValueError("distillation weights must be >= 0")
    return (w * per_loc).sum() / w.sum().clamp(min=eps)
