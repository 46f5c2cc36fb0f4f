r"""``QuadraticPenalty``: the shared machinery of EWC, OnlineEWC, SI and MAS.

.. math:: P(\theta) = s \left[ \sum_i A_i (\theta_i - m_i)^2 + C \right]

with importance A, anchor m, offset C and a scale s set by the subclass (λ/2, c or λ). Two modes:

* autograd (default): ``reg(model)`` returns a differentiable scalar whose backward is the closed form
  ``grad_output · 2 s A (θ − m)``, so loss scaling, accumulation divisors, DDP and
  ``torch.autograd.grad`` all see it;
* attached: ``reg.attach(optimizer)`` adds 2 s (A θ − A m) to ``.grad`` in two fused passes from a
  step pre-hook — after DDP's all-reduce, after GradScaler's unscale and after any clipping the user
  does before ``step()`` (so clipping does not see the penalty's gradient) — once per optimizer step;
  ``reg(model)`` then returns the value alone, detached, for logging (skip the call on steps you do
  not log: it costs two passes over the state).

Under FSDP2 (parameters sharded as DTensors by ``fully_shard``) the state is sharded like the
parameters and both modes run on the local shards: the attached pre-hook after FSDP's reduce-scatter,
on the sharded ``.grad``; the value summed over ranks (one scalar all-reduce per evaluation).
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor, nn

from .._params import ParamSelector
from .._sharding import local_all
from ..functional.penalty import (
    add_quadratic_penalty_grad_,
    importance_roots,
    quadratic_penalty,
    quadratic_penalty_grad,
    quadratic_penalty_value,
)
from .base import Regularizer
from .ledger import GradientLedger

__all__ = ["QuadraticPenalty"]


class QuadraticPenalty(Regularizer):
    """A penalty s [Σ A (θ − m)² + C] with buffers ``importance`` (A), ``anchor`` (m), ``offset`` (C)."""

    attachable = True

    def __init__(self, model: nn.Module, params: ParamSelector = None) -> None:
        super().__init__(model, params)
        self.add_state("importance", per_parameter=True)
        self.add_state("anchor", per_parameter=True)
        self.add_state("offset", torch.zeros((), dtype=torch.float64))
        self._weighted_anchor: list[Tensor] | None = None
        self._sqrt: list[Tensor] | None = None
        self._sign: list[Tensor] | None = None
        self._recording = self.ledger.switch()

    @property
    @abc.abstractmethod
    def scale(self) -> float:
        """The factor s in front of the quadratic (λ/2 for EWC, c for SI, λ for MAS)."""

    def _ledger_changed(self, old: GradientLedger) -> None:
        self._recording = self.ledger.switch()

    # -- caches -----------------------------------------------------------------------------------
    def _state_changed(self) -> None:
        self._weighted_anchor = None
        self._sqrt = None
        self._sign = None

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._state_changed()
        return out

    def sqrt_importance(self) -> list[Tensor]:
        """√|A|, cached for the autograd path and the value with the sign of A (:attr:`importance_sign`,
        ``None`` when A ≥ 0; derived from the state, not saved; of sharded state, the local shards)."""
        if self._sqrt is None:
            self._sqrt, self._sign = importance_roots(local_all(self.importance.tensors))
        return self._sqrt

    @property
    def importance_sign(self) -> list[Tensor] | None:
        """sign(A) where some importance is negative (SI without its clamp), else ``None``."""
        self.sqrt_importance()
        return self._sign

    def weighted_anchor(self) -> list[Tensor]:
        """A·m, cached for the attached path (not saved: derived from the state; of sharded state, the
        local shards)."""
        if self._weighted_anchor is None:
            self._weighted_anchor = torch._foreach_mul(
                local_all(self.importance.tensors), local_all(self.anchor.tensors)
            )
        return self._weighted_anchor

    # -- value ------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, inputs: Any = None, outputs: Any = None) -> Tensor:
        """The penalty at the model's current parameters (``inputs``/``outputs`` are not used)."""
        if self._n_tasks_py == 0:
            value = self._zero()
        else:
            params = self._resolve(model)
            with torch.autocast(params[0].device.type, enabled=False):
                if self.attached:
                    value = quadratic_penalty_value(
                        params,
                        self.importance.tensors,
                        self.anchor.tensors,
                        self.scale,
                        self.offset,
                        sqrt_importance=self.sqrt_importance(),
                        importance_sign=self.importance_sign,
                    )
                else:
                    value = quadratic_penalty(
                        params,
                        self.importance.tensors,
                        self.anchor.tensors,
                        self.scale,
                        self.offset.to(self.importance.tensors[0].dtype),
                        recorder=self.ledger.record_scaled if self._recording(params) else None,
                        sqrt_importance=self.sqrt_importance(),
                        importance_sign=self.importance_sign,
                    )
        self.last_value = value.detach()
        return value

    # -- attached mode ----------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer, scaler: Any = None, *, hook: bool = True) -> QuadraticPenalty:
        """Add the penalty's closed-form gradient into ``.grad`` on each ``optimizer.step()``
        (``scaler`` is not needed: the pre-hook runs after GradScaler's unscale); with ``hook=False``,
        when the caller calls :meth:`pre_step`."""
        self._register_pre_step(optimizer, hook)
        return self

    def _step_targets(self, mask: list[bool]) -> tuple[list[int], list[Tensor], list[Tensor]] | None:
        """(indices, parameters, grads) this step acts on: in the optimizer, with a gradient."""
        params = self._pset.last()
        idx = [i for i, (m, p) in enumerate(zip(mask, params)) if m and p.grad is not None]
        if not idx:
            return None
        ps = params if len(idx) == len(params) else [params[i] for i in idx]
        return idx, ps, [p.grad for p in ps]

    def _subset(self, tensors: list[Tensor], idx: list[int]) -> list[Tensor]:
        return tensors if len(idx) == len(tensors) else [tensors[i] for i in idx]

    def _add_penalty_grad(self, idx: list[int], ps: list[Tensor], grads: list[Tensor], record: bool) -> None:
        """grads += 2 s A (θ − m); with ``record``, what is added also goes to the ledger for SI (keyed by
        the parameters; of sharded ones, the local shards)."""
        imp = local_all(self._subset(self.importance.tensors, idx))
        shards, local_grads = local_all(ps), local_all(grads)
        if record:
            added = quadratic_penalty_grad(shards, imp, local_all(self._subset(self.anchor.tensors, idx)), self.scale)
            torch._foreach_add_(local_grads, added)
            self.ledger.record_unscaled(ps, added)
        else:
            add_quadratic_penalty_grad_(local_grads, shards, imp, self._subset(self.weighted_anchor(), idx), self.scale)

    def _pre_step(self, mask: list[bool]) -> None:
        if self._n_tasks_py == 0:
            return
        targets = self._step_targets(mask)
        if targets is not None:
            self._add_penalty_grad(*targets, record=self._recording(self._pset.last()))

    def _cache_tensors(self) -> list[Tensor]:
        return [*(self._weighted_anchor or []), *(self._sqrt or []), *(self._sign or [])]
