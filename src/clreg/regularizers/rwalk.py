r"""RWalk (Chaudhry, Dokania, Ajanthan & Torr, ECCV 2018, "Riemannian Walk for Incremental Learning:
Understanding Forgetting and Intransigence"): EWC++'s running Fisher plus a path score.

.. math:: P(\theta) = \lambda \sum_i (F_i + \bar s_i)\,(\theta_i - \theta^*_i)^2

(no ½, as in the paper's regularized loss), with F the EWC++ running Fisher and s̄ the path score,
both as they stood at the last consolidation, and θ* the parameters then. What is computed along the
optimizer's steps (:mod:`clreg.functional.rwalk`, where the formulas are):

* every step: ω −= g · Δθ, with g the task loss's gradient (as SI's path) and Δθ the step;
* every k-th step (``update_every``), the end of a window: F ← α g² + (1 − α) F from that step's
  squared task gradient (the squared *mini-batch* gradient: a batched empirical Fisher, whose scale
  depends on the batch size), then s += c · max(ω / (½ F Δ² + ε), 0) with Δ the window's displacement
  and the Fisher just updated, then ω ← 0;
* at ``consolidate``: a window left open is closed the same way without a Fisher update; the importance
  becomes F + s̄ (s̄: the first task's score, then the average ½ (s̄_old + s_new) of the older tasks'
  score and the new one's: c = ½ after the first task); F keeps running across tasks (it is never
  reset); θ* ← θ.

The scale of F + s̄ follows the loss's (F ~ g²) and ε's (a window's score is at most its ω / ε), so λ
must be tuned with them, and a large Ω makes SGD unstable once lr · 2λΩ > 2. ``normalize=True`` scales
each term to [0, 1] by its minimum and maximum over all the selected parameters' elements before the
sum, as the authors' released code does: Ω ∈ [0, 2], and λ no longer depends on those scales.

The clamp at 0 is per window: a window along which the task loss rose is no evidence of importance,
and F + s̄ ≥ 0 keeps the penalty convex. A parameter without a gradient at a window's last step keeps
its Fisher.

The gradient in the path and in the Fisher is, by default (``path_gradient="task"``), the gradient at
hand minus exactly what clreg's quadratic penalties sharing RWalk's :class:`~clreg.GradientLedger`
(its own, EWC's, L2-SP's, …) added, as :class:`~clreg.SI` does; ``"total"`` keeps the total. A ledger
hands each record to one tracker, so RWalk refuses (a ValueError when it starts tracking) to share its
ledger with another tracker of the same parameters, such as an SI in the same :class:`~clreg.Compose`.
Tracking, as SI: ``reg.attach(optimizer)`` (penalty before the step, path after it),
``reg.track(optimizer)`` (the path alone, penalty in the autograd mode) or ``reg.update(model)`` after
each ``optimizer.step()``; pass a GradScaler where one scales the loss.

State (buffers, all checkpointable mid-task): ``importance`` (F + s̄, or normalised), ``anchor`` (θ*), ``fisher``
(running F), ``score`` (the score average as it would stand if the task ended now), ``omega`` (the open
window's ω), ``previous`` (θ after the last tracked step), ``window_start`` (θ at the window's start),
``steps`` and ``window_steps``: seven parameter-sized buffers.

Distributed: under DDP each rank's ``.grad`` after the all-reduce, hence F, ω and s, is the same on every
rank: nothing is reduced. Under FSDP2 every buffer is sharded like its parameter and every update is
element-wise on the local shards (after FSDP's reduce-scatter), with no communication of its own; the
value is summed over ranks (one scalar all-reduce) and ``normalize`` takes its minima and maxima over
every rank (one all-reduce of four numbers per consolidation). Both give the single process's state on
the whole batch (tested in a two-process gloo group).

Example:
    >>> import torch
    >>> from clreg.regularizers.rwalk import RWalk
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> rwalk = RWalk(model, lam=1.0, update_every=2).attach(opt)
    >>> for _ in range(3):
    ...     opt.zero_grad(); model(torch.ones(1, 2)).pow(2).sum().backward(); opt.step()
    >>> rwalk.consolidate(model)
    >>> bool(rwalk.importance.tensors[0].sum() > 0), rwalk(model).item()
    (True, 0.0)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._params import ParamSelector
from .._sharding import local_all
from ..functional.rwalk import fisher_ema_update_, rwalk_importance_, rwalk_score_update_
from ..spec import TaskSpec
from ._path import PATH_GRADIENTS, PathTracker
from .base import Hyperparameter, IntHyperparameter, check_finite

__all__ = ["PATH_GRADIENTS", "RWalk"]


class RWalk(PathTracker):
    """RWalk: λ Σ (F + s̄)(θ − θ*)² with EWC++'s running Fisher F and the path score s̄.

    Args:
        model: the model (DDP / compiled wrappers are looked through).
        lam: λ ≥ 0.
        alpha: α ∈ (0, 1], the weight of the newest squared gradient in the running Fisher.
        eps: ε > 0, the damping of the score's denominator.
        update_every: k ≥ 1, the optimizer steps per window (Fisher update and score).
        path_gradient: ``"task"`` (default) or ``"total"``, as :class:`~clreg.SI`.
        normalize: min-max scale F and s̄ to [0, 1] each before their sum (see the module).
        params: parameter names or a predicate ``(name, param) -> bool``.
    """

    _sole_tracker = True
    hyperparameters = ("lam", "alpha", "eps", "update_every", "path_gradient", "normalize")

    def __init__(
        self,
        model: nn.Module,
        lam: float = 1.0,
        *,
        alpha: float = 0.1,
        eps: float = 1e-3,
        update_every: int = 10,
        path_gradient: str = "task",
        normalize: bool = False,
        params: ParamSelector = None,
    ) -> None:
        super().__init__(model, params)
        self.lam, self.alpha, self.eps, self.update_every = lam, alpha, eps, update_every
        self.normalize = normalize
        for name in ("fisher", "score", "omega", "previous", "window_start"):
            self.add_state(name, per_parameter=True)
        self.add_state("steps", torch.zeros((), dtype=torch.int64))
        self.add_state("window_steps", torch.zeros((), dtype=torch.int64))
        now = [p.detach() for p in self._pset.last()]
        self.previous.set(now)
        self.window_start.set(now)
        self._window_py = 0
        self.path_gradient = path_gradient

    # -- hyperparameters --------------------------------------------------------------------------
    lam = Hyperparameter(doc="λ ≥ 0, the penalty's strength.")
    alpha = Hyperparameter(0.0, 1.0, low_open=True, doc="α ∈ (0, 1], the running Fisher's weight of a new term.")
    eps = Hyperparameter(low_open=True, doc="ε > 0, the damping of the score's denominator.")
    update_every = IntHyperparameter(doc="k ≥ 1: the optimizer steps per window.")

    @property
    def normalize(self) -> bool:
        """Whether F and s̄ are min-max scaled to [0, 1] each before their sum (from the next consolidation)."""
        return self._normalize

    @normalize.setter
    def normalize(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"normalize must be a bool, got {type(value).__name__}")
        self._normalize = value

    @property
    def scale(self) -> float:
        return self._lam

    # -- tracking ---------------------------------------------------------------------------------
    def _start_tracking(self, scaler: Any) -> None:
        super()._start_tracking(scaler)
        if self._window_py == 0:  # a window left open (a resumed checkpoint) keeps its start
            self.window_start.set([p.detach() for p in self._pset.last()])

    def _path_stepped(self, params: list[Tensor], idx: list[int], grads: list[Tensor]) -> None:
        """Count the step in the window; at its k-th step, the Fisher update and the window's score."""
        self.window_steps += 1
        self._window_py += 1
        if self._window_py >= self._update_every:
            if idx:
                fisher_ema_update_(self._subset(local_all(self.fisher.tensors), idx), grads, self._alpha)
            self._close_window(params)

    def _close_window(self, params: list[Tensor]) -> None:
        """Add the window's score (with the current Fisher) and start a new window at ``params``."""
        now = [p.detach() for p in params]
        starts = local_all(self.window_start.tensors)
        delta = torch._foreach_sub(
            [p if p.dtype == s.dtype else p.to(s.dtype) for p, s in zip(local_all(now), starts)], starts
        )
        weight = 1.0 if self._n_tasks_py == 0 else 0.5
        rwalk_score_update_(self.score.tensors, self.omega.tensors, self.fisher.tensors, delta, self._eps, weight)
        for w in local_all(self.omega.tensors):
            w.zero_()
        self.window_start.set(now)
        self.window_steps.zero_()
        self._window_py = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "window_steps"
        if key in state_dict:
            self._window_py = int(state_dict[key])

    # -- consolidation ----------------------------------------------------------------------------
    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        """Close an open window, Ω ← F + s̄ (each term min-max scaled with ``normalize``), s̄ kept for the
        next task's average, θ* ← θ. ``data`` and ``spec`` are not used (the Fisher and the score come from
        the tracked steps)."""
        if int(self.steps) == 0:
            raise ValueError(
                "RWalk has no path to consolidate: attach it (rwalk.attach(optimizer)), track the optimizer "
                "(rwalk.track(optimizer)) or call rwalk.update(model) after each optimizer.step()"
            )
        params = self._resolve(model)
        for what, store in (("RWalk path integral", self.omega), ("RWalk running Fisher", self.fisher)):
            check_finite(what, dict(zip(self._pset.names, store.tensors)))
        with torch.no_grad():
            if self._window_py > 0:
                self._close_window(params)
            check_finite("RWalk score", dict(zip(self._pset.names, self.score.tensors)))
            rwalk_importance_(self.importance.tensors, self.fisher.tensors, self.score.tensors, self._normalize)
            for s in local_all(self.score.tensors):
                s.mul_(0.5)  # the next task's scores come in with weight ½: the average of the two
            now = [p.detach() for p in params]
            self.anchor.set(now)
            self.previous.set(now)
            self.window_start.set(now)
            self.steps.zero_()
        self._bump_tasks()
        self._state_changed()
