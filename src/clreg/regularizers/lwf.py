r"""Learning without Forgetting (Li & Hoiem, 2016).

The teacher is the model at the last consolidation, run in eval mode without gradients through
``torch.func.functional_call`` on its saved parameters and buffers (kept as this module's state, not
a copy of the user's module). For each distilled output (an :class:`~clreg.OutputSpec`):

.. math:: P = \alpha \sum_{\text{outputs}} \ell_{\text{kind}}(\text{student}, \text{teacher})

with ℓ from :mod:`clreg.functional.distillation`: T²·KL at temperature T for softmax outputs
(``t_squared=False`` drops the T²), binary KL for sigmoid outputs, L2 / L1 for regression outputs
with an optional per-location weight. Each is summed over channels and averaged over locations and
batch.

The outputs distilled are those given at construction (``outputs=``) or, when none are given, the
outputs of every task consolidated so far (from its :class:`~clreg.TaskSpec`).

Example:
    >>> import torch, clreg
    >>> model = torch.nn.Linear(4, 3)
    >>> lwf = clreg.LwF(model, temperature=2.0)
    >>> lwf.consolidate(model)
    >>> x = torch.randn(5, 4)
    >>> lwf(model, inputs=x, outputs=model(x)).item()   # the student equals the teacher
    0.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._params import ParamSelector, canonical_name, unwrap_model
from .._sharding import fsdp_modules, reshard_all, swapped_into
from ..data import call_model, functional_call_model
from ..functional._per_sample import eval_mode
from ..functional.distillation import regression_distillation, sigmoid_distillation, softmax_distillation
from ..spec import OutputSpec, TaskSpec, select_output, select_tensor
from .base import Hyperparameter, Regularizer

__all__ = ["LwF"]

_OUTPUT_KEYS = ("task_outputs", "task_outputs_callable")


class LwF(Regularizer):
    """Distillation from the model at the last consolidation.

    Args:
        model: the model (DDP / compiled wrappers are looked through).
        temperature: T > 0 for softmax outputs.
        alpha: α ≥ 0, the weight of the distillation term.
        t_squared: multiply softmax terms by T² (Hinton et al., 2015), keeping gradient scale.
        outputs: the outputs to distil; default: those of the consolidated tasks' specs.
        eps: the floor of Σw for weighted regression outputs.
        teacher_params: ``"all"`` (default): the teacher keeps a copy of every parameter;
            ``"selected"``: only of the selected ones (``params``, by default the trainable ones), the
            others read from the model itself, so they must stay frozen: a PEFT model's base weights,
            whose adapter alone trains (a ValueError if an unselected parameter requires grad).

    State: ``teacher_params`` (every parameter of the model, or the selected ones; sharded like the
    parameters under FSDP2) and ``teacher_buffers`` (every buffer: the teacher runs the whole model;
    replicated, as FSDP keeps buffers). The saved record holds the
    ``hyperparameters`` and the outputs of the consolidated tasks.
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
        eps: float = 1e-8,
        params: ParamSelector = None,
        teacher_params: str = "all",
    ) -> None:
        super().__init__(model, params)
        if teacher_params not in ("all", "selected"):
            raise ValueError(f"teacher_params must be 'all' or 'selected', got {teacher_params!r}")
        self.temperature, self.alpha, self.t_squared, self.eps = temperature, alpha, bool(t_squared), eps
        if isinstance(outputs, OutputSpec):
            outputs = (outputs,)
        self._fixed_outputs = tuple(outputs) if outputs is not None else None
        self._task_outputs: list[OutputSpec] = []
        inner = unwrap_model(model)
        reshard_all(inner)
        named_p = [(n, p) for n, p in inner.named_parameters()]
        self._teacher_all = teacher_params == "all"
        if not self._teacher_all:
            named_p = self._selected_only(named_p)
        named_b = [(n, b) for n, b in inner.named_buffers()]
        self._p_names = [n for n, _ in named_p]
        self._b_names = [n for n, _ in named_b]
        self.add_state("teacher_params", {canonical_name(n): torch.zeros_like(p.detach()) for n, p in named_p})
        self.add_state("teacher_buffers", {canonical_name(n): torch.zeros_like(b) for n, b in named_b})

    def _selected_only(self, named: list[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
        chosen = set(self.param_names)
        live = [n for n, p in named if canonical_name(n) not in chosen and p.requires_grad]
        if live:
            raise ValueError(
                f"LwF(teacher_params='selected'): {len(live)} parameters outside the selection train "
                f"(e.g. {live[0]!r}), and the teacher would read them from the trained model: freeze them or select them"
            )
        return [(n, p) for n, p in named if canonical_name(n) in chosen]

    temperature = Hyperparameter(low_open=True, doc="T > 0 for softmax outputs.")

    alpha = Hyperparameter(doc="α ≥ 0, the weight of the distillation term.")

    @property
    def outputs(self) -> tuple[OutputSpec, ...]:
        """The outputs distilled."""
        if self._fixed_outputs is not None:
            return self._fixed_outputs
        return tuple(self._task_outputs) or (OutputSpec(),)

    def _config(self) -> dict[str, Any]:
        cfgs = [o.to_config() for o in self._task_outputs]
        return {
            **super()._config(),
            "task_outputs": [c for c in cfgs if c is not None],
            "task_outputs_callable": sum(c is None for c in cfgs),
        }

    def _set_config(self, config: dict[str, Any]) -> None:
        super()._set_config({k: v for k, v in config.items() if k not in _OUTPUT_KEYS})
        if config.get("task_outputs_callable") and self._fixed_outputs is None:
            raise ValueError(
                "this LwF state distils outputs chosen by callables, which a checkpoint cannot hold: "
                "build the LwF with outputs=[OutputSpec(...)] before loading it"
            )
        self._task_outputs = [OutputSpec.from_config(c) for c in config.get("task_outputs", [])]

    # -- the teacher ------------------------------------------------------------------------------
    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        """The teacher becomes the current model; the task's outputs join those distilled."""
        inner = unwrap_model(model)
        reshard_all(inner)  # FSDP2: the parameters as shards (the root keeps its own whole after a forward)
        params = dict(inner.named_parameters())
        buffers = dict(inner.named_buffers())
        names = list(params) if self._teacher_all else [n for n in params if n in set(self._p_names)]
        if names != self._p_names or list(buffers) != self._b_names:
            raise ValueError(
                "LwF.consolidate: the model's parameters or buffers differ from the model LwF was built on"
            )
        for name, dst in zip(self._p_names, self.teacher_params.tensors):
            if params[name].shape != dst.shape:
                raise ValueError(f"LwF.consolidate: parameter {name!r} changed shape")
        with torch.no_grad():
            self.teacher_params.set([params[n].detach() for n in self._p_names])
            self.teacher_buffers.set([buffers[n] for n in self._b_names])
        if spec is not None and self._fixed_outputs is None:
            for o in spec.outputs:
                if o not in self._task_outputs:
                    self._task_outputs.append(o)
        self._bump_tasks()

    def teacher(self, model: nn.Module, inputs: Any) -> Any:
        """The teacher's outputs on ``inputs`` (eval mode, no gradients). A model sharded by FSDP2 runs
        its own forward with the teacher's shards copied into its parameters for the call
        (:func:`~clreg._sharding.swapped_into`), so FSDP gathers them a module at a time."""
        inner = unwrap_model(model)
        params = dict(zip(self._p_names, self.teacher_params.tensors))
        buffers = dict(zip(self._b_names, self.teacher_buffers.tensors))
        if fsdp_modules(inner):
            with torch.no_grad(), eval_mode(inner), swapped_into(inner, params, buffers):
                return call_model(inner, inputs)
        with torch.no_grad(), eval_mode(inner):
            return functional_call_model(inner, {**params, **buffers}, inputs, strict=self._teacher_all)

    # -- the loss ---------------------------------------------------------------------------------
    def forward(self, model: nn.Module, inputs: Any = None, outputs: Any = None) -> Tensor:
        """α Σ distillation(student, teacher) over the distilled outputs; needs ``inputs``."""
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
        for o in self.outputs:
            s = select_tensor(outputs, o.select)
            t = select_tensor(teacher_out, o.select)
            total = total + self._term(o, s, t, teacher_out)
        value = self._alpha * total
        self.last_value = value.detach()
        return value

    def _term(self, o: OutputSpec, s: Tensor, t: Tensor, teacher_out: Any) -> Tensor:
        if o.kind == "softmax":
            return softmax_distillation(
                s, t, self._temperature, channels=o.channels, t_squared=self.t_squared, class_dim=o.class_dim
            )
        if o.kind == "sigmoid":
            return sigmoid_distillation(s, t, channels=o.channels)
        weight = None
        if o.weight is not None:
            w = o.weight(teacher_out) if callable(o.weight) else select_output(teacher_out, o.weight)
            if not isinstance(w, Tensor):
                raise ValueError(f"LwF weight for output {o.select!r} must be a Tensor, got {type(w).__name__}")
            weight = w
        return regression_distillation(s, t, weight=weight, channels=o.channels, norm=o.norm, eps=self.eps)
