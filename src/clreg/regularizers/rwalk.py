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

import operator
from typing import Any

import torch
from torch import Tensor, nn

from .._params import ParamSelector
from .._sharding import local, local_all
from ..functional.rwalk import fisher_ema_update_, rwalk_importance_, rwalk_score_update_
from ..spec import TaskSpec
from .base import Hyperparameter, check_finite
from .ledger import GradientLedger
from .quadratic import QuadraticPenalty

__all__ = ["PATH_GRADIENTS", "RWalk"]

PATH_GRADIENTS = ("task", "total")


class RWalk(QuadraticPenalty):
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

    tracks_path = True
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
        self._tracking = False
        self._scaler: Any = None
        self.path_gradient = path_gradient

    # -- hyperparameters --------------------------------------------------------------------------
    lam = Hyperparameter(doc="λ ≥ 0, the penalty's strength.")
    alpha = Hyperparameter(0.0, 1.0, low_open=True, doc="α ∈ (0, 1], the running Fisher's weight of a new term.")
    eps = Hyperparameter(low_open=True, doc="ε > 0, the damping of the score's denominator.")

    @property
    def update_every(self) -> int:
        """k ≥ 1: the optimizer steps per window."""
        return self._update_every

    @update_every.setter
    def update_every(self, value: int) -> None:
        if isinstance(value, bool):
            raise TypeError("update_every must be an int, got bool")
        try:
            k = operator.index(value)
        except TypeError as err:
            raise TypeError(f"update_every must be an int, got {type(value).__name__}") from err
        if k < 1:
            raise ValueError(f"update_every must be >= 1, got {value}")
        self._update_every = k

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
    def path_gradient(self) -> str:
        """``"task"`` (the gradient at hand less clreg's penalties) or ``"total"``."""
        return self._path_gradient

    @path_gradient.setter
    def path_gradient(self, value: str) -> None:
        if value not in PATH_GRADIENTS:
            raise ValueError(f"path_gradient must be one of {PATH_GRADIENTS}, got {value!r}")
        self._path_gradient = value
        if value == "task":
            self.ledger.register(self)
        else:
            self.ledger.unregister(self)

    def _ledger_changed(self, old: GradientLedger) -> None:
        old.unregister(self)
        self._checked_generation = None
        if self._path_gradient == "task":
            self.ledger.register(self)
        super()._ledger_changed(old)

    @property
    def scale(self) -> float:
        return self._lam

    def tracked_parameters(self) -> list[Tensor]:
        """The parameters whose path RWalk follows (penalties over them record what they add)."""
        return self._pset.last()

    # -- tracking ---------------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer, scaler: Any = None, *, hook: bool = True) -> RWalk:
        """The penalty's gradient before each step (with ``hook=False``, from :meth:`pre_step`) and the
        path after it (a step post-hook), on ``optimizer``."""
        super().attach(optimizer, hook=hook)
        return self._track(optimizer, scaler)

    def track(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> RWalk:
        """The path alone (a step post-hook), for the autograd mode."""
        self._optimizer_mask(optimizer, self._pset.last())
        return self._track(optimizer, scaler)

    def _track(self, optimizer: torch.optim.Optimizer, scaler: Any) -> RWalk:
        if self._tracking:
            raise ValueError("RWalk is already tracking an optimizer; call detach() first")
        self._check_sole_tracker()
        self._tracking, self._scaler = True, scaler
        params = [p.detach() for p in self._pset.last()]
        self.previous.set(params)
        if self._window_py == 0:  # a window left open (a resumed checkpoint) keeps its start
            self.window_start.set(params)
        self.ledger.clear(self._pset.last())
        self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kw: self._after_step(None)))
        return self

    def detach(self) -> None:
        super().detach()
        self._tracking = False
        self._snapshot = None

    def update(self, model: nn.Module, scaler: Any = None) -> None:
        """Add the last optimizer step to the path; call it after each ``optimizer.step()`` (with a
        GradScaler passed here, before ``scaler.update()``)."""
        self._scaler = scaler
        self._check_sole_tracker()
        self._after_step(self._resolve(model))

    _checked_generation: int | None = None

    def _check_sole_tracker(self) -> None:
        """A ValueError when another tracker on the ledger (an SI, a second RWalk) follows some of these
        parameters: the ledger hands each record to one tracker, so the other would integrate the
        penalties' gradients. Checked again only when the ledger's trackers change."""
        ledger = self.ledger
        if self._path_gradient != "task" or self._checked_generation == ledger.generation:
            return
        mine = {id(p) for p in self._pset.last()}
        for other in ledger.trackers:
            if other is not self and any(id(p) in mine for p in other.tracked_parameters()):
                raise ValueError(
                    f"RWalk and a {type(other).__name__} on one GradientLedger track the same parameters: each "
                    "penalty's record goes to one of them, and the other's path would include the penalties' "
                    "gradients; give one its own ledger (reg.ledger = clreg.GradientLedger()) or "
                    "path_gradient='total'"
                )
        self._checked_generation = ledger.generation

    def _loss_scale(self) -> float:
        if self._scaler is None or not getattr(self._scaler, "is_enabled", lambda: False)():
            return 1.0
        return float(self._scaler.get_scale())

    _snapshot: list[Tensor] | None = None
    _snapshot_idx: list[int] | None = None

    def _pre_step(self, mask: list[bool]) -> None:
        """Attached: keep the task gradient (``.grad`` less what penalties added before), then add the
        own penalty."""
        self._snapshot_idx = None
        if self._n_tasks_py == 0:
            return
        if self._path_gradient == "total":
            super()._pre_step(mask)
            return
        targets = self._step_targets(mask)
        if targets is None:
            return
        idx, ps, grads = targets
        self._snapshot_idx = idx
        if self._snapshot is None:
            self._snapshot = [torch.empty_like(w) for w in local_all(self.omega.tensors)]
        snap = self._subset(self._snapshot, idx)
        with torch.no_grad():
            torch._foreach_copy_(snap, local_all(grads))
            for g, a in zip(snap, self.ledger.take(ps, self._loss_scale())):
                if a is not None:
                    g.sub_(a.to(g.dtype))
            self._add_penalty_grad(idx, ps, grads, record=False)

    def _task_grads(self, params: list[Tensor], from_snapshot: bool) -> tuple[list[int], list[Tensor]]:
        """(indices, task gradients as local tensors in the state dtype) of this step."""
        if from_snapshot:
            idx = self._snapshot_idx or []
            self.ledger.clear(self._subset(params, idx))  # added after the snapshot: not in it
            return idx, self._subset(self._snapshot, idx)
        idx = [i for i, p in enumerate(params) if p.grad is not None]
        ps = self._subset(params, idx)
        grads = [local(p.grad) for p in ps]
        if self._path_gradient == "task" and idx:
            added = self.ledger.take(ps, self._loss_scale())
            grads = [g if a is None else g - a.to(g.dtype) for g, a in zip(grads, added)]
        state = self._subset(self.omega.tensors, idx)
        return idx, [g if g.dtype == s.dtype else g.to(s.dtype) for g, s in zip(grads, state)]

    def _after_step(self, params: list[Tensor] | None) -> None:
        from_snapshot = params is None and self.attached and self._snapshot_idx is not None
        params = self._pset.last() if params is None else params
        idx, grads = self._task_grads(params, from_snapshot)
        with torch.no_grad():
            if idx:
                prev, omega = (self._subset(local_all(t.tensors), idx) for t in (self.previous, self.omega))
                now = [
                    p if p.dtype == v.dtype else p.to(v.dtype)
                    for p, v in zip(local_all(self._subset(params, idx)), prev)
                ]
                torch._foreach_sub_(prev, now)  # previous ← θ_old − θ_new = −Δθ
                torch._foreach_addcmul_(omega, grads, prev)  # ω += g · (−Δθ)
            self.previous.set([p.detach() for p in params])
            self.steps += 1
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

    def _cache_tensors(self) -> list[Tensor]:
        return [*super()._cache_tensors(), *(self._snapshot or [])]

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
