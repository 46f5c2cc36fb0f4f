"""The ``Regularizer`` base class: parameter selection, checkpointable state, optimizer hooks."""

from __future__ import annotations

import abc
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._params import ParamSelector, ParamSet
from .._sharding import any_over_mesh, local_all, shard_mesh
from .._store import FORMAT_VERSION, TensorStore, tensor_bytes
from ..spec import TaskSpec
from .ledger import GradientLedger

__all__ = [
    "CAPABILITIES",
    "FORMAT_VERSION",
    "Hyperparameter",
    "IntHyperparameter",
    "Regularizer",
    "check_finite",
    "check_int",
    "check_range",
]


CAPABILITIES = ("attachable", "tracks_path")
"""The class attributes that say what a regularizer can do on an optimizer's steps."""


def check_range(name: str, value: float, low: float = 0.0, high: float = math.inf, low_open: bool = False) -> float:
    """``value`` as a float, or a ValueError naming the range."""
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from err
    ok = (v > low if low_open else v >= low) and v <= high
    if not ok or math.isnan(v):
        lo = "(" if low_open else "["
        hi = "]" if high != math.inf else ")"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value}")
    return v


def check_int(name: str, value: Any, low: int = 1) -> int:
    """``value`` as an int (any integer type but bool: ``operator.index``), or a TypeError, or a ValueError
    below ``low``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        v = operator.index(value)
    except TypeError as err:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from err
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return v


class Hyperparameter:
    """A number checked against its range on every assignment (a ``ValueError`` naming the range),
    kept as ``_<name>``: ``lam = Hyperparameter()`` on a class makes ``reg.lam = -1`` an error."""

    def __init__(self, low: float = 0.0, high: float = math.inf, low_open: bool = False, doc: str = "") -> None:
        self.low, self.high, self.low_open, self.__doc__ = low, high, low_open, doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.attr = name, "_" + name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj, self.attr)

    def __set__(self, obj: Any, value: float) -> None:
        setattr(obj, self.attr, check_range(self.name, value, self.low, self.high, self.low_open))


class IntHyperparameter(Hyperparameter):
    """An int ≥ ``low`` checked on every assignment (:func:`check_int`), kept as ``_<name>``."""

    def __init__(self, low: int = 1, doc: str = "") -> None:
        super().__init__(low, doc=doc)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj, self.attr, check_int(self.name, value, int(self.low)))


def check_finite(kind: str, tensors: dict[str, Tensor]) -> None:
    """A ValueError naming the first tensor with a NaN or an inf; sharded tensors are checked on every
    rank's shard and the verdict shared, so every rank raises alike."""
    mesh = shard_mesh(list(tensors.values()), list(tensors))
    if mesh is not None:
        return _check_finite_sharded(kind, tensors, mesh)
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            bad = "NaN" if torch.isnan(t).any() else "inf"
            raise ValueError(f"{kind} of parameter {name!r} contains {bad}: check the data, the loss and the model")


def _check_finite_sharded(kind: str, tensors: dict[str, Tensor], mesh: Any) -> None:
    shards = local_all(list(tensors.values()))
    flags = torch.stack([torch.stack([~torch.isfinite(t).all(), torch.isnan(t).any()]) for t in shards]).long()
    any_over_mesh(flags, mesh)
    for name, (bad, nan) in zip(tensors, flags.tolist()):
        if bad:
            raise ValueError(
                f"{kind} of parameter {name!r} contains {'NaN' if nan else 'inf'}: "
                "check the data, the loss and the model"
            )


class Regularizer(nn.Module, metaclass=abc.ABCMeta):
    """Base of every clreg regularizer.

    One calling convention, so regularizers compose:

    * ``reg(model, inputs=..., outputs=...)`` returns a scalar tensor to add to the task loss (a zero
      tensor before the first consolidation);
    * ``reg.consolidate(model, data, spec)`` at the end of a task;
    * ``reg.attach(optimizer, scaler=None)`` applies the penalty's gradient on the optimizer's steps,
      where the class says it can (``attachable``);
    * ``reg.track(optimizer, scaler=None)`` follows the optimizer's path (what SI integrates), where
      the class says it can (``tracks_path``).

    The two capabilities are class attributes, so a caller asks for them without naming a class
    (``Compose.members_that("tracks_path")``).

    State lives in buffers with a format version: ``state_dict()`` of one instance loads with
    ``strict=True`` into a fresh instance built on the same model. The user's model is never held as
    a submodule. A subclass declares its state once, with :meth:`add_state`, its saved
    hyperparameters in ``hyperparameters`` (read and written through its properties, so a loaded
    value is validated like a new one), and the tensors it derives from the state and keeps across
    steps in :meth:`_cache_tensors`; :meth:`state_bytes` counts both.
    """

    format_version: ClassVar[int] = FORMAT_VERSION
    attachable: ClassVar[bool] = False
    """True where :meth:`attach` can apply the penalty's gradient from an optimizer hook (a closed form)."""
    tracks_path: ClassVar[bool] = False
    """True where :meth:`track` follows an optimizer's steps (SI's path integral)."""
    hyperparameters: ClassVar[tuple[str, ...]] = ()
    """The attributes saved with the state (``get_extra_state()["config"]``), in this order."""

    def __init__(self, model: nn.Module, params: ParamSelector = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected the model (an nn.Module), got {type(model).__name__}")
        self._pset = ParamSet(model, params)
        self.add_state("n_tasks", torch.zeros((), dtype=torch.int64))
        self._n_tasks_py = 0
        self._handles: list[Any] = []
        self.last_value: Tensor = torch.zeros(())
        self._ledger = GradientLedger()

    # -- parameters -------------------------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        """Canonical names of the parameters this regularizer acts on."""
        return list(self._pset.names)

    def _resolve(self, model: nn.Module) -> list[nn.Parameter]:
        return self._pset.resolve(model)

    def _device(self) -> torch.device:
        return self.n_tasks.device

    def _zero(self) -> Tensor:
        return torch.zeros((), device=self._device())

    def _bump_tasks(self) -> None:
        self.n_tasks += 1
        self._n_tasks_py = int(self.n_tasks)

    @property
    def ledger(self) -> GradientLedger:
        """The :class:`~clreg.GradientLedger` through which penalties tell SI what they added to ``.grad``
        (a fresh one per regularizer; :class:`~clreg.Compose` gives its members one). Set the same
        ledger on regularizers built apart to make them share it."""
        return self._ledger

    @ledger.setter
    def ledger(self, ledger: GradientLedger) -> None:
        if not isinstance(ledger, GradientLedger):
            raise TypeError(f"ledger must be a clreg.GradientLedger, got {type(ledger).__name__}")
        old, self._ledger = self._ledger, ledger
        self._ledger_changed(old)

    def _ledger_changed(self, old: GradientLedger) -> None:
        """Hook for subclasses: the ledger was replaced (``old`` is the previous one)."""

    # -- the interface ----------------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, model: nn.Module, inputs: Any = None, outputs: Any = None) -> Tensor:
        """The regularizer's value for the current parameters (a scalar tensor)."""

    @abc.abstractmethod
    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        """End a task: update importances, anchors or the teacher from ``model`` and ``data``."""

    @property
    def attached(self) -> bool:
        """True in the attached mode (the penalty's gradient comes from an optimizer hook)."""
        return self._attached

    def autograd_value(self, model: nn.Module, inputs: Any = None, outputs: Any = None) -> Tensor:
        """What a loss adds for this regularizer: its value, or zero when attached (the gradient then
        comes from the optimizer hook); :meth:`clreg.Compose.autograd_value` sums its members'."""
        if self.attached:
            return torch.zeros((), device=next(model.parameters()).device)
        return self(model, inputs=inputs, outputs=outputs)

    _attached = False

    def attach(self, optimizer: torch.optim.Optimizer, scaler: Any = None, *, hook: bool = True) -> Regularizer:
        """Apply this regularizer on ``optimizer``'s steps (where ``attachable``; ``scaler``, a
        GradScaler, matters to those that also track the path); with ``hook=False`` the caller adds the
        gradient with :meth:`pre_step`. Regularizers without a closed-form gradient (LwF) cannot be
        attached: a TypeError."""
        raise TypeError(f"{type(self).__name__} has no closed-form gradient and cannot be attached")

    def pre_step(self) -> None:
        """Add the penalty's closed-form gradient to ``.grad`` now: what the attached mode's step
        pre-hook does, for a loop that runs the backward inside ``optimizer.step(closure)`` (Lightning)
        and attaches with ``hook=False``. Call it once per optimizer step, after the backward."""
        if not self.attached or getattr(self, "_step_mask", None) is None:
            raise ValueError(f"{type(self).__name__}.pre_step needs attach(optimizer, hook=False) first")
        self._pre_step(self._step_mask)

    def _pre_step(self, mask: list[bool]) -> None:
        """The attached mode's work before an optimizer step (subclasses that are ``attachable``)."""
        raise TypeError(f"{type(self).__name__} has no closed-form gradient")

    def _register_pre_step(self, optimizer: torch.optim.Optimizer, hook: bool) -> None:
        """Enter the attached mode on ``optimizer``: its parameters' mask kept, and with ``hook`` a step
        pre-hook that runs :meth:`pre_step`'s work on each ``step()``."""
        if self.attached:
            raise ValueError(f"{type(self).__name__} is already attached; call detach() first")
        mask = self._optimizer_mask(optimizer, self._pset.last())
        self._step_mask = mask
        if hook:
            self._handles.append(optimizer.register_step_pre_hook(lambda opt, args, kw: self._pre_step(mask)))
        self._attached = True

    def track(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> Regularizer:
        """Follow ``optimizer``'s steps for a path integral (where ``tracks_path``; else a TypeError)."""
        raise TypeError(f"{type(self).__name__} does not track an optimizer's path")

    def detach(self) -> None:
        """Remove the optimizer hooks added by :meth:`attach`."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._attached = False
        self._step_mask = None

    @staticmethod
    def _optimizer_mask(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[bool]:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not hasattr(optimizer, "_optimizer_step_pre_hooks"):  # a wrapper that never ran Optimizer.__init__
            inner = getattr(optimizer, "optimizer", None)
            hint = f": attach to the torch optimizer it wraps, {type(optimizer).__name__}.optimizer" if inner else ""
            raise TypeError(f"{type(optimizer).__name__} wraps an optimizer and takes no step hooks{hint}")
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        mask = [id(p) in ids for p in params]
        if not any(mask):
            raise ValueError("the optimizer holds none of this regularizer's parameters")
        return mask

    # -- state ------------------------------------------------------------------------------------
    def add_state(
        self,
        name: str,
        default: Tensor | Mapping[str, Tensor] | None = None,
        *,
        per_parameter: bool = False,
        growable: bool = False,
    ) -> None:
        """Declare a piece of state, saved in ``state_dict`` and moved by ``.to()``.

        * ``per_parameter=True``: a :class:`~clreg._store.TensorStore` with one buffer per selected
          parameter, zeros in the state dtype (the wider of float32 and the parameter's dtype) on the
          parameters' device, read as ``self.<name>.tensors``;
        * ``default`` a mapping name → tensor: a store of those tensors as given (state over other
          tensors than the selected parameters, such as LwF's teacher); with ``growable=True`` their
          leading dimension grows (one row per task, :meth:`~clreg._store.TensorStore.append`) and a
          saved state with another number of rows loads;
        * ``default`` a tensor: a plain buffer, put on the parameters' device.
        """
        device = self._pset.last()[0].device
        if per_parameter:
            if default is not None:
                raise TypeError(f"a per-parameter state starts at zero: give no default for {name!r}")
            self.add_module(name, TensorStore(self._pset.names, self._pset.zeros(device)))
        elif isinstance(default, Mapping):
            self.add_module(name, TensorStore(list(default), list(default.values()), growable=growable))
        elif isinstance(default, Tensor):
            self.register_buffer(name, default.to(device))
        else:
            raise TypeError(f"state {name!r} needs a tensor or a mapping of tensors, got {type(default).__name__}")

    def _config(self) -> dict[str, Any]:
        """Hyperparameters saved with the state (plain data): ``hyperparameters``, read."""
        return {name: getattr(self, name) for name in self.hyperparameters}

    def _set_config(self, config: dict[str, Any]) -> None:
        unknown = sorted(set(config) - set(self.hyperparameters))
        if unknown:
            raise ValueError(f"state has hyperparameters {unknown} that a {type(self).__name__} does not have")
        for name in self.hyperparameters:
            if name in config:
                setattr(self, name, config[name])

    def _cache_tensors(self) -> list[Tensor]:
        """Hook for subclasses: tensors derived from the state and kept across steps (not saved)."""
        return []

    def state_bytes(self) -> int:
        """Bytes of state held on this rank: every buffer plus the caches derived from it (of state
        sharded like its FSDP2 parameters, the local shard)."""
        return tensor_bytes(self.buffers()) + tensor_bytes(self._cache_tensors())

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "type": type(self).__name__,
            "params": list(self._pset.names),
            "shapes": [list(s) for s in self._pset.shapes],
            "config": self._config(),
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or "format_version" not in state:
            raise ValueError("not a clreg regularizer state: the format version is missing")
        if state["format_version"] != self.format_version:
            raise ValueError(
                f"state has format version {state['format_version']}, this clreg reads version {self.format_version}"
            )
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state is of a {state.get('type')}, not of a {type(self).__name__}")
        if list(state["params"]) != self._pset.names or [list(s) for s in self._pset.shapes] != [
            list(s) for s in state["shapes"]
        ]:
            ours = {(n, tuple(s)) for n, s in zip(self._pset.names, self._pset.shapes)}
            theirs = {(n, tuple(s)) for n, s in zip(state["params"], state["shapes"])}
            diff = sorted(ours ^ theirs, key=str)[:4]
            raise ValueError(f"state was saved for different parameters (names or shapes differ, e.g. {diff})")
        self._set_config(dict(state.get("config", {})))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "n_tasks"
        if key in state_dict:
            self._n_tasks_py = int(state_dict[key])
        self._state_changed()

    def _state_changed(self) -> None:
        """Hook for subclasses: drop caches derived from the state (after a consolidation, a load or a
        move)."""
