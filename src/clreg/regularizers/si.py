r"""Synaptic Intelligence (Zenke et al., 2017).

Path integral on every optimizer step, importance at each consolidation
(:mod:`clreg.functional.si`), penalty

.. math:: P(\theta) = c \sum_i \Omega_i (\theta_i - \theta^*_i)^2

(no ½, as in the paper), θ* the parameters at the last consolidation. ξ > 0 and c ≥ 0 are explicit;
``clamp`` is ``"cumulative"`` (default), ``"per_task"`` or ``None``.

The path needs every step's gradient and parameter change. Three ways to give them:

* ``si.attach(optimizer)``: the penalty's gradient from a step pre-hook and the path from a step
  post-hook (the fast path);
* autograd mode (``loss + si(model)``) with ``si.track(optimizer)``: the post-hook alone;
* autograd mode with an explicit ``si.update(model)`` after each ``optimizer.step()``.

The gradient in the path is, by default (``path_gradient="task"``), the gradient at hand minus exactly
what the quadratic penalties (EWC, OnlineEWC, MAS, SI itself) that share SI's
:class:`~clreg.GradientLedger` added to it; ``"total"`` keeps the total. SI registers as a tracker of
its ledger (``si.ledger``); the members of one :class:`~clreg.Compose` share a ledger, and regularizers
built apart share one when the same ledger is set on each (``ewc.ledger = si.ledger``). A penalty with
another ledger is not subtracted: its gradient is in the path. With a GradScaler in autograd mode pass
it (``track(optimizer, scaler=...)``) so the penalties' recorded gradients are unscaled like ``.grad``.
A user's clipping of ``.grad`` is not undone, and LwF's gradient (not closed-form) is not subtracted.

Under FSDP2 the path is integrated shard by shard: ω, Ω, θ* and the previous parameters are sharded
like the parameters, each rank adds its shard's g · Δθ after each step (no communication), and the
result equals the unsharded run's.

Example:
    >>> import torch, clreg
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> si = clreg.SI(model, c=0.1).attach(opt)
    >>> for _ in range(3):
    ...     opt.zero_grad(); model(torch.ones(1, 2)).pow(2).sum().backward(); opt.step()
    >>> si.consolidate(model)
    >>> bool(si.importance.tensors[0].sum() > 0)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._params import ParamSelector
from .._sharding import local, local_all
from ..functional.si import CLAMPS, si_importance_
from ..spec import TaskSpec
from .base import Hyperparameter, check_finite
from .ledger import GradientLedger
from .quadratic import QuadraticPenalty

__all__ = ["SI"]


class SI(QuadraticPenalty):
    """Synaptic Intelligence with explicit ξ, c and clamp.

    Buffers: ``importance`` (Ω), ``anchor`` (θ* = θ_start), ``omega`` (the running path integral ω),
    ``previous`` (θ after the last tracked step) and ``steps`` (tracked steps since consolidation).
    """

    tracks_path = True
    hyperparameters = ("c", "xi", "clamp", "path_gradient")

    def __init__(
        self,
        model: nn.Module,
        c: float = 0.1,
        xi: float = 1e-3,
        *,
        clamp: str | None = "cumulative",
        path_gradient: str = "task",
        params: ParamSelector = None,
    ) -> None:
        super().__init__(model, params)
        self.c, self.xi, self.clamp, self.path_gradient = c, xi, clamp, path_gradient
        self.add_state("omega", per_parameter=True)
        self.add_state("previous", per_parameter=True)
        self.add_state("steps", torch.zeros((), dtype=torch.int64))
        params_now = [p.detach() for p in self._pset.last()]
        self.previous.set(params_now)
        self.anchor.set(params_now)
        self._tracking = False
        self._scaler: Any = None

    # -- hyperparameters --------------------------------------------------------------------------
    c = Hyperparameter(doc="c ≥ 0, the penalty's strength.")

    xi = Hyperparameter(low_open=True, doc="ξ > 0, the damping of the importance.")

    @property
    def clamp(self) -> str | None:
        return self._clamp

    @clamp.setter
    def clamp(self, value: str | None) -> None:
        if value not in CLAMPS:
            raise ValueError(f"clamp must be one of {CLAMPS}, got {value!r}")
        self._clamp = value

    @property
    def path_gradient(self) -> str:
        return self._path_gradient

    @path_gradient.setter
    def path_gradient(self, value: str) -> None:
        if value not in ("task", "total"):
            raise ValueError(f"path_gradient must be 'task' or 'total', got {value!r}")
        self._path_gradient = value
        self._register_with_ledger()

    def _register_with_ledger(self) -> None:
        if self._path_gradient == "task":
            self.ledger.register(self)
        else:
            self.ledger.unregister(self)

    def _ledger_changed(self, old: GradientLedger) -> None:
        old.unregister(self)
        self._register_with_ledger()
        super()._ledger_changed(old)

    @property
    def scale(self) -> float:
        return self._c

    def tracked_parameters(self) -> list[Tensor]:
        """The parameters whose path this SI integrates (penalties over them record what they add)."""
        return self._pset.last()

    # -- path tracking ----------------------------------------------------------------------------
    def _start_tracking(self, scaler: Any) -> None:
        if self._tracking:
            raise ValueError("SI is already tracking an optimizer; call detach() first")
        self._tracking = True
        self._scaler = scaler
        self.previous.set([p.detach() for p in self._pset.last()])
        self.ledger.clear(self._pset.last())

    def attach(self, optimizer: torch.optim.Optimizer, scaler: Any = None, *, hook: bool = True) -> SI:
        """Penalty gradient before each step (with ``hook=False``, from :meth:`pre_step`) and path
        tracking after it (a step post-hook), on ``optimizer``."""
        super().attach(optimizer, hook=hook)
        return self._track(optimizer, scaler)

    def track(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> SI:
        """Path tracking alone (a step post-hook), for the autograd mode."""
        self._optimizer_mask(optimizer, self._pset.last())
        return self._track(optimizer, scaler)

    def _track(self, optimizer: torch.optim.Optimizer, scaler: Any) -> SI:
        self._start_tracking(scaler)
        self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kw: self._after_step(None)))
        return self

    def detach(self) -> None:
        super().detach()
        self._tracking = False
        self._snapshot = None

    def update(self, model: nn.Module, scaler: Any = None) -> None:
        """Add the last optimizer step to the path; call it after each ``optimizer.step()`` (and, with
        a GradScaler passed here, before ``scaler.update()``)."""
        self._scaler = scaler
        self._after_step(self._resolve(model))

    def _loss_scale(self) -> float:
        if self._scaler is None or not getattr(self._scaler, "is_enabled", lambda: False)():
            return 1.0
        return float(self._scaler.get_scale())

    _snapshot: list[Tensor] | None = None
    _snapshot_idx: list[int] | None = None

    def _pre_step(self, mask: list[bool]) -> None:
        """Attached: keep the path's gradient (the task gradient), then add SI's own penalty."""
        if self._n_tasks_py == 0:
            self._snapshot_idx = None  # no own penalty yet: the post-hook reads .grad
            return
        if self._path_gradient == "total":  # the path takes .grad as the optimizer saw it
            self._snapshot_idx = None
            super()._pre_step(mask)
            return
        targets = self._step_targets(mask)
        self._snapshot_idx = None if targets is None else targets[0]
        if targets is None:
            return
        idx, ps, grads = targets
        if self._snapshot is None:
            self._snapshot = [torch.empty_like(w) for w in local_all(self.omega.tensors)]
        snap = self._subset(self._snapshot, idx)
        with torch.no_grad():
            torch._foreach_copy_(snap, local_all(grads))
            for g, a in zip(snap, self.ledger.take(ps, self._loss_scale())):  # added before this hook ran
                if a is not None:
                    g.sub_(a.to(g.dtype))
            self._add_penalty_grad(idx, ps, grads, record=False)

    def _after_step(self, params: list[Tensor] | None) -> None:
        from_snapshot = params is None and self.attached and self._snapshot_idx is not None
        params = self._pset.last() if params is None else params
        idx = self._snapshot_idx if from_snapshot else [i for i, p in enumerate(params) if p.grad is not None]
        prev, omega = local_all(self.previous.tensors), local_all(self.omega.tensors)
        with torch.no_grad():
            if idx:
                ps, pv, om = (self._subset(t, idx) for t in (params, prev, omega))
                if from_snapshot:
                    grads = self._subset(self._snapshot, idx)
                    self.ledger.clear(ps)  # added after the snapshot: not in it
                else:
                    grads = [local(p.grad) for p in ps]
                    if self._path_gradient == "task":
                        added = self.ledger.take(ps, self._loss_scale())
                        if any(a is not None for a in added):
                            grads = [g if a is None else g - a.to(g.dtype) for g, a in zip(grads, added)]
                if grads[0].dtype != pv[0].dtype:
                    grads = [g.to(v.dtype) for g, v in zip(grads, pv)]
                ps_state = [p if p.dtype == v.dtype else p.to(v.dtype) for p, v in zip(local_all(ps), pv)]
                torch._foreach_sub_(pv, ps_state)  # previous ← θ_old − θ_new = −Δθ
                torch._foreach_addcmul_(om, grads, pv)  # ω += g · (−Δθ)
            self.previous.set([p.detach() for p in params])
        self.steps += 1

    def _cache_tensors(self) -> list[Tensor]:
        return [*super()._cache_tensors(), *(self._snapshot or [])]

    # -- consolidation ----------------------------------------------------------------------------
    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        """Ω ← clamp(Ω + w·ω/(Δ² + ξ)), then ω ← 0 and θ* ← θ. ``data`` is not needed."""
        if int(self.steps) == 0:
            raise ValueError(
                "SI has no path to consolidate: attach it (si.attach(optimizer)), track the optimizer "
                "(si.track(optimizer)) or call si.update(model) after each optimizer.step()"
            )
        spec = spec or TaskSpec()
        params = local_all([p.detach() for p in self._resolve(model)])
        check_finite("SI path integral", dict(zip(self._pset.names, self.omega.tensors)))
        with torch.no_grad():
            delta = [p.to(a.dtype) - a for p, a in zip(params, local_all(self.anchor.tensors))]
            si_importance_(self.importance.tensors, self.omega.tensors, delta, self._xi, self._clamp, spec.weight)
            for w in local_all(self.omega.tensors):
                w.zero_()
            self.anchor.set(params)
            self.previous.set(params)
            self.steps.zero_()
        self._bump_tasks()
        self._state_changed()
