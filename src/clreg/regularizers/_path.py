r"""``PathTracker``: the path following that :class:`~clreg.SI` and :class:`~clreg.RWalk` share.

Along each optimizer step a path tracker adds to a running integral

.. math:: \omega_i \mathrel{-}= g_i \, (\theta_i^{new} - \theta_i^{old})

with g the gradient of the step: by default (``path_gradient="task"``) the gradient at hand minus exactly
what the quadratic penalties sharing the tracker's :class:`~clreg.GradientLedger` added to it (its own
included), ``"total"`` the total. Three ways to give it the steps: ``attach(optimizer)`` (the penalty's
gradient from a step pre-hook, the path from a step post-hook), ``track(optimizer)`` (the post-hook
alone, the penalty in the autograd mode) or ``update(model)`` after each ``optimizer.step()``.

Attached with an own penalty, the pre-hook keeps the task gradient (``.grad`` less the records of the
penalties whose hooks ran before) in a snapshot before it adds the own penalty's gradient; the
post-hook reads that snapshot and drops the records added after it. Otherwise the post-hook reads
``.grad`` less every record. The gradients are cast to the state dtype; under FSDP2 everything is done
on the local shards.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from .._sharding import local, local_all
from .ledger import GradientLedger
from .quadratic import QuadraticPenalty

__all__ = ["PATH_GRADIENTS", "PathTracker"]

PATH_GRADIENTS = ("task", "total")

_Tracker = TypeVar("_Tracker", bound="PathTracker")


class PathTracker(QuadraticPenalty):
    """A quadratic penalty that integrates ω −= g · Δθ along an optimizer's steps (SI, RWalk).

    A subclass declares the per-parameter states ``omega`` (ω) and ``previous`` (θ after the last
    tracked step) and the int64 ``steps``, sets ``path_gradient`` in its constructor and adds its own
    work after each step in :meth:`_path_stepped` (and at the start of tracking in
    :meth:`_start_tracking`). With ``_sole_tracker`` it refuses to share its ledger with another tracker
    of the same parameters.
    """

    tracks_path = True
    _sole_tracker: ClassVar[bool] = False
    """True where starting to track (or :meth:`update`) with another tracker of some of the same
    parameters on the ledger is a ValueError."""

    _tracking = False
    _scaler: Any = None
    _snapshot: list[Tensor] | None = None
    _snapshot_idx: list[int] | None = None
    _checked_generation: int | None = None

    # -- the gradient in the path -----------------------------------------------------------------
    @property
    def path_gradient(self) -> str:
        """``"task"`` (the gradient at hand less clreg's penalties) or ``"total"``."""
        return self._path_gradient

    @path_gradient.setter
    def path_gradient(self, value: str) -> None:
        if value not in PATH_GRADIENTS:
            raise ValueError(f"path_gradient must be one of {PATH_GRADIENTS}, got {value!r}")
        self._path_gradient = value
        self._register_with_ledger()

    def _register_with_ledger(self) -> None:
        if self._path_gradient == "task":
            self.ledger.register(self)
        else:
            self.ledger.unregister(self)

    def _ledger_changed(self, old: GradientLedger) -> None:
        old.unregister(self)
        self.ledger.scaler = self._scaler
        self._checked_generation = None
        self._register_with_ledger()
        super()._ledger_changed(old)

    def tracked_parameters(self) -> list[Tensor]:
        """The parameters whose path this regularizer follows (penalties over them record what they add)."""
        return self._pset.last()

    # -- tracking ---------------------------------------------------------------------------------
    def attach(self: _Tracker, optimizer: torch.optim.Optimizer, scaler: Any = None, *, hook: bool = True) -> _Tracker:
        """The penalty's gradient before each step (with ``hook=False``, from :meth:`pre_step`) and the
        path after it (a step post-hook), on ``optimizer``."""
        super().attach(optimizer, hook=hook)
        return self._track(optimizer, scaler)

    def track(self: _Tracker, optimizer: torch.optim.Optimizer, scaler: Any = None) -> _Tracker:
        """The path alone (a step post-hook), for the autograd mode."""
        self._optimizer_mask(optimizer, self._pset.last())
        return self._track(optimizer, scaler)

    def _track(self: _Tracker, optimizer: torch.optim.Optimizer, scaler: Any) -> _Tracker:
        self._start_tracking(scaler)
        self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kw: self._after_step(None)))
        return self

    def _start_tracking(self, scaler: Any) -> None:
        """The path starts at the current parameters, with no record pending."""
        if self._tracking:
            raise ValueError(f"{type(self).__name__} is already tracking an optimizer; call detach() first")
        self._check_sole_tracker()
        self._tracking, self._scaler = True, scaler
        self.ledger.scaler = scaler
        self.previous.set([p.detach() for p in self._pset.last()])
        self.ledger.clear(self._pset.last())

    def detach(self) -> None:
        super().detach()
        self._tracking = False
        self._snapshot = None

    def update(self, model: nn.Module, scaler: Any = None) -> None:
        """Add the last optimizer step to the path; call it after each ``optimizer.step()`` (with a
        GradScaler passed here, before ``scaler.update()``)."""
        self._scaler = self.ledger.scaler = scaler
        self._check_sole_tracker()
        self._after_step(self._resolve(model))

    def _check_sole_tracker(self) -> None:
        """With ``_sole_tracker``, a ValueError when another tracker on the ledger (an SI, a second RWalk)
        follows some of these parameters: the ledger hands each record to one tracker, so the other would
        integrate the penalties' gradients. Checked again only when the ledger's trackers change."""
        ledger = self.ledger
        if not self._sole_tracker or self._path_gradient != "task" or self._checked_generation == ledger.generation:
            return
        mine = {id(p) for p in self._pset.last()}
        for other in ledger.trackers:
            if other is not self and any(id(p) in mine for p in other.tracked_parameters()):
                raise ValueError(
                    f"{type(self).__name__} and a {type(other).__name__} on one GradientLedger track the same "
                    "parameters: each penalty's record goes to one of them, and the other's path would include "
                    "the penalties' gradients; give one its own ledger (reg.ledger = clreg.GradientLedger()) or "
                    "path_gradient='total'"
                )
        self._checked_generation = ledger.generation

    def _loss_scale(self) -> float:
        if self._scaler is None or not getattr(self._scaler, "is_enabled", lambda: False)():
            return 1.0
        return float(self._scaler.get_scale())

    # -- each step --------------------------------------------------------------------------------
    def _pre_step(self, mask: list[bool]) -> None:
        """Attached: keep the task gradient (``.grad`` less what penalties added before), then add the
        own penalty."""
        self._snapshot_idx = None  # unless a snapshot is taken, the post-hook reads .grad
        if self._n_tasks_py == 0:
            return
        if self._path_gradient == "total":  # the path takes .grad as the optimizer saw it
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
            for g, a in zip(snap, self.ledger.take(ps, self._loss_scale())):  # added before this hook ran
                if a is not None:
                    g.sub_(a.to(g.dtype))
            self._add_penalty_grad(idx, ps, grads, record=False)

    def _task_grads(self, params: list[Tensor], from_snapshot: bool) -> tuple[list[int], list[Tensor]]:
        """(indices, gradients of the path as local tensors in the state dtype) of this step."""
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
        """ω += g · (−Δθ) over the parameters with a gradient, previous ← θ, one more step; then
        :meth:`_path_stepped`. ``params`` is ``None`` from the post-hook."""
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
            self._path_stepped(params, idx, grads)

    def _path_stepped(self, params: list[Tensor], idx: list[int], grads: list[Tensor]) -> None:
        """Hook for subclasses, after each tracked step (under ``no_grad``): ``grads`` are the path's
        gradients of the parameters ``idx`` (local, in the state dtype)."""

    def _cache_tensors(self) -> list[Tensor]:
        return [*super()._cache_tensors(), *(self._snapshot or [])]
