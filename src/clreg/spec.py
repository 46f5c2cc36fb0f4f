"""Task and output specifications shared by ``consolidate`` and the Fisher estimators.

A :class:`TaskSpec` says which outputs of a model belong to a task, what kind each one is, and
(optionally) the task's per-sample loss. :class:`~clreg.Compose` hands the same spec to each member,
which takes what it needs.

Example:
    >>> import torch
    >>> from clreg import OutputSpec, TaskSpec, select_output
    >>> spec = TaskSpec(outputs=[OutputSpec(select="cls", kind="softmax")])
    >>> select_output({"cls": torch.zeros(2, 3)}, spec.outputs[0].select).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["KINDS", "OutputSpec", "TaskSpec", "select_output"]

KINDS = ("softmax", "sigmoid", "regression")
LABELS = ("output", "channels")
"""How labels count classes when ``OutputSpec.channels`` picks some (see :class:`OutputSpec`)."""

Selector = str | int | tuple | Callable[[Any], Tensor] | None
PerSampleLoss = Callable[[Any, Any], Tensor]


@dataclass(frozen=True)
class OutputSpec:
    """One output of a model that belongs to a task.

    Args:
        select: where the output is in the model's output: ``None`` (the output itself), a key path
            such as ``"det.heatmap"`` or ``("det", "heatmap")`` (dict keys or tuple/list indices), or a
            callable ``outputs -> Tensor``.
        kind: ``"softmax"`` (logits, classes on dim 1, e.g. (B, C) or (B, C, H, W)), ``"sigmoid"``
            (independent binary logits per channel) or ``"regression"`` (real values).
        channels: the channel indices (the class dimension, dim 1 unless ``class_dim`` says otherwise)
            that belong to the task; ``None`` for all.
        ignore_index: a label value that does not count (softmax targets only), e.g. 255.
        weight: a per-location weight for distillation of regression outputs: a key path into the
            teacher's outputs or a callable ``teacher_outputs -> Tensor[B, *locations]``.
        target: where this output's labels are in the target (for a Fisher with true or sampled
            labels); defaults to the target itself when it is a tensor, else to ``select``.
        norm: ``"l2"`` or ``"l1"``, the distance used to distil a regression output.
        class_dim: the dimension of a softmax output's classes in the batched tensor: 1 (``(B, C)``,
            ``(B, C, H, W)``) or another, e.g. ``-1`` for token logits ``(B, L, V)``; read in place,
            never transposed. The labels have the output's shape without it.
        shift: for a sequence, the labels are ``shift`` positions ahead of the logits: logits at
            positions ``[0, L - shift)`` of the first location dimension predict the labels at
            ``[shift, L)`` (1 for a causal language model, whose position t predicts token t + 1).
        labels: how a softmax output's labels count its classes when ``channels`` picks some:
            ``"output"`` (default) — a label is a class index of the whole output, so with
            ``channels=(2, 3)`` the labels are 2 and 3; ``"channels"`` — a label is a position in
            ``channels`` (0 and 1 there).
    """

    select: Selector = None
    kind: str = "softmax"
    channels: Sequence[int] | None = None
    ignore_index: int | None = None
    weight: str | tuple | Callable[[Any], Tensor] | None = None
    target: str | int | tuple | Callable[[Any], Tensor] | None = None
    norm: str = "l2"
    class_dim: int = 1
    shift: int = 0
    labels: str = "output"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"OutputSpec.kind must be one of {KINDS}, got {self.kind!r}")
        if self.norm not in ("l2", "l1"):
            raise ValueError(f"OutputSpec.norm must be 'l2' or 'l1', got {self.norm!r}")
        if self.labels not in LABELS:
            raise ValueError(f"OutputSpec.labels must be one of {LABELS}, got {self.labels!r}")
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
            if self.ignore_index is not None and self.ignore_index in self.channels:
                raise ValueError(f"OutputSpec.ignore_index {self.ignore_index} is one of the channels {self.channels}")
        if not isinstance(self.class_dim, int) or self.class_dim == 0:
            raise ValueError(f"OutputSpec.class_dim must be a non-zero int (0 is the batch), got {self.class_dim!r}")
        if not isinstance(self.shift, int) or self.shift < 0:
            raise ValueError(f"OutputSpec.shift must be an int >= 0, got {self.shift!r}")

    def to_config(self) -> dict[str, Any] | None:
        """A plain-data form for checkpoints, or ``None`` when a field is a callable."""
        if any(callable(v) for v in (self.select, self.weight, self.target)):
            return None
        return {
            "select": _plain(self.select),
            "kind": self.kind,
            "channels": None if self.channels is None else list(self.channels),
            "ignore_index": self.ignore_index,
            "weight": _plain(self.weight),
            "target": _plain(self.target),
            "norm": self.norm,
            "class_dim": self.class_dim,
            "shift": self.shift,
            "labels": self.labels,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> OutputSpec:
        kw = dict(config)
        for key in ("select", "weight", "target"):
            if isinstance(kw.get(key), list):
                kw[key] = tuple(kw[key])
        return cls(**kw)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class TaskSpec:
    """What ``consolidate`` needs to know about a task.

    Args:
        outputs: the task's outputs (see :class:`OutputSpec`).
        per_sample_loss: ``loss(outputs, target) -> Tensor[B]``, safe under ``torch.func.vmap`` with
            B = 1. When given, Fisher-based regularizers use it (an empirical Fisher of that loss);
            its normalisation is the owner's (an empirical Fisher scales with its square).
        weight: the task weight w_t ≥ 0 that scales this task's importance.
    """

    outputs: Sequence[OutputSpec] = field(default_factory=lambda: (OutputSpec(),))
    per_sample_loss: PerSampleLoss | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        outs = self.outputs
        if isinstance(outs, OutputSpec):
            outs = (outs,)
        outs = tuple(outs)
        for o in outs:
            if not isinstance(o, OutputSpec):
                raise TypeError(f"TaskSpec.outputs must hold OutputSpec items, got {type(o).__name__}")
        object.__setattr__(self, "outputs", outs)
        if not (float(self.weight) >= 0.0):
            raise ValueError(f"TaskSpec.weight must be >= 0, got {self.weight}")
        if self.per_sample_loss is not None and not callable(self.per_sample_loss):
            raise TypeError("TaskSpec.per_sample_loss must be callable: loss(outputs, target) -> Tensor[B]")


def _path(select: str | int | tuple) -> tuple:
    if isinstance(select, str):
        return tuple(int(p) if p.lstrip("-").isdigit() else p for p in select.split("."))
    if isinstance(select, int):
        return (select,)
    return tuple(select)


def select_output(outputs: Any, select: Selector) -> Any:
    """Pick one output out of a model's outputs (a tensor, dict, tuple or list, nested).

    Raises:
        ValueError: when the path does not match the outputs, naming what was there.
    """
    if select is None:
        return outputs
    if callable(select):
        return select(outputs)
    node = outputs
    for part in _path(select):
        if isinstance(node, Mapping):
            if part not in node:
                raise ValueError(
                    f"output selector {select!r}: key {part!r} not found; available keys: {sorted(map(str, node))}"
                )
            node = node[part]
        elif isinstance(node, (tuple, list)):
            if not isinstance(part, int) or not -len(node) <= part < len(node):
                raise ValueError(
                    f"output selector {select!r}: {part!r} is not an index into a sequence of {len(node)} outputs"
                )
            node = node[part]
        else:
            raise ValueError(f"output selector {select!r}: cannot index {type(node).__name__} with {part!r}")
    return node


def select_tensor(outputs: Any, select: Selector, what: str = "output") -> Tensor:
    """Like :func:`select_output` but the result must be a tensor."""
    out = select_output(outputs, select)
    if not isinstance(out, Tensor):
        raise ValueError(
            f"{what} selector {select!r} gave {type(out).__name__}, expected a Tensor; "
            "pass OutputSpec(select=...) to pick one tensor out of the model's outputs"
        )
    return out
