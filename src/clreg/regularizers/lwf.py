r"""Learning without Forgetting (Li & Hoiem, 2016).

The teacher is the model at the last consolidation, run in eval mode without gradients through
``torch.func.functional_call`` on its saved parameters and buffers (kept as this module's state, not
a copy of the user's module). For each distilled output (an :class:`~clreg.OutputSpec`):

.. math:: P = \alpha \sum_{\text{terms}} \ell_{\text{kind}}(\text{student}[S], \text{teacher}[S])

with ℓ from :mod:`clreg.functional.distillation`: T²·KL at temperature T for softmax outputs
(``t_squared=False`` drops the T²), binary KL for sigmoid outputs, L2 / L1 for regression outputs
with an optional per-location weight. Each is summed over the channels S of its term and averaged over
locations and batch; a softmax is taken over S alone.

The terms come from the consolidated tasks only (the current task is never distilled). Each
consolidation records, per output of its :class:`~clreg.TaskSpec`, the classes C_k of task k: the
spec's ``channels`` if given, else the classes its data's labels show (a softmax output over dim 1),
else every channel. ``form`` says how the tasks' classes make terms, per distinct output:

* ``"seen"`` (default; the paper's LwF for a shared output): one term over
  :math:`S = \bigcup_{k<t} C_k`, the classes of the tasks before the current one t;
* ``"per_task"``: one term per task, :math:`S = C_k` (each old head on its own softmax);
* ``"all"``: one term over every channel.

``outputs=`` given at construction overrides all of this: exactly those outputs are distilled.

Example:
    >>> import torch, clreg
    >>> model = torch.nn.Linear(4, 3)
    >>> lwf = clreg.LwF(model, temperature=2.0)
    >>> lwf.consolidate(model)
    >>> x = torch.randn(5, 4)
    >>> lwf(model, inputs=x, outputs=model(x)).item()   # the student equals the teacher
    0.0

The forms, after two tasks with labels {0, 1} and {2, 3} on a ten-way output:
    >>> model = torch.nn.Linear(4, 10)
    >>> lwf = clreg.LwF(model)
    >>> for labels in ([0, 1], [2, 3]):
    ...     task = torch.utils.data.TensorDataset(torch.randn(4, 4), torch.tensor(labels * 2))
    ...     lwf.consolidate(model, task, clreg.TaskSpec())
    >>> [o.channels for o in lwf.outputs]   # "seen": one term over the classes seen so far
    [(0, 1, 2, 3)]
    >>> lwf.form = "per_task"
    >>> [o.channels for o in lwf.outputs]
    [(0, 1), (2, 3)]
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .._params import ParamSelector
from ..data import call_model, iter_chunks
from ..distributed import all_gather_objects, is_distributed
from ..functional.distillation import regression_distillation, sigmoid_distillation, softmax_distillation
from ..functional.fisher import target_of
from ..spec import OutputSpec, TaskSpec, select_output, select_tensor
from ._teacher import TEACHER_PARAMS, Teacher
from .base import Hyperparameter, Regularizer

__all__ = ["FORMS", "LwF", "classes_seen", "terms_of"]

log = logging.getLogger("clreg")

FORMS = ("seen", "per_task", "all")
"""LwF's forms: which classes of each consolidated output are distilled (see the module)."""

_CONFIG_KEYS = ("form", "task_outputs", "task_seen", "task_outputs_callable")
_CHUNK = 64

Classes = tuple[int, ...] | None
"""Channel indices, sorted for classes seen; ``None`` for every channel (or, as seen, for none known)."""
Entry = tuple[OutputSpec, Classes]
"""A consolidated task's output and the classes its data showed for it."""
Term = tuple[OutputSpec, Classes]
"""One distillation term: an output (``channels`` unset) and the channels it is over."""


class LwF(Regularizer):
    """Distillation from the model at the last consolidation.

    Args:
        model: the model (DDP / compiled wrappers are looked through).
        temperature: T > 0 for softmax outputs.
        alpha: α ≥ 0, the weight of the distillation term.
        t_squared: multiply softmax terms by T² (Hinton et al., 2015), keeping gradient scale.
        outputs: the outputs to distil; default: those of the consolidated tasks' specs.
        form: ``"seen"`` (default), ``"per_task"`` or ``"all"``: the classes of the consolidated
            tasks' outputs that are distilled (see the module); unused with ``outputs``.
        eps: the floor of Σw for weighted regression outputs.
        teacher_params: ``"all"`` (default): the teacher keeps a copy of every parameter;
            ``"selected"``: only of the selected ones (``params``, by default the trainable ones), the
            others read from the model itself, so they must stay frozen: a PEFT model's base weights,
            whose adapter alone trains (a ValueError if an unselected parameter requires grad).

    State: ``teacher_params`` (every parameter of the model, or the selected ones; sharded like the
    parameters under FSDP2) and ``teacher_buffers`` (every buffer: the teacher runs the whole model;
    replicated, as FSDP keeps buffers). The saved record holds the ``hyperparameters``, the ``form``
    (a loaded state brings its own, as it brings its hyperparameters) and each consolidated task's
    outputs with the classes seen (``task_outputs``, ``task_seen``).
    """

    hyperparameters = ("temperature", "alpha", "t_squared")

    def __init__(
        self,
        model: nn.Module,
        temperature: float = 2.0,
        alpha: float = 1.0,
        *,
        t_squared: bool = True,
        outputs: OutputSpec | Sequence[OutputSpec] | None = None,
        form: str = "seen",
        eps: float = 1e-8,
        params: ParamSelector = None,
        teacher_params: str = "all",
    ) -> None:
        super().__init__(model, params)
        if teacher_params not in TEACHER_PARAMS:
            raise ValueError(f"teacher_params must be 'all' or 'selected', got {teacher_params!r}")
        self.temperature, self.alpha, self.t_squared, self.eps = temperature, alpha, bool(t_squared), eps
        if isinstance(outputs, OutputSpec):
            outputs = (outputs,)
        self._fixed_outputs = tuple(outputs) if outputs is not None else None
        self._entries: list[Entry] = []
        self._terms_cache: list[Term] | None = None
        self._index_cache: dict[tuple[int, int, torch.device], Tensor | None] = {}
        self.form = form
        selected = self.param_names if teacher_params == "selected" else None
        self._teacher = Teacher("LwF", model, selected)
        params_0, buffers_0 = self._teacher.templates(model)
        self.add_state("teacher_params", params_0)
        self.add_state("teacher_buffers", buffers_0)

    temperature = Hyperparameter(low_open=True, doc="T > 0 for softmax outputs.")

    alpha = Hyperparameter(doc="α ≥ 0, the weight of the distillation term.")

    @property
    def form(self) -> str:
        """``"seen"``, ``"per_task"`` or ``"all"``: which classes of the consolidated outputs are distilled."""
        return self._form

    @form.setter
    def form(self, value: str) -> None:
        if value not in FORMS:
            raise ValueError(f"LwF form must be one of {FORMS}, got {value!r}")
        self._form = value
        self._state_changed()

    @property
    def outputs(self) -> tuple[OutputSpec, ...]:
        """The outputs distilled, one per term, each with the channels its term is over (``None``:
        all; classes that cover every channel give the whole output's term)."""
        if self._fixed_outputs is not None:
            return self._fixed_outputs
        return tuple(replace(o, channels=classes) for o, classes in self._terms)

    @property
    def _terms(self) -> list[Term]:
        """The terms, computed once per consolidation, load or change of ``form``."""
        if self._terms_cache is None:
            if self._fixed_outputs is not None:
                self._terms_cache = [(replace(o, channels=None), o.channels) for o in self._fixed_outputs]
            else:
                self._terms_cache = terms_of(self._entries, self._form) or [(OutputSpec(), None)]
        return self._terms_cache

    def _state_changed(self) -> None:
        super()._state_changed()
        self._terms_cache = None
        self._index_cache = {}
        if "_entries" in self.__dict__:  # built here, outside any compiled step that calls the LwF later
            _ = self._terms

    def _cache_tensors(self) -> list[Tensor]:
        return [*super()._cache_tensors(), *(t for t in self._index_cache.values() if t is not None)]

    # -- the saved record -------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        saved = [(o.to_config(), seen) for o, seen in self._entries]
        return {
            **super()._config(),
            "form": self._form,
            "task_outputs": [c for c, _ in saved if c is not None],
            "task_seen": [None if s is None else list(s) for c, s in saved if c is not None],
            "task_outputs_callable": sum(c is None for c, _ in saved),
        }

    def _set_config(self, config: dict[str, Any]) -> None:
        """Also reads a record saved before ``form`` and ``task_seen`` existed: its tasks' classes are
        unknown (every channel), its form this module's."""
        super()._set_config({k: v for k, v in config.items() if k not in _CONFIG_KEYS})
        if config.get("task_outputs_callable") and self._fixed_outputs is None:
            raise ValueError(
                "this LwF state distils outputs chosen by callables, which a checkpoint cannot hold: "
                "build the LwF with outputs=[OutputSpec(...)] before loading it"
            )
        specs = [OutputSpec.from_config(c) for c in config.get("task_outputs", [])]
        seen = config.get("task_seen", [None] * len(specs))
        if len(seen) != len(specs):
            raise ValueError(f"LwF state: {len(specs)} task outputs but {len(seen)} lists of classes seen")
        self.form = config.get("form", self._form)
        self._entries = [(o, None if s is None else tuple(int(c) for c in s)) for o, s in zip(specs, seen)]
        self._state_changed()

    # -- the teacher ------------------------------------------------------------------------------
    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        """The teacher becomes the current model; the task's outputs (``spec``, default
        ``TaskSpec()``) join those distilled, each with the classes that ``data``'s labels show
        (:func:`classes_seen`: one pass over the targets)."""
        self._teacher.snapshot(model, self.teacher_params, self.teacher_buffers)
        if self._fixed_outputs is None:
            outs = (spec or TaskSpec()).outputs
            for entry in zip(outs, classes_seen(data, outs)):
                if entry not in self._entries:
                    self._entries.append(entry)
        self._bump_tasks()
        self._state_changed()

    def teacher(self, model: nn.Module, inputs: Any) -> Any:
        """The teacher's outputs on ``inputs`` (eval mode, no gradients). A model sharded by FSDP2 runs
        its own forward with the teacher's shards copied into its parameters for the call
        (:func:`~clreg._sharding.swapped_into`), so FSDP gathers them a module at a time."""
        return self._teacher(model, self.teacher_params, self.teacher_buffers, inputs)

    # -- the loss ---------------------------------------------------------------------------------
    def forward(self, model: nn.Module, inputs: Any = None, outputs: Any = None) -> Tensor:
        """α Σ distillation(student, teacher) over the terms; needs ``inputs``."""
        if self._n_tasks_py == 0:
            value = self._zero()
            self.last_value = value
            return value
        if inputs is None:
            raise ValueError("LwF needs the batch's inputs: reg(model, inputs=x, outputs=out)")
        self._resolve(model)  # the model LwF was built on: its parameters' names and shapes are checked
        if outputs is None:
            outputs = call_model(model, inputs)
        teacher_out = self.teacher(model, inputs)
        total: Tensor | float = 0.0
        for i, (o, classes) in enumerate(self._terms):
            s = select_tensor(outputs, o.select)
            t = select_tensor(teacher_out, o.select)
            total = total + self._term(o, s, t, teacher_out, self._index(i, o, classes, s))
        value = self._alpha * total
        self.last_value = value.detach()
        return value

    def _index(self, i: int, o: OutputSpec, classes: Classes, out: Tensor) -> Tensor | None:
        """Term ``i``'s channels as an index on ``out``'s device, ``None`` for all (cached)."""
        if classes is None or out.dim() < 2:
            return None
        dim = o.class_dim % out.dim() if o.kind == "softmax" else 1
        key = (i, out.shape[dim], out.device)
        if key not in self._index_cache:
            self._index_cache[key] = _channel_index(classes, out.shape[dim], out.device, o)
        return self._index_cache[key]

    def _term(self, o: OutputSpec, s: Tensor, t: Tensor, teacher_out: Any, channels: Tensor | None) -> Tensor:
        if o.kind == "softmax":
            return softmax_distillation(
                s, t, self._temperature, channels=channels, t_squared=self.t_squared, class_dim=o.class_dim
            )
        if o.kind == "sigmoid":
            return sigmoid_distillation(s, t, channels=channels)
        weight = None
        if o.weight is not None:
            w = o.weight(teacher_out) if callable(o.weight) else select_output(teacher_out, o.weight)
            if not isinstance(w, Tensor):
                raise ValueError(f"LwF weight for output {o.select!r} must be a Tensor, got {type(w).__name__}")
            weight = w
        return regression_distillation(s, t, weight=weight, channels=channels, norm=o.norm, eps=self.eps)


# -- the terms ------------------------------------------------------------------------------------
def terms_of(entries: Sequence[Entry], form: str) -> list[Term]:
    """The distillation terms of the consolidated tasks' ``entries`` under ``form`` (see the module),
    in the order the outputs were first consolidated."""
    if form not in FORMS:
        raise ValueError(f"LwF form must be one of {FORMS}, got {form!r}")
    if form == "per_task":
        terms: list[Term] = []
        for o, seen in entries:
            term = (replace(o, channels=None), _classes(o, seen))
            if term not in terms:
                terms.append(term)
        return terms
    bases: list[OutputSpec] = []
    classes: list[list[Classes]] = []
    for o, seen in entries:
        base = replace(o, channels=None)
        if base not in bases:
            bases.append(base)
            classes.append([])
        classes[bases.index(base)].append(_classes(o, seen))
    return [(base, None if form == "all" else _union(cs)) for base, cs in zip(bases, classes)]


def _classes(o: OutputSpec, seen: Classes) -> Classes:
    """A task's classes of output ``o``: its ``channels`` if given, else those seen (``None``: all)."""
    return tuple(o.channels) if o.channels is not None else seen


def _union(classes: Sequence[Classes]) -> Classes:
    """The sorted union; ``None`` (every channel) when any is ``None``."""
    if any(c is None for c in classes):
        return None
    return tuple(sorted(set().union(*classes)))


def _channel_index(classes: tuple[int, ...], n: int, device: torch.device, o: OutputSpec) -> Tensor | None:
    """``classes`` as an int64 index on ``device``; ``None`` when they are every channel in order (the
    whole output, no ``index_select``). A ValueError when one is not a channel of an ``n``-channel output."""
    if classes == tuple(range(n)):
        return None
    bad = [c for c in classes if not 0 <= c < n]
    if bad:
        raise ValueError(
            f"LwF: output {o.select!r} has {n} channels, but the classes to distil include {bad[0]} "
            f"(classes {list(classes)}): a label or channel outside [0, {n})"
        )
    return torch.tensor(classes, dtype=torch.int64, device=device)


# -- the classes a task's data shows --------------------------------------------------------------
def _inferable(o: OutputSpec) -> bool:
    """Whether labels name ``o``'s classes: a softmax over dim 1, unshifted, with no ``channels``."""
    return o.kind == "softmax" and o.class_dim == 1 and o.shift == 0 and o.channels is None


def classes_seen(data: Any, outputs: Sequence[OutputSpec]) -> list[Classes]:
    """Per output, the sorted classes that ``data``'s labels show (its ``ignore_index`` left out), or
    ``None`` where nothing is known: an output that is not a softmax over dim 1 (unshifted, no
    ``channels``), no data, a one-shot iterator (left for the other regularizers), targets that hold
    no integer labels for it (read by :func:`~clreg.functional.fisher.target_of`), or no label at all.

    One pass over the data: a ``TensorDataset`` of two tensors is read from its last tensor (no inputs
    loaded), any other ``Dataset`` item by item (this rank's share) and an iterable batch by batch;
    under torch.distributed the ranks' classes are joined. The pass leaves torch's CPU random state as
    it found it (a shuffling ``DataLoader`` draws its order from it). A negative label that is not the
    ``ignore_index`` is a ValueError."""
    found: list[set[int] | None] = [set() if _inferable(o) else None for o in outputs]
    if data is None or all(f is None for f in found) or isinstance(data, Iterator):
        return [None] * len(outputs)
    try:
        with torch.random.fork_rng(devices=[]):  # a shuffling DataLoader draws its order: the caller's RNG stays
            for targets in _targets(data):
                found = [_with_labels(f, targets, o) for f, o in zip(found, outputs)]
                if all(f is None for f in found):
                    break
    except TypeError as err:  # not (input, target) items, or not data at all
        log.info("LwF: no classes read from the consolidated data (%s); every channel is distilled", err)
        found = [None] * len(outputs)
    if is_distributed() and not _whole_targets(data):
        found = _joined_over_ranks(found)
    for f, o in zip(found, outputs):
        if f and min(f) < 0:
            raise ValueError(
                f"LwF.consolidate: the labels of output {o.select!r} include {min(f)}, which is no class: "
                f"give OutputSpec(ignore_index={min(f)}) if it marks what to ignore"
            )
    return [tuple(sorted(f)) if f else None for f in found]


def _whole_targets(data: Any) -> bool:
    return isinstance(data, TensorDataset) and len(data.tensors) == 2


def _targets(data: Any) -> Iterator[Any]:
    if _whole_targets(data):
        yield data.tensors[1]
        return
    for chunk in iter_chunks(data, _CHUNK):
        yield chunk.targets


def _with_labels(found: set[int] | None, targets: Any, o: OutputSpec) -> set[int] | None:
    """``found`` joined with the classes of ``o``'s labels in ``targets``; ``None`` when there are none."""
    if found is None:
        return None
    try:
        labels = target_of(targets, o)
    except ValueError:
        return None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return None
    values = torch.unique(labels)
    if o.ignore_index is not None:
        values = values[values != o.ignore_index]
    return found | set(values.tolist())


def _joined_over_ranks(found: list[set[int] | None]) -> list[set[int] | None]:
    """Every rank's classes joined, per output; ``None`` where any rank knows none."""
    ranks = all_gather_objects([None if f is None else sorted(f) for f in found])
    return [
        None if any(r[k] is None for r in ranks) else set().union(*(r[k] for r in ranks)) for k in range(len(found))
    ]
