r"""RWalk's running Fisher, path score and importance (Chaudhry, Dokania, Ajanthan & Torr, ECCV 2018,
"Riemannian Walk for Incremental Learning: Understanding Forgetting and Intransigence").

The training steps are cut into windows of k optimizer steps. With g_t the task loss's gradient at
step t and :math:`\Delta\theta_t = \theta_{t+1} - \theta_t`, a window W running from :math:`\theta_a`
to :math:`\theta_b` accumulates the first-order loss change along the path

.. math:: \omega_W = -\sum_{t \in W} g_t \, \Delta\theta_t ,

and at its last step t the EWC++ running Fisher takes that step's squared gradient,

.. math:: F \leftarrow \alpha\, g_t^2 + (1 - \alpha)\, F, \qquad \alpha \in (0, 1],

after which the window's score, the loss change over the KL distance the window walked (in the
Fisher's diagonal metric), is added, clamped at 0,

.. math::

    s \mathrel{+}= c \, \max\!\Big(\frac{\omega_W}{\tfrac12 F\,(\theta_b - \theta_a)^2 + \varepsilon},\, 0\Big),
    \qquad \varepsilon > 0,

with c the weight of the current task's scores (1 for the first task, ½ after: the score of task k
is the average ½ (s̄_{k−1} + s_k) of the older tasks' and its own). At a consolidation the
importance is

.. math:: \Omega = F + \bar s

(both ≥ 0, so Ω ≥ 0), and the penalty is λ Σ Ω (θ − θ*)², no ½, as in the paper. With ``normalize``
each term is first scaled to [0, 1] by its minimum and maximum over every element of every tensor,

.. math::

    \Omega = \frac{F - \min F}{\max F - \min F} + \frac{\bar s - \min \bar s}{\max \bar s - \min \bar s}

(a term whose range is 0 counts 0), as the authors' released code does, so that Ω ∈ [0, 2] and λ does
not depend on the scale of the loss or on ε. Everything else here is element-wise: sharded tensors
(FSDP2) are processed shard by shard, with no communication; the normalisation's minimum and maximum
are taken over every rank (one all-reduce of four numbers).

Example:
    >>> import torch
    >>> from clreg.functional.rwalk import fisher_ema_update_, rwalk_score_update_
    >>> fisher, score = [torch.zeros(1)], [torch.zeros(1)]
    >>> fisher_ema_update_(fisher, [torch.tensor([2.0])], alpha=0.5)   # 0.5 · 2²
    >>> rwalk_score_update_(score, [torch.tensor([3.0])], fisher, [torch.tensor([1.0])], eps=0.5)
    >>> fisher[0].item(), score[0].item()                              # 3 / (½ · 2 · 1² + 0.5)
    (2.0, 2.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .._sharding import local_all, shard_mesh

__all__ = ["fisher_ema_update_", "rwalk_importance_", "rwalk_score_update_"]


def fisher_ema_update_(fisher: Sequence[Tensor], grads: Sequence[Tensor], alpha: float) -> None:
    """F ← α g² + (1 − α) F in place (two fused passes), α ∈ (0, 1]; ``grads`` are cast to F's dtype."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    fisher = local_all(fisher)
    grads = [g if g.dtype == f.dtype else g.to(f.dtype) for g, f in zip(local_all(grads), fisher)]
    with torch.no_grad():
        torch._foreach_mul_(fisher, 1.0 - alpha)
        torch._foreach_addcmul_(fisher, grads, grads, value=alpha)


def rwalk_score_update_(
    score: Sequence[Tensor],
    omega: Sequence[Tensor],
    fisher: Sequence[Tensor],
    delta: Sequence[Tensor],
    eps: float,
    weight: float = 1.0,
) -> None:
    """s += weight · max(ω / (½ F Δ² + ε), 0) in place, Δ the window's displacement θ_b − θ_a."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    with torch.no_grad():
        for s, w, f, d in zip(local_all(score), local_all(omega), local_all(fisher), local_all(delta)):
            d = d.to(s.dtype)
            distance = f.to(s.dtype) * d * d * 0.5 + eps
            s.add_(w.to(s.dtype).div(distance).clamp_(min=0.0), alpha=weight)


def rwalk_importance_(
    importance: Sequence[Tensor], fisher: Sequence[Tensor], score: Sequence[Tensor], normalize: bool = False
) -> None:
    """Ω ← F + s in place; with ``normalize``, each of F and s min-max scaled to [0, 1] over all its
    elements first (over every rank when sharded; a term whose range is 0 counts 0)."""
    out = local_all(importance)
    with torch.no_grad():
        if not normalize:
            torch._foreach_copy_(out, local_all(fisher))
            torch._foreach_add_(out, local_all(score))
            return
        (f_lo, f_span), (s_lo, s_span) = _min_and_span([fisher, score])
        f_scale, s_scale = (1.0 / span if span > 0 else 0.0 for span in (f_span, s_span))
        torch._foreach_copy_(out, local_all(fisher))
        torch._foreach_sub_(out, f_lo)
        torch._foreach_mul_(out, f_scale)  # exactly 0 at F's minimum
        torch._foreach_add_(out, local_all(score), alpha=s_scale)
        torch._foreach_sub_(out, s_lo * s_scale)
        torch._foreach_clamp_min_(out, 0.0)  # rounding at s's minimum


def _min_and_span(groups: Sequence[Sequence[Tensor]]) -> list[tuple[float, float]]:
    """(minimum, maximum − minimum) over every element of each group of tensors, over every rank of a
    sharded group's mesh (one all-reduce for all groups); a rank whose shards are empty adds nothing."""
    first = groups[0][0]
    bounds = torch.full((len(groups), 2), -torch.inf, dtype=torch.float64, device=first.device)
    for g, tensors in enumerate(groups):
        for t in local_all(tensors):
            if t.numel():
                lo, hi = torch.aminmax(t)
                bounds[g, 0] = torch.maximum(bounds[g, 0], -lo.double())
                bounds[g, 1] = torch.maximum(bounds[g, 1], hi.double())
    mesh = shard_mesh([t for tensors in groups for t in tensors])
    if mesh is not None:
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=mesh.get_group())
    return [(-lo, lo + hi) for lo, hi in bounds.tolist()]
