"""The parts a method is made of, each with its settings as a small typed dataclass.

A part (:class:`Part`) is one remedy: its fields are its settings with their defaults
(``EWCPart.lam`` is the setting ``ewc.lam``); it builds its regularizer (or replay buffer) from them,
says which fields may change between stages (``per_stage``: field → the regularizer's attribute) and
adapts the task spec its member consolidates with. :func:`register_part` adds one by name; values
from the command line or a JSON file are converted by the field's type in :meth:`Part.from_values`.

Example:
    >>> from clreg.bench.parts import PARTS
    >>> ewc = PARTS["ewc"].from_values({"lam": "1e4"})
    >>> ewc.lam, ewc.normalize
    (10000.0, False)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, get_type_hints

from torch import Tensor, nn

from .. import AGEM, DER, ERACE, EWC, KFACEWC, L2SP, MAS, SI, FeatureDistillation, LwF, OnlineEWC, ReplayBuffer, RWalk
from ..regularizers import Regularizer
from ..spec import OutputSpec, TaskSpec

if TYPE_CHECKING:
    from .task import Task

__all__ = ["PARTS", "Part", "PartContext", "coerce", "register_part"]


def coerce(value: Any, kind: type, what: str) -> Any:
    """``value`` as a ``float``, ``int`` or ``bool`` setting (from a number or its text)."""
    if kind is bool:
        if isinstance(value, str):
            value = {"true": 1, "false": 0, "1": 1, "0": 0}.get(value.strip().lower(), value)
        if value in (0, 1):
            return bool(value)
        raise ValueError(f"{what} is true or false (1 or 0), got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is a number, got {value!r}") from None
    if kind is int:
        if number != int(number):
            raise ValueError(f"{what} is a whole number, got {value!r}")
        return int(number)
    return number


@dataclass(frozen=True)
class Part:
    """One remedy and its settings (see the module). Subclasses are frozen dataclasses whose fields
    are ``float``, ``int`` or ``bool`` settings."""

    name: ClassVar[str] = ""
    within_rules: ClassVar[bool] = True  # one of the one-head challenge's remedies (EWC, LwF, replay, distillation)
    per_stage: ClassVar[Mapping[str, str]] = {}  # field that may change per stage -> regularizer attribute
    data_pass: ClassVar[bool] = False  # its consolidation reads the task's data once (a Fisher, an importance)

    @classmethod
    def fields(cls) -> dict[str, type]:
        """Each setting's name and type."""
        hints = get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Part:
        """The part with ``values`` (field name → value or its text) over the defaults."""
        fields = cls.fields()
        unknown = sorted(set(values) - set(fields))
        if unknown:
            known = ", ".join(f"{cls.name}.{f}" for f in fields) or "none"
            raise ValueError(f"unknown setting(s) {[f'{cls.name}.{u}' for u in unknown]}; {cls.name} has: {known}")
        return cls(**{k: coerce(v, fields[k], f"{cls.name}.{k}") for k, v in values.items()})

    def regularizer(self, model: nn.Module, seed: int, context: PartContext) -> Regularizer | None:
        """The part's regularizer on ``model`` (``None`` for a part that is not a penalty); ``context``
        holds the run's tasks in stage order and what the scenario says of its model."""
        return None

    def task_loss(self, reg: Regularizer, task: Task, outputs: Any, target: Any) -> Tensor | None:
        """The incoming batch's loss in place of the task's own (``None``: the task's)."""
        return None

    def observe(self, reg: Regularizer, inputs: Any, target: Any, outputs: Any) -> None:
        """Called after each optimizer step with the step's batch and the outputs on it (detached)."""

    def watch(self, reg: Regularizer, model: nn.Module) -> AbstractContextManager:
        """A context the step's forward runs in (a feature hook); none by default."""
        return nullcontext()

    def replay_buffer(self, seed: int) -> ReplayBuffer | None:
        """The part's replay buffer (``None`` for a part that keeps no samples)."""
        return None

    def member_spec(self, spec: TaskSpec, values: Mapping[str, Any]) -> TaskSpec:
        """The spec the part's member consolidates a task with, given the per-stage ``values`` of the
        stage that follows (the identity unless a part weighs or changes it)."""
        return spec

    def task_weight(self, values: Mapping[str, Any]) -> float | None:
        """The weight w_t this part gives the task it consolidates before a stage whose per-stage
        fields have ``values`` (``None``: the spec's own weight)."""
        return None

    @classmethod
    def first_stage_tracker(cls, model: nn.Module) -> Regularizer | None:
        """A tracker of the optimizer's path through an unregularized first stage, for a part whose
        importance is built along the path (SI); ``None`` for the others. A run that trains the first
        stage once for every method tracks it with this and hands its state to :meth:`take_over`."""
        return None

    def take_over(self, reg: Regularizer, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`first_stage_tracker`'s state with this part's own settings."""
        raise TypeError(f"part {self.name!r} tracks no first stage")

    def attributes(self, values: Mapping[str, Any]) -> dict[str, float]:
        """The regularizer's attributes for a stage whose per-stage fields have ``values``."""
        return {attr: float(values[field]) for field, attr in self.per_stage.items()}


PARTS: dict[str, type[Part]] = {}


def register_part(cls: type[Part]) -> type[Part]:
    """Add a part class to :data:`PARTS` under its ``name`` (a decorator)."""
    if not cls.name or "+" in cls.name or "." in cls.name or ":" in cls.name:
        raise ValueError(f"a part's name is a non-empty word without '+', '.' or ':', got {cls.name!r}")
    if cls.name in PARTS:
        raise ValueError(f"a part named {cls.name!r} is already registered")
    fields = cls.fields()
    bad = [f for f in cls.per_stage if f not in fields]
    if bad:
        raise ValueError(f"part {cls.name!r}: per-stage fields {bad} are not among its settings")
    PARTS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class PartContext:
    """What a part may need besides its settings: the run's tasks in stage order, the names of the
    model's feature modules (for feature distillation) and the model's outputs as a part that matches
    all of them selects them (DER; ``None``: the whole output, one tensor)."""

    tasks: Sequence[Task] = ()
    feature_modules: Sequence[str] = ()
    outputs: Sequence[OutputSpec] | None = None

    def reject_selected_channels(self, part: str) -> None:
        """A ValueError when the model has several outputs, or a task's outputs are a selection of the
        model's channels (a head per task): ``part`` reads labels as indices of one whole output."""
        if self.outputs is not None:
            raise ValueError(
                f"{part} reads a task's labels as class indices of the model's one output tensor, but this "
                f"scenario's model has several outputs ({', '.join(str(o.select) for o in self.outputs)})"
            )
        for task in self.tasks:
            if any(o.channels is not None for o in task.spec().outputs):
                raise ValueError(
                    f"{part} reads a task's labels as indices of the model's whole output, but task {task.name!r} "
                    "selects channels (a head per task): run it in a setting with one shared output"
                )


def _normalize(flag: bool) -> str | None:
    return "mean" if flag else None


@register_part
@dataclass(frozen=True)
class NaivePart(Part):
    """No remedy: fine-tuning."""

    name: ClassVar[str] = "naive"


@register_part
@dataclass(frozen=True)
class EWCPart(Part):
    """:class:`~clreg.EWC`. ``normalize``: each task's Fisher divided by its mean; ``per_task``: the
    per-stage λ weighs the task consolidated before that stage (its w_t) and EWC's own λ is 1;
    ``likelihood``: a task with a per-sample loss gives the Fisher of its likelihood instead."""

    name: ClassVar[str] = "ewc"
    data_pass: ClassVar[bool] = True
    per_stage: ClassVar[Mapping[str, str]] = {"lam": "lam"}
    lam: float = 1.0
    normalize: bool = False
    per_task: bool = False
    likelihood: bool = False

    def regularizer(self, model: nn.Module, seed: int, context: PartContext) -> Regularizer:
        return EWC(model, lam=self.lam, seed=seed, normalize=_normalize(self.normalize))

    def task_weight(self, values: Mapping[str, Any]) -> float | None:
        return float(values["lam"]) if self.per_task else None

    def member_spec(self, spec: TaskSpec, values: Mapping[str, Any]) -> TaskSpec:
        weight = self.task_weight(values)
        if weight is not None:
            spec = replace(spec, weight=spec.weight * weight)
        if self.likelihood and spec.per_sample_loss is not None:
            spec = replace(spec, per_sample_loss=None)
        return spec

    def attributes(self, values: Mapping[str, Any]) -> dict[str, float]:
        return {"lam": 1.0 if self.per_task else float(values["lam"])}


@register_part
@dataclass(frozen=True)
class OnlineEWCPart(Part):
    """:class:`~clreg.OnlineEWC`: one running Fisher decayed by ``gamma``."""

    name: ClassVar[str] = "online_ewc"
    data_pass: ClassVar[bool] = True
    within_rules: ClassVar[bool] = False
    per_stage: ClassVar[Mapping[str, str]] = {"lam": "lam"}
    lam: float = 1.0
    gamma: float = 1.0
    normalize: bool = False

    def regularizer(self, model: nn.Module, seed: int, context: PartContext) -> Regularizer:
        return OnlineEWC(model, lam=self.lam, gamma=self.gamma, seed=seed, normalize=_normalize(self.normalize))


@register_part
@dataclass(frozen=True)
class KFACEWCPart(Part):
    """:class:`~clreg.KFACEWC`: Kronecker-factored EWC."""

    name: ClassVar[str] = "kfac_ewc"
    data_pass: ClassVar[bool] = True
    within_rules: ClassVar[bool] = False
    per_stage: ClassVar[Mapping[str, str]] = {"lam": "lam"}
    lam: float = 1.0
    gamma: float = 1.0

    def regularizer(self, model: nn.Module, seed: int, context: PartContext) -> Regularizer:
        return KFACEWC(model, lam=self.lam, gamma=self.gamma, seed=seed)


@register_part
@dataclass(frozen=True)
class SIPart(Part):
    """:class:`~clreg.SI`: the path integral's importance, strength ``c``, damping ``xi``."""

    name: ClassVar[str] = "si"
    within_rules: ClassVar[bool] = False
    per_stage: ClassVar[Mapping[str, str]] = {"c": "c"}
    c: float = 0.1
    xi: float = 1e-3

    def regularizer(self, model: nn.Module, seed: int, context: PartContext) -> Regularizer:
        return SI(model, c=self.c, xi=self.xi)

    @classmethod
    def first_stage_tracker(cls, model: nn.Module) -> Regularizer:
        return SI(model)

    def take_over(self, reg: Regularizer, state: Mapping[str, Any]) -> None:
        reg.load_state_dict(state)
        reg.c, reg.xi = self.c, self.xi  # type: ignore[assignment]


@register_part
@dataclass(frozen=True)
class RWalkPart(Part):
    """:class:`~clreg.RWalk`: EWC++'s running Fisher plus the path score."""

    name: ClassVar[str] = "rwalk"
    within_rules: ClassVar[bool] = False
    per_stage: ClassVar[Mapping[str, str]] = {"lam": "lam"}
    lam: float = 1.0
    alpha: float = 0.1

    def regularizer(self, model: nn.Module, seed: int, context: PartContext) -> Regularizer:
        return RWalk(model, lam=self.lam, alpha=self.alpha)


@register_part
@dataclass(frozen=True)
class LwFPart(Part):
    """:class:`~clreg.LwF`: distillation of the previous model's outputs at ``temperature``."""

    name: ClassVar[str] = "lwf"
    per_stage: ClassVar[Mapping[str, str]] = {"alpha": "alpha"}
    alpha: float = 1.0
    temperature: float = 2.0

    def regularizer(self, model: nn.Module, seed: int, context: PartContext) -> Regularizer:
        return LwF(model, temperature=self.temperature, alpha=self.alpha)


@register_part
@dataclass(frozen=True)
class MASPart(Part):
    """:class:`~clreg.MAS`: output-sensitivity importance (normalised per task)."""

    name: ClassVar[str] = "mas"
    data_pass: ClassVar[bool] = True
    within_rules: ClassVar[bool] = False
    per_stage: ClassVar[Mapping[str, str]] = {"lam": "lam"}
    lam: float = 1.0

    def regularizer(self, model: nn.Module, seed: int, context: PartContext) -> Regularizer:
        return MAS(model, lam=self.lam, normalize=True)


@register_part
@dataclass(frozen=True)
class L2SPPart(Part):
    """:class:`~clreg.L2SP`: a pull toward the starting point with unit importance."""

    name: ClassVar[str] = "l2sp"
    within_rules: ClassVar[bool] = False
    per_stage: ClassVar[Mapping[str, str]] = {"alpha": "alpha"}
    alpha: float = 0.1

    def regularizer(self, model: nn.Module, seed: int, context: PartContext) -> Regularizer:
        return L2SP(model, alpha=self.alpha)


@register_part
@dataclass(frozen=True)
class ReplayPart(Part):
    """A reservoir :class:`~clreg.ReplayBuffer` of ``capacity`` samples per past task, ``per_step`` of
    them mixed into each step (split over the past tasks), each past task's loss weighted ``weight``."""

    name: ClassVar[str] = "replay"
    capacity: int = 10
    per_step: int = 8
    weight: float = 1.0

    def replay_buffer(self, seed: int) -> ReplayBuffer:
        return ReplayBuffer(self.capacity, policy="reservoir", seed=seed)


@register_part
@dataclass(frozen=True)
class DERPart(Part):
    """:class:`~clreg.DER`: a reservoir of ``capacity`` samples over the stream with the outputs at
    insertion, ``alpha`` · MSE to them on a draw of ``batch_size`` (``beta`` · CE on another draw's
    labels: DER++, see ``derpp``)."""

    name: ClassVar[str] = "der"
    within_rules: ClassVar[bool] = False
    capacity: int = 100
    alpha: float = 0.3
    beta: float = 0.0
    batch_size: int = 32

    def regularizer(self, model: nn.Module, seed: int, context: PartContext) -> Regularizer:
        if self.beta > 0:
            context.reject_selected_channels(f"{self.name} with beta > 0 (DER++)")
        return DER(
            model, self.capacity, self.alpha, self.beta, batch_size=self.batch_size, outputs=context.outputs, seed=seed
        )

    def observe(self, reg: Regularizer, inputs: Any, target: Any, outputs: Any) -> None:
        """The batch with its outputs, and its labels where DER++'s label term reads them (DER keeps
        none: the targets of a scenario's tasks may differ in structure)."""
        reg.observe(inputs, target if self.beta > 0 else None, outputs)  # type: ignore[operator]


@register_part
@dataclass(frozen=True)
class DERPPPart(DERPart):
    """DER++: :class:`~clreg.DER` with the label term on (``beta`` > 0)."""

    name: ClassVar[str] = "derpp"
    beta: float = 0.5


@register_part
@dataclass(frozen=True)
class ERACEPart(Part):
    """:class:`~clreg.ERACE`: the incoming batch's cross-entropy over the classes present in it, plain
    cross-entropy on a reservoir draw of ``batch_size`` from ``capacity`` samples."""

    name: ClassVar[str] = "er_ace"
    within_rules: ClassVar[bool] = False
    capacity: int = 100
    batch_size: int = 32

    def regularizer(self, model: nn.Module, seed: int, context: PartContext) -> Regularizer:
        context.reject_selected_channels(self.name)
        return ERACE(model, self.capacity, batch_size=self.batch_size, seed=seed)

    def task_loss(self, reg: Regularizer, task: Task, outputs: Any, target: Any) -> Tensor:
        return reg.incoming_loss(outputs, target)  # type: ignore[operator]

    def observe(self, reg: Regularizer, inputs: Any, target: Any, outputs: Any) -> None:
        reg.observe(inputs, target)  # type: ignore[operator]


@register_part
@dataclass(frozen=True)
class AGEMPart(Part):
    """:class:`~clreg.AGEM`: the step's gradient projected when it opposes the reference gradient of a
    draw of ``sample_size`` from ``capacity`` samples per past task (each task's own loss)."""

    name: ClassVar[str] = "agem"
    within_rules: ClassVar[bool] = False
    capacity: int = 20
    sample_size: int = 64

    def regularizer(self, model: nn.Module, seed: int, context: PartContext) -> Regularizer:
        losses = {k: _task_loss(t) for k, t in enumerate(context.tasks)}
        return AGEM(model, losses, capacity_per_task=self.capacity, sample_size=self.sample_size, seed=seed)


def _task_loss(task: Task) -> Any:
    return lambda model, inputs, target: task.loss(model(inputs), target)


@register_part
@dataclass(frozen=True)
class FeatureDistillationPart(Part):
    """:class:`~clreg.FeatureDistillation` of the scenario's feature modules (``kind="l2"``), weight
    ``alpha``: distillation from the previous checkpoint, one of the one-head challenge's remedies."""

    name: ClassVar[str] = "fd"
    per_stage: ClassVar[Mapping[str, str]] = {"alpha": "alpha"}
    alpha: float = 1.0

    def regularizer(self, model: nn.Module, seed: int, context: PartContext) -> Regularizer:
        if not context.feature_modules:
            raise ValueError("fd needs the scenario's feature modules (Scenario.feature_modules)")
        return FeatureDistillation(model, list(context.feature_modules), kind="l2", alpha=self.alpha)

    def watch(self, reg: Regularizer, model: nn.Module) -> AbstractContextManager:
        return reg.watch(model)  # type: ignore[operator, return-value]
