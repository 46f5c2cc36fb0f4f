r"""Feature distillation: intermediate features pulled to those of the model at the last consolidation.

For the named modules m (their outputs, batch first), with the student's features :math:`s_m` from the
current model and the teacher's :math:`t_m` from the model at the last consolidation, both on the
batch's inputs,

.. math:: P = \alpha \sum_m w_m \, \ell_{\text{kind}}(s_m, t_m),

with ℓ from :mod:`clreg.functional.feature_distillation` (each averaged over the batch):

* ``kind="l2"``: LFL (Jung et al., 2016), :math:`\lVert s_b - t_b \rVert_2^2` summed over each
  sample's flattened feature (no ½);
* ``kind="cosine"``: LUCIR's less-forget term (Hou et al., CVPR 2019),
  :math:`1 - \cos(s_b, t_b)` of the flattened, L2-normalised features;
* ``kind="pod"``: PODNet's POD-spatial (Douillard et al., ECCV 2020) on (B, C, H, W) maps: the width-
  and height-pooled sums (of the squared activations by default, ``square``) concatenated,
  L2-normalised per sample and compared by their Euclidean distance, not squared (``normalize=True``,
  the authors' released implementation); ``square=False, normalize=False`` is the paper's equations
  instead (the raw poolings' squared distance).

``modules`` as a list weighs each module :math:`w_m = 1/M` (the mean over the M modules: PODNet's
:math:`\frac{1}{L-1}\sum_\ell` over its stages; LFL and LUCIR distil one module, :math:`w = 1`); as
a mapping ``{name: weight}``, the weights as given.

**The teacher** is the model at the last consolidation, kept as this module's state (every parameter
and buffer, as :class:`~clreg.LwF` keeps its teacher; never a copy of the user's module) and run
through the user's module in eval mode without gradients (:func:`torch.func.functional_call`; under
FSDP2 the model's own forward with the teacher's shards swapped in). Its features come from forward
hooks on the named modules during that call. Before the first consolidation the value is a zero tensor.

**The student's features** come from forward hooks on the named modules too. Two ways:

* ``with reg.watch(model): out = model(x)`` records them during the forward the loop already runs
  (no extra cost); ``reg(model, inputs=x, outputs=out)`` then takes them. The hooks record forwards
  run with gradients enabled (not an evaluation under ``torch.no_grad()``, nor a teacher's forward),
  the last forward's features being kept, and the next call of the regularizer takes and clears them;
  the watched forward must be the one on ``inputs`` (a shape mismatch with the teacher's features is a
  ValueError);
* otherwise (nothing recorded) the regularizer runs the student's forward once more on ``inputs``, on
  the unwrapped model: one more forward and its backward per step, and in train mode a second
  update of BatchNorm statistics and another dropout mask. :class:`~clreg.Compose` and
  :func:`clreg.testing.check_regularizer`, which only call ``reg(...)``, work this way.

A named module's output must be a tensor (a ValueError names the module and what it gave: name a
submodule whose output is the tensor to distil). A module that runs several times in one forward
gives its last output, for the student and the teacher alike. An in-place operation after a module
(``ReLU(inplace=True)`` after a BatchNorm) changes the recorded output too: name the module after it.

The teacher runs in eval mode; a student in train mode differs from it through BatchNorm's batch
statistics and dropout, so the value is 0 at a consolidation only for a student run in eval mode (or
without such layers). No closed-form gradient: autograd mode only, like :class:`~clreg.LwF`.

Example:
    >>> import torch
    >>> from clreg.regularizers.feature_distillation import FeatureDistillation
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> fd = FeatureDistillation(model, modules=["1"], kind="l2", alpha=0.5)
    >>> fd.consolidate(model)
    >>> x = torch.randn(5, 4)
    >>> with fd.watch(model):
    ...     out = model(x)
    >>> fd(model, inputs=x, outputs=out).item()   # the student equals the teacher
    0.0
    >>> FeatureDistillation(model, modules=["1.tanh"])
    Traceback (most recent call last):
    ...
    ValueError: FeatureDistillation: the model has no module '1.tanh'; close names: ['1', '0', '2']
"""

from __future__ import annotations

import difflib
import logging
import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._params import ParamSelector, unwrap_model
from .._sharding import fsdp_modules
from ..data import call_model
from ..functional.feature_distillation import FEATURE_KINDS, feature_distillation
from ..spec import TaskSpec
from ._teacher import TEACHER_PARAMS, Teacher
from .base import Hyperparameter, Regularizer, check_range

__all__ = ["FeatureDistillation", "FeatureWatch"]

log = logging.getLogger("clreg")

_CONFIG_KEYS = ("kind", "modules", "square", "normalize")

Modules = str | Sequence[str] | Mapping[str, float]
"""Module names (each weighted 1/M) or a mapping name → weight."""


class FeatureDistillation(Regularizer):
    """Distillation of named modules' outputs from the model at the last consolidation.

    Args:
        model: the model (DDP / compiled wrappers are looked through; FSDP2 models are run as
            :class:`~clreg.LwF` runs them).
        modules: names of submodules (as in ``model.named_modules()``) whose outputs are distilled: a
            name, a list (each weighted 1/M) or a mapping ``{name: weight ≥ 0}``.
        kind: ``"l2"`` (LFL), ``"cosine"`` (LUCIR) or ``"pod"`` (PODNet's POD-spatial); see the module.
        alpha: α ≥ 0, the weight of the whole term.
        square: ``"pod"`` only (given with another kind: a ValueError): pool the squared activations
            (default ``True``, as PODNet's released implementation does) or the activations (``False``,
            as the paper's equations do).
        normalize: ``"pod"`` only, likewise: L2-normalise the poolings and take the not-squared distance (default
            ``True``, the released implementation) or take the raw poolings' squared distance
            (``False``, the paper's equations).
        eps: ε > 0, the floor of a norm in ``"cosine"`` and ``"pod"``'s normalisations.
        params: the parameters checked against the model at each call (names and shapes), and with
            ``teacher_params="selected"`` those the teacher copies.
        teacher_params: ``"all"`` (default): the teacher keeps a copy of every parameter;
            ``"selected"``: only of the selected ones, the others read from the model, so they must stay
            frozen (a PEFT model's base weights).

    State: ``teacher_params`` and ``teacher_buffers`` (the model at the last consolidation; sharded like
    the parameters under FSDP2), the number of tasks, and in the saved record ``alpha``, ``kind``, the
    modules with their weights, ``square`` and ``normalize`` (a loaded state brings its own).
    """

    hyperparameters = ("alpha",)

    def __init__(
        self,
        model: nn.Module,
        modules: Modules,
        kind: str = "l2",
        alpha: float = 1.0,
        *,
        square: bool | None = None,
        normalize: bool | None = None,
        eps: float = 1e-12,
        params: ParamSelector = None,
        teacher_params: str = "all",
    ) -> None:
        super().__init__(model, params)
        if teacher_params not in TEACHER_PARAMS:
            raise ValueError(f"teacher_params must be one of {TEACHER_PARAMS}, got {teacher_params!r}")
        self.alpha, self.kind = alpha, kind
        self.square = _pod_option("square", square, kind)
        self.normalize = _pod_option("normalize", normalize, kind)
        self.eps = check_range("eps", eps, low_open=True)
        self._weights = module_weights(modules)
        self._modules_of(model)  # every name is a module of the model
        selected = self.param_names if teacher_params == "selected" else None
        self._teacher = Teacher(type(self).__name__, model, selected)
        params_0, buffers_0 = self._teacher.templates(model)
        self.add_state("teacher_params", params_0)
        self.add_state("teacher_buffers", buffers_0)
        self._student: dict[str, Tensor] = {}
        self._told_second_forward = False

    alpha = Hyperparameter(doc="α ≥ 0, the weight of the distillation term.")

    @property
    def kind(self) -> str:
        """``"l2"``, ``"cosine"`` or ``"pod"``."""
        return self._kind

    @kind.setter
    def kind(self, value: str) -> None:
        if value not in FEATURE_KINDS:
            raise ValueError(f"FeatureDistillation kind must be one of {FEATURE_KINDS}, got {value!r}")
        self._kind = value

    @property
    def module_weights(self) -> dict[str, float]:
        """The distilled modules and their weights w_m, in order."""
        return dict(self._weights)

    # -- the saved record -------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "kind": self._kind,
            "modules": [[name, w] for name, w in self._weights.items()],
            "square": self.square,
            "normalize": self.normalize,
        }

    def _set_config(self, config: dict[str, Any]) -> None:
        super()._set_config({k: v for k, v in config.items() if k not in _CONFIG_KEYS})
        self.kind = config.get("kind", self._kind)
        if "modules" in config:
            self._weights = module_weights({str(n): float(w) for n, w in config["modules"]})
        self.square = bool(config.get("square", self.square))
        self.normalize = bool(config.get("normalize", self.normalize))

    # -- the hooks --------------------------------------------------------------------------------
    def _modules_of(self, model: nn.Module) -> dict[str, nn.Module]:
        """The named modules on ``model`` (unwrapped); a ValueError naming one that is missing."""
        inner = unwrap_model(model)
        found = {}
        for name in self._weights:
            try:
                found[name] = inner.get_submodule(name)
            except AttributeError:
                tensors = {n for n, _ in (*inner.named_parameters(), *inner.named_buffers())}
                hint = f" ({name!r} is a parameter or buffer: name its module)" if name in tensors else ""
                raise ValueError(
                    f"{type(self).__name__}: the model has no module {name!r}{hint}; "
                    f"close names: {close_names(inner, name)}"
                ) from None
        return found

    def watch(self, model: nn.Module) -> FeatureWatch:
        """Record the named modules' outputs during the forwards of ``model`` run with gradients
        enabled, for the next call of this regularizer: a handle, used as a context manager or removed
        with ``.remove()``.

        Example:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
            >>> fd = FeatureDistillation(model, modules="1", kind="cosine")
            >>> fd.consolidate(model)
            >>> x = torch.randn(6, 4)
            >>> with fd.watch(model):
            ...     out = model(x)
            >>> loss = out.logsumexp(1).mean() + fd(model, inputs=x, outputs=out)
        """
        return FeatureWatch(self, self._modules_of(model))

    def _record(self, name: str, output: Any) -> None:
        """A watched module ran: keep its output if gradients are enabled (the training forward)."""
        if torch.is_grad_enabled():
            self._student[name] = _as_feature(type(self).__name__, name, output)

    def teacher_features(self, model: nn.Module, inputs: Any) -> dict[str, Tensor]:
        """The teacher's features on ``inputs``: the named modules' outputs during its forward (eval
        mode, no gradients)."""
        sink: dict[str, Tensor] = {}
        with _recording(type(self).__name__, self._modules_of(model), sink):
            self._teacher(model, self.teacher_params, self.teacher_buffers, inputs)
        return sink

    def student_features(self, model: nn.Module, inputs: Any) -> dict[str, Tensor]:
        """The student's features from a forward of ``model`` (unwrapped) on ``inputs``, in its current
        mode: what a call does when nothing was watched."""
        sink: dict[str, Tensor] = {}
        with _recording(type(self).__name__, self._modules_of(model), sink):
            call_model(unwrap_model(model), inputs)
        return sink

    # -- the loss ---------------------------------------------------------------------------------
    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        """The teacher becomes the current model (``data`` and ``spec`` are not used)."""
        self._teacher.snapshot(model, self.teacher_params, self.teacher_buffers)
        self._student = {}
        self._bump_tasks()
        self._state_changed()

    def forward(self, model: nn.Module, inputs: Any = None, outputs: Any = None) -> Tensor:
        """α Σ_m w_m ℓ(student_m, teacher_m); needs ``inputs`` (``outputs`` is not used: the features
        come from the watched forward or from a second one)."""
        student, self._student = self._student, {}
        try:
            value = self._value(model, inputs, student)
        finally:
            self._student = {}  # what a second forward recorded, or a failed call left
        self.last_value = value.detach()
        return value

    def _value(self, model: nn.Module, inputs: Any, student: dict[str, Tensor]) -> Tensor:
        if self._n_tasks_py == 0:
            return self._zero()
        if inputs is None:
            raise ValueError(f"{type(self).__name__} needs the batch's inputs: reg(model, inputs=x, outputs=out)")
        self._resolve(model)  # the model it was built on: its parameters' names and shapes are checked
        if not student:
            self._second_forward_allowed(model)
            student = self.student_features(model, inputs)
        missing = [name for name in self._weights if name not in student]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: modules {missing} did not run in the watched forward "
                f"(recorded: {sorted(student)})"
            )
        teacher = self.teacher_features(model, inputs)
        return self._alpha * feature_distillation(
            student, teacher, self._kind, self._weights, square=self.square, normalize=self.normalize, eps=self.eps
        )

    def _second_forward_allowed(self, model: nn.Module) -> None:
        """A ValueError under FSDP2, whose modules cannot run a second forward before the backward (they
        reshard after the first); else a note, once, that the student's forward runs twice."""
        if fsdp_modules(unwrap_model(model)):
            raise ValueError(
                f"{type(self).__name__} on a model sharded by FSDP2 needs the student's features from the "
                "loop's own forward: run it inside reg.watch(model) (FSDP2 cannot run a second forward "
                "before the backward)"
            )
        if not self._told_second_forward:
            self._told_second_forward = True
            log.info(
                "%s: no watched forward; running the student's forward a second time "
                "(wrap the loop's forward in reg.watch(model) to avoid it)",
                type(self).__name__,
            )


class FeatureWatch:
    """Forward hooks that record a :class:`FeatureDistillation`'s modules for its next call; removed by
    :meth:`remove` or on leaving a ``with`` block. The hooks hold the regularizer weakly."""

    def __init__(self, reg: FeatureDistillation, modules: Mapping[str, nn.Module]) -> None:
        ref = weakref.ref(reg)

        def hook(name: str) -> Any:
            def record(module: nn.Module, args: Any, output: Any) -> None:
                owner = ref()
                if owner is not None:
                    owner._record(name, output)

            return record

        self._handles: list[RemovableHandle] = [m.register_forward_hook(hook(n)) for n, m in modules.items()]

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> FeatureWatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


@contextmanager
def _recording(owner: str, modules: Mapping[str, nn.Module], sink: dict[str, Tensor]) -> Iterator[None]:
    """Every output of the modules into ``sink`` (whatever the grad mode) while the block runs."""

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            sink[name] = _as_feature(owner, name, output)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _pod_option(name: str, value: bool | None, kind: str) -> bool:
    """A ``"pod"`` option: ``None`` is its default (``True``); a value given for another kind is a
    ValueError, a value that is not a bool a TypeError."""
    if value is None:
        return True
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if kind != "pod":
        raise ValueError(f"{name} applies to kind='pod' only, got kind={kind!r}")
    return value


def _as_feature(owner: str, name: str, output: Any) -> Tensor:
    if not isinstance(output, Tensor):
        raise ValueError(
            f"{owner}: module {name!r} returned a {type(output).__name__}, not a tensor: name a submodule "
            "whose output is the tensor to distil"
        )
    return output


def close_names(model: nn.Module, name: str, n: int = 6) -> list[str]:
    """Names of ``model``'s modules near ``name``, at most ``n``: the most similar (``difflib``), then
    its deepest existing parent, the parent's children and the parent's siblings."""
    names = [m for m, _ in model.named_modules() if m]
    parts = name.split(".")
    parent = next((".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1) if ".".join(parts[:k]) in names), "")
    children = [m for m in names if m.rpartition(".")[0] == parent]
    siblings = [m for m in names if parent and m.rpartition(".")[0] == parent.rpartition(".")[0]]
    similar = difflib.get_close_matches(name, names, n=n, cutoff=0.4)
    return list(dict.fromkeys([*similar, *([parent] if parent else []), *children, *siblings]))[:n]


def module_weights(modules: Modules) -> dict[str, float]:
    """``modules`` as ``{name: weight}``: a name or a list of names each weighted 1/M, a mapping as given
    (weights finite and ≥ 0). A ValueError for none, a repeated name or a bad weight."""
    if isinstance(modules, str):
        modules = [modules]
    if isinstance(modules, Mapping):
        weights = {name: check_range(f"the weight of module {name!r}", w) for name, w in modules.items()}
    elif isinstance(modules, Sequence):
        repeated = sorted({n for n in modules if list(modules).count(n) > 1})
        if repeated:
            raise ValueError(f"modules are named more than once: {repeated}")
        weights = {name: 1.0 / len(modules) for name in modules}
    else:
        raise TypeError(
            f"modules must be a name, a list of names or a mapping name -> weight, got {type(modules).__name__}"
        )
    bad = [n for n in weights if not isinstance(n, str)]
    if bad:
        raise TypeError(f"module names must be str, got {bad[0]!r}")
    if not weights:
        raise ValueError("FeatureDistillation needs at least one module")
    if any(math.isinf(w) for w in weights.values()):
        raise ValueError(f"module weights must be finite, got {weights}")
    return weights
