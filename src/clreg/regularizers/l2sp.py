r"""L2-SP (Li, Grandvalet & Davoine, ICML 2018, "Explicit inductive bias for transfer learning with
convolutional networks"): a pull to the starting point.

.. math::

    P(\theta) = \frac{\alpha}{2} \sum_{i \in S} \omega_i \,(\theta_i - \theta^0_i)^2
              \;+\; \frac{\beta}{2} \sum_{j \in H} \theta_j^2

* S, the selected parameters (``params``), are pulled to θ⁰, their values when the regularizer is
  built (the pretrained weights); ω ≥ 0 is 1 everywhere (the paper's L2-SP) unless an importance is
  given (a dict of tensors by parameter name, e.g. a Fisher: checked for names, shapes, finiteness and
  sign). Unit importance keeps no importance tensor: the state is θ⁰ alone.
* H (``head_params``, chosen explicitly and disjoint from S) gets the paper's plain L2 towards 0, for
  layers that have no starting point (a new head). Without ``head_params`` the term is absent
  (β must then be 0); with them and no ``params``, S is every other trainable parameter. This term is
  a weight decay of β (gradient β θ), coupled to the loss as SGD's ``weight_decay`` is, not decoupled as
  AdamW's.
* Both halves carry the paper's ½: the gradient is α ω (θ − θ⁰) + β θ. α, β ≥ 0.

The penalty is active from the first step (θ⁰ is the start, not a task's end), and zero at θ⁰ when
β = 0. ``consolidate`` does not move the anchor by default (``anchor_at="start"``): it only counts
tasks. ``anchor_at="consolidation"`` moves θ⁰ to the parameters at each consolidation (the "L2"
baseline of the continual-learning literature), and :meth:`L2SP.reset_anchor` moves it on request.

Both modes, as :class:`~clreg.QuadraticPenalty`: autograd (``loss + reg(model)``, a closed-form
backward) and attached (``reg.attach(optimizer)``: α ω (θ − θ⁰) + β θ added to ``.grad`` in two fused
passes from a step pre-hook, after DDP's all-reduce, GradScaler's unscale and any clipping). What it
adds is recorded in its :class:`~clreg.GradientLedger` for a path tracker (SI) that shares it.

Distributed: the state is θ⁰ (and ω), copies of the parameters, identical on every rank under DDP, so
nothing is reduced. Under FSDP2 the state is sharded like the parameters, both modes run on the local
shards and the value is summed over ranks (one scalar all-reduce).

Example:
    >>> import torch
    >>> from clreg.regularizers.l2sp import L2SP
    >>> model = torch.nn.Linear(2, 1)
    >>> reg = L2SP(model, alpha=0.5)
    >>> reg(model).item()                 # zero at the start
    0.0
    >>> with torch.no_grad():
    ...     _ = model.bias.add_(2.0)
    >>> round(reg(model).item(), 6)       # (α/2) · 2²
    1.0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._params import ParamSelector, ParamSet, canonical_name
from .._sharding import any_over_mesh, is_sharded, local, local_all, shard_like, shard_mesh
from ..functional.l2sp import add_l2sp_penalty_grad_, l2sp_penalty, l2sp_penalty_grad, l2sp_penalty_value
from ..spec import TaskSpec
from .base import Hyperparameter, Regularizer, check_finite, check_range
from .ledger import GradientLedger, RecordSwitch

__all__ = ["ANCHOR_AT", "L2SP"]

ANCHOR_AT = ("start", "consolidation")
"""Where L2-SP's anchor θ⁰ sits: the parameters at construction, or at the last consolidation."""


class L2SP(Regularizer):
    """L2-SP: (α/2) Σ ω (θ − θ⁰)² over ``params`` plus (β/2) Σ θ² over ``head_params``.

    Args:
        model: the model at its starting point (DDP / compiled wrappers are looked through).
        alpha: α ≥ 0, the pull to θ⁰.
        beta: β ≥ 0, the plain L2 on ``head_params`` (needs them when > 0).
        params: the parameters pulled to their start (names or a predicate); default every trainable
            parameter, less ``head_params``.
        head_params: the parameters under the plain L2 (names or a predicate), disjoint from ``params``.
        importance: ω by parameter name, one non-negative finite tensor per selected parameter with its
            shape; default 1 (no tensor kept). To restore a checkpoint, build with an importance of the
            same names and shapes (its values are then loaded).
        anchor_at: ``"start"`` (default) or ``"consolidation"`` (see the module).

    Buffers: ``anchor`` (θ⁰, in the state dtype), ``importance`` (ω, only when given), ``n_tasks``.
    """

    attachable = True
    hyperparameters = ("alpha", "beta", "anchor_at")

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 0.1,
        beta: float = 0.0,
        *,
        params: ParamSelector = None,
        head_params: ParamSelector = None,
        importance: Mapping[str, Tensor] | None = None,
        anchor_at: str = "start",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected the model (an nn.Module), got {type(model).__name__}")
        head = None if head_params is None else ParamSet(model, head_params)
        if head is not None and params is None:
            params = _excluding(set(head.names))
        super().__init__(model, params)
        self._head = head
        _check_disjoint(self._pset.names, head)
        self._head_mask: list[bool] | None = None
        self.add_state("anchor", per_parameter=True)
        self.anchor.set([p.detach() for p in self._pset.last()])
        self._weighted = importance is not None
        if importance is not None:
            self.add_state("importance", per_parameter=True)
            self.importance.set(self._checked_importance(importance))
        self.alpha, self.beta, self.anchor_at = alpha, beta, anchor_at
        self._sqrt: list[Tensor] | None = None
        self._weighted_anchor: list[Tensor] | None = None
        self._recording, self._recording_head = self.ledger.switch(), self.ledger.switch()

    # -- hyperparameters --------------------------------------------------------------------------
    alpha = Hyperparameter(doc="α ≥ 0, the pull to the starting point.")

    @property
    def beta(self) -> float:
        """β ≥ 0, the plain L2 on ``head_params`` (0 when there are none)."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        v = check_range("beta", value)
        if v > 0 and self._head is None:
            raise ValueError(f"beta = {value} needs head_params: the plain L2 acts on an explicit selection")
        self._beta = v

    @property
    def anchor_at(self) -> str:
        """``"start"`` (θ⁰ stays where it was built) or ``"consolidation"`` (θ⁰ moves at each one)."""
        return self._anchor_at

    @anchor_at.setter
    def anchor_at(self, value: str) -> None:
        if value not in ANCHOR_AT:
            raise ValueError(f"anchor_at must be one of {ANCHOR_AT}, got {value!r}")
        self._anchor_at = value

    @property
    def head_names(self) -> list[str]:
        """Canonical names of the parameters under the plain L2 (empty without ``head_params``)."""
        return [] if self._head is None else list(self._head.names)

    # -- importance -------------------------------------------------------------------------------
    def _checked_importance(self, importance: Mapping[str, Tensor]) -> list[Tensor]:
        """The given ω in the selection's order: names, shapes, finiteness and sign checked; a whole tensor
        for a sharded parameter cut to this rank's shard."""
        if not isinstance(importance, Mapping):
            raise TypeError(
                f"importance must be a mapping of parameter names to tensors, got {type(importance).__name__}"
            )
        given = {canonical_name(k): v for k, v in importance.items()}
        names = self._pset.names
        missing, unknown = [n for n in names if n not in given], [n for n in given if n not in names]
        if missing or unknown:
            raise ValueError(
                f"importance must have exactly the selected parameters: missing {missing[:4]}, unknown {unknown[:4]}"
            )
        out = []
        for name, shape, p in zip(names, self._pset.shapes, self._pset.last()):
            t = given[name]
            if not isinstance(t, Tensor):
                raise TypeError(f"importance of parameter {name!r} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"importance of parameter {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
                )
            out.append(shard_like(t, p) if is_sharded(p) and not is_sharded(t) else t)
        checked = dict(zip(names, out))
        check_finite("L2-SP importance", checked)
        _check_non_negative(checked)
        return out

    def _importance(self) -> list[Tensor] | None:
        return self.importance.tensors if self._weighted else None

    def sqrt_importance(self) -> list[Tensor]:
        """√ω (local shards), cached for the value; derived from the state, not saved."""
        if self._sqrt is None:
            self._sqrt = torch._foreach_sqrt(local_all(self.importance.tensors))
        return self._sqrt

    def weighted_anchor(self) -> list[Tensor]:
        """ω·θ⁰ (local shards), cached for the attached path; derived from the state, not saved."""
        if self._weighted_anchor is None:
            self._weighted_anchor = torch._foreach_mul(
                local_all(self.importance.tensors), local_all(self.anchor.tensors)
            )
        return self._weighted_anchor

    # -- value ------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, inputs: Any = None, outputs: Any = None) -> Tensor:
        """The penalty at the model's parameters (``inputs``/``outputs`` are not used): differentiable
        in the autograd mode, the value alone when attached."""
        params = self._resolve(model)
        head = self._head.resolve(model) if self._head is not None else []
        with torch.autocast(params[0].device.type, enabled=False):
            value = self._pull(params)
            if head and self._beta > 0:
                value = value + self._decay(head)
        self.last_value = value.detach()
        return value

    def _pull(self, params: list[nn.Parameter]) -> Tensor:
        if self._alpha == 0:
            return torch.zeros((), dtype=self.anchor.tensors[0].dtype, device=self._device())
        root = self.sqrt_importance() if self._weighted else None
        if self.attached:
            return l2sp_penalty_value(
                params, self.anchor.tensors, self._alpha, self._importance(), sqrt_importance=root
            )
        recorder = self.ledger.record_scaled if self._recording(params) else None
        return l2sp_penalty(
            params, self.anchor.tensors, self._alpha, self._importance(), recorder=recorder, sqrt_importance=root
        )

    def _decay(self, head: list[nn.Parameter]) -> Tensor:
        if self.attached:
            return l2sp_penalty_value(head, None, self._beta)
        recorder = self.ledger.record_scaled if self._recording_head(head) else None
        return l2sp_penalty(head, None, self._beta, recorder=recorder)

    # -- attached mode ----------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer, scaler: Any = None, *, hook: bool = True) -> L2SP:
        """Add α ω (θ − θ⁰) + β θ into ``.grad`` on each ``optimizer.step()`` (``scaler`` is not needed:
        the pre-hook runs after GradScaler's unscale); with ``hook=False``, when :meth:`pre_step` is called."""
        self._register_pre_step(optimizer, hook)
        if self._head is not None:
            ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            self._head_mask = [id(p) in ids for p in self._head.last()]
        return self

    def detach(self) -> None:
        super().detach()
        self._head_mask = None

    def _pre_step(self, mask: list[bool]) -> None:
        if self._alpha > 0:
            weighted = self.weighted_anchor() if self._weighted else None
            self._add_grad(self._pset.last(), mask, self._recording, self.anchor.tensors, self._alpha, weighted)
        if self._head is not None and self._beta > 0 and self._head_mask is not None:
            self._add_grad(self._head.last(), self._head_mask, self._recording_head, None, self._beta, None)

    def _add_grad(
        self,
        params: list[nn.Parameter],
        mask: list[bool],
        recording: RecordSwitch,
        anchor: list[Tensor] | None,
        coef: float,
        weighted_anchor: list[Tensor] | None,
    ) -> None:
        """``.grad += coef ω (θ − anchor)`` for the parameters in the optimizer that have a gradient; with
        a tracker on the ledger, what is added is recorded (keyed by the parameters, local shards)."""
        idx = [i for i, (m, p) in enumerate(zip(mask, params)) if m and p.grad is not None]
        if not idx:
            return

        def sub(ts: list[Tensor] | None) -> list[Tensor] | None:
            return ts if ts is None or len(idx) == len(ts) else [ts[i] for i in idx]

        ps = sub(params)
        grads, anc = [p.grad for p in ps], sub(anchor)
        imp = sub(self.importance.tensors) if weighted_anchor is not None else None
        if recording(params):
            local_anc, local_imp = (None if t is None else local_all(t) for t in (anc, imp))
            added = l2sp_penalty_grad(local_all(ps), local_anc, coef, local_imp)
            torch._foreach_add_(local_all(grads), added)
            self.ledger.record_unscaled(ps, added)
        else:
            add_l2sp_penalty_grad_(grads, ps, anc, coef, imp, weighted_anchor=sub(weighted_anchor))

    # -- tasks and anchor -------------------------------------------------------------------------
    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        """Count a finished task; with ``anchor_at="consolidation"``, θ⁰ ← θ. ``data`` and ``spec`` are
        not used."""
        params = self._resolve(model)
        if self._anchor_at == "consolidation":
            self.anchor.set([p.detach() for p in params])
        self._bump_tasks()
        self._state_changed()

    def reset_anchor(self, model: nn.Module) -> None:
        """θ⁰ ← the model's current parameters (a new starting point)."""
        self.anchor.set([p.detach() for p in self._resolve(model)])
        self._state_changed()

    # -- state ------------------------------------------------------------------------------------
    def _ledger_changed(self, old: GradientLedger) -> None:
        self._recording, self._recording_head = self.ledger.switch(), self.ledger.switch()

    def _state_changed(self) -> None:
        self._sqrt = None
        self._weighted_anchor = None

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._state_changed()
        return out

    def _cache_tensors(self) -> list[Tensor]:
        return [*(self._sqrt or []), *(self._weighted_anchor or [])]

    def get_extra_state(self) -> dict[str, Any]:
        head = self._head
        return {
            **super().get_extra_state(),
            "head": self.head_names,
            "head_shapes": [] if head is None else [list(s) for s in head.shapes],
            "weighted": self._weighted,
        }

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and "head" in state:
            head = self._head
            ours = (self.head_names, [] if head is None else [list(s) for s in head.shapes])
            if (list(state["head"]), [list(s) for s in state["head_shapes"]]) != ours:
                raise ValueError(
                    f"state was saved with head_params {list(state['head'])[:4]}, this L2SP has {ours[0][:4]} "
                    "(names or shapes differ)"
                )
            if bool(state.get("weighted")) != self._weighted:
                how = "with" if state.get("weighted") else "without"
                raise ValueError(f"state was saved {how} an importance: build the L2SP {how} one to load it")
        super().set_extra_state(state)


def _excluding(names: set[str]) -> Callable[[str, nn.Parameter], bool]:
    return lambda name, _p: name not in names


def _check_disjoint(names: list[str], head: ParamSet | None) -> None:
    if head is None:
        return
    both = sorted(set(names) & set(head.names))
    if both:
        raise ValueError(
            f"parameters {both[:4]} are in both params and head_params: L2-SP pulls each either to its start or to 0"
        )


def _check_non_negative(tensors: dict[str, Tensor]) -> None:
    """A ValueError naming the first tensor with a negative entry (sharded: the verdict shared over ranks)."""
    values = list(tensors.values())
    flags = torch.stack([(local(t) < 0).any() for t in values]).long()
    any_over_mesh(flags, shard_mesh(values, list(tensors)))
    for name, bad in zip(tensors, flags.tolist()):
        if bad:
            raise ValueError(f"importance of parameter {name!r} has negative entries: ω must be ≥ 0")
