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
from torch import nn

from .._params import ParamSelector
from .._sharding import local_all
from ..functional.si import CLAMPS, si_importance_
from ..spec import TaskSpec
from ._path import PathTracker
from .base import Hyperparameter, check_finite

__all__ = ["SI"]


class SI(PathTracker):
    """Synaptic Intelligence with explicit ξ, c and clamp.

    Buffers: ``importance`` (Ω), ``anchor`` (θ* = θ_start), ``omega`` (the running path integral ω),
    ``previous`` (θ after the last tracked step) and ``steps`` (tracked steps since consolidation).
    """

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
    def scale(self) -> float:
        return self._c

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
