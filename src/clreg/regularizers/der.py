r"""Dark Experience Replay: DER and DER++ (Buzzega, Boschini, Porrello, Abati & Calderara, NeurIPS
2020, *Dark Experience for General Continual Learning: a Strong, Simple Baseline*).

A :class:`~clreg.logit_buffer.LogitBuffer` keeps, per sample, its input x, its label y and the
model's outputs z **at insertion**, filled by reservoir sampling over the whole stream (one global
capacity, not per task). Each step replays two independent draws b and b′ of it:

.. math::

    P = \alpha \sum_{o} \operatorname{MSE}\big(f_\theta(x_b)_o,\; z_{b,o}\big)
      \;+\; \beta\, \mathrm{CE}\big(f_\theta(x_{b'}),\; y_{b'}\big)

with β = 0 for DER and β > 0 for DER++ (the second draw and its forward are skipped when β = 0, the
first when α = 0). Conventions:

* MSE is the **mean over every element** of an output (batch, channels, locations):
  :func:`~clreg.functional.logit_replay.logit_mse`. The paper writes the term as
  :math:`\alpha\,\mathbb{E}_{(x,z)\sim\mathcal{M}}\lVert z - h_\theta(x)\rVert_2^2`, a **sum** over the
  logits; its published code, with which its α were tuned, takes the mean over every element, and
  clreg follows the code, so the paper's α carry over. The paper's formula is clreg's with α·C (C
  the number of logits per sample). The outputs o are the :class:`~clreg.OutputSpec` given (as LwF
  selects them), their MSEs summed; ``channels`` keeps some channels of an output (the mean is then
  over those).
* Every kind is matched on the values the model outputs: softmax and sigmoid outputs on their
  **logits** (pre-activations, not probabilities), regression outputs on their values. A regression
  output with a per-location ``weight`` or ``norm="l1"`` is refused (DER is an unweighted MSE).
* The CE of DER++ is, by default, the sum over the softmax outputs of
  :func:`torch.nn.functional.cross_entropy` (mean over the labels that are not the output's
  ``ignore_index``) on the stored labels, read as the :class:`~clreg.OutputSpec` says (``target``,
  ``channels`` with ``labels``, ``shift``, ``class_dim``); DER++ checks the labels when they are
  offered (a label outside the output's classes or ``channels`` is a ``ValueError`` naming the row).
  Another task loss is given as ``label_loss(outputs, labels) -> Tensor`` (needed when an output is
  not a softmax).
* Each draw holds ``min(batch_size, len(buffer))`` samples, uniform without replacement. An empty
  buffer gives a zero tensor on the parameters' device (no forward is run), as the paper's first
  step does; a buffer that holds no outputs (or, for DER++, no labels) is a ``ValueError``.
* The replayed forward runs the model as the loop has it (train mode: BatchNorm statistics see the
  replayed batch, as in the paper's code), on the parameters' device; where the call gives the
  current batch's ``inputs``, the replayed floating inputs take their dtypes (leaf by leaf, when the
  structures match), so a replay is fed as the current batch is.
* There is no attached mode (``attach`` is a ``TypeError``): the term needs forwards through the
  model, so there is no closed-form gradient to add from an optimizer hook.

The loop calls ``der(model, inputs=x, outputs=out)`` for the term and ``der.observe(x, y, out)`` to
offer the batch to the reservoir (after the loss, as the paper's algorithm inserts after sampling).
**Augmentation**: the buffer keeps the inputs it is given. The paper keeps the non-augmented inputs
with the outputs of the augmented ones and re-augments at replay: pass the raw batch to ``observe``
with the outputs of the augmented batch, and ``transform=`` an augmentation applied to every replayed
batch (on the model's device) before the forward.

``consolidate`` only counts tasks: the buffer is filled by ``observe`` alone.

Distributed: the buffer is global (identical on every rank, see :mod:`clreg.logit_buffer`); each
rank draws its own samples (the draw seeded by the rank), and DDP averages the terms' gradients with
the rest in the one backward. So every rank holds the same number of samples and runs the same
number of replayed forwards, which keeps the collectives of a sharded model (FSDP2) in step: the
forward goes through the user's model sharded with ``fully_shard`` like any other, nothing else is
needed.

Example:
    >>> import torch
    >>> from clreg.regularizers.der import DER
    >>> model = torch.nn.Linear(4, 3)
    >>> der = DER(model, capacity=100, alpha=0.5, beta=0.5, batch_size=8)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> out = model(x)
    >>> der(model, inputs=x, outputs=out).item()   # nothing stored yet
    0.0
    >>> der.observe(x, y, out)
    >>> der(model, inputs=x, outputs=out).item() > 0   # the stored logits match; the labels' CE does not vanish
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._params import ParamSelector
from ..data import call_model
from ..functional._per_sample import model_device
from ..functional.fisher import _check_labels, _logits, _per_sample_shape, labels_of, target_of
from ..functional.logit_replay import compute_dtype, logit_mse
from ..logit_buffer import Draw, LogitBuffer, cast_like
from ..spec import OutputSpec, TaskSpec, select_tensor
from .base import Hyperparameter, Regularizer

__all__ = ["DER", "LabelLoss", "cross_entropy_of"]

LabelLoss = Callable[[Any, Any], Tensor]
"""``label_loss(outputs, labels) -> Tensor``: DER++'s loss on a replayed batch's stored labels."""


def _specs(outputs: OutputSpec | Sequence[OutputSpec] | None) -> tuple[OutputSpec, ...]:
    specs = (OutputSpec(),) if outputs is None else (outputs,) if isinstance(outputs, OutputSpec) else tuple(outputs)
    if not specs:
        raise ValueError("DER needs at least one output (OutputSpec) to match")
    for o in specs:
        if not isinstance(o, OutputSpec):
            raise TypeError(f"DER outputs must be OutputSpec items, got {type(o).__name__}")
        if o.weight is not None or o.norm != "l2":
            raise ValueError(
                f"DER matches output {o.select!r} by an unweighted MSE: OutputSpec.weight and norm='l1' are not used"
            )
    return specs


def cross_entropy_of(outputs: Any, labels: Any, specs: Sequence[OutputSpec]) -> Tensor:
    """The sum over the softmax ``specs`` of the cross-entropy of the selected logits (their
    ``channels``, classes on ``class_dim``, the last ``shift`` positions cut) against their labels in
    ``labels`` (read as the spec says), each the mean over the labels that are not its ``ignore_index``."""
    total: Tensor | None = None
    for o in specs:
        z = _logits(outputs, o)
        y = labels_of(labels, o).to(z.device)
        ignore = -100 if o.ignore_index is None else o.ignore_index
        term = F.cross_entropy(z.movedim(o.class_dim % z.dim(), 1).to(compute_dtype(z)), y.long(), ignore_index=ignore)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("DER++'s default label loss needs a softmax output: give label_loss=")
    return total


def _check_batch_labels(outputs: Any, labels: Any, specs: Sequence[OutputSpec]) -> None:
    """A ValueError naming the sample (its row in the batch) whose label does not fit its softmax output."""
    for o in specs:
        z = _logits(outputs, o)
        y = target_of(labels, o)
        _check_labels(y, _per_sample_shape(z, o), o, torch.arange(y.shape[0]))


class _BufferReplay(Regularizer):
    """What DER and ER-ACE share: a :class:`~clreg.logit_buffer.LogitBuffer` filled by ``observe``,
    draws of ``batch_size`` samples replayed through the model (floating inputs cast like the current
    batch's, then ``transform``), a zero while nothing is stored, ``consolidate`` that only counts."""

    hyperparameters = ("batch_size",)

    def __init__(
        self,
        model: nn.Module,
        capacity: int,
        *,
        batch_size: int,
        transform: Callable[[Any], Any] | None,
        seed: int,
        device: str | torch.device,
        output_dtype: torch.dtype | None = None,
        params: ParamSelector = None,
    ) -> None:
        super().__init__(model, params)
        self.batch_size = batch_size
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.transform = transform
        self.buffer = LogitBuffer(capacity, seed=seed, device=device, output_dtype=output_dtype)

    @property
    def batch_size(self) -> int:
        """Samples per draw (≥ 1)."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"batch_size must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"batch_size must be >= 1, got {value}")
        self._batch_size = value

    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        """Count the task; the buffer is filled by ``observe`` alone (``data`` and ``spec`` unused)."""
        self._bump_tasks()

    def _empty(self, model: nn.Module) -> Tensor | None:
        """While nothing is stored: a zero on the parameters' device (also the last value); else ``None``."""
        if len(self.buffer):
            return None
        value = torch.zeros((), device=model_device(model))
        self.last_value = value
        return value

    def _require(self, group: str, who: str, how: str) -> None:
        if not self.buffer.stores(group):
            raise ValueError(f"{who}: the buffer holds no {group} ({how} stores them)")

    def _replay(self, model: nn.Module, like: Any) -> tuple[Draw, Any]:
        """One draw and the model's outputs on it."""
        draw = self.buffer.sample(self._batch_size, device=model_device(model))
        x = cast_like(draw.inputs, like)
        x = x if self.transform is None else self.transform(x)
        return draw, call_model(model, x)

    def state_bytes(self) -> int:
        """The task count plus the buffer's memory."""
        return super().state_bytes() + self.buffer.state_bytes()


class DER(_BufferReplay):
    """DER (β = 0) and DER++ (β > 0): replay of stored outputs and labels (see the module).

    Args:
        model: the model (DDP / compiled wrappers are looked through for the parameters' names).
        capacity: M ≥ 1, the buffer's global capacity.
        alpha: α ≥ 0, the weight of the MSE on stored outputs.
        beta: β ≥ 0, the weight of the CE on stored labels (DER++); 0 is DER.
        batch_size: samples per draw (each of the two), ≥ 1.
        outputs: the outputs stored and matched (:class:`~clreg.OutputSpec`, one or several);
            default: the model's output itself, as logits.
        label_loss: DER++'s loss on the stored labels, ``label_loss(outputs, labels)``; default the
            cross-entropy of the softmax outputs (:func:`cross_entropy_of`).
        transform: applied to every replayed batch of inputs (on the model's device) before the
            forward, e.g. the training augmentation.
        seed: seeds the reservoir and the draws.
        device: where the buffer keeps its samples (default the CPU).
        output_dtype: the stored outputs' dtype (default the wider of float32 and theirs).

    State: the buffer (``buffer.*`` in ``state_dict``: the stored rows, counts, seed and structure),
    the task count, and ``hyperparameters`` (α, β, ``batch_size``) with the outputs' specs.
    """

    hyperparameters = ("alpha", "beta", "batch_size")

    def __init__(
        self,
        model: nn.Module,
        capacity: int,
        alpha: float = 1.0,
        beta: float = 0.0,
        *,
        batch_size: int = 32,
        outputs: OutputSpec | Sequence[OutputSpec] | None = None,
        label_loss: LabelLoss | None = None,
        transform: Callable[[Any], Any] | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        output_dtype: torch.dtype | None = None,
        params: ParamSelector = None,
    ) -> None:
        super().__init__(
            model,
            capacity,
            batch_size=batch_size,
            transform=transform,
            seed=seed,
            device=device,
            output_dtype=output_dtype,
            params=params,
        )
        self.alpha, self.beta = alpha, beta
        self.specs = _specs(outputs)
        if label_loss is not None and not callable(label_loss):
            raise TypeError(f"label_loss must be callable: label_loss(outputs, labels) -> Tensor, got {label_loss!r}")
        others = [o.select for o in self.specs if o.kind != "softmax"]
        if label_loss is None and others and self._beta > 0:
            raise ValueError(
                f"DER++ (beta > 0) on outputs that are not softmax ({others}) needs label_loss=(outputs, labels) -> Tensor"
            )
        self.label_loss = label_loss

    alpha = Hyperparameter(doc="α ≥ 0, the weight of the MSE on stored outputs.")

    beta = Hyperparameter(doc="β ≥ 0, the weight of the CE on stored labels (DER++).")

    # -- the stream -------------------------------------------------------------------------------
    def observe(self, inputs: Any, labels: Any = None, outputs: Any = None) -> None:
        """Offer the batch to the reservoir with the model's ``outputs`` on it (the selected ones are
        stored, detached) and its ``labels`` (needed for DER++, which with its default label loss
        checks them against the softmax outputs here)."""
        if outputs is None:
            raise ValueError("DER.observe needs the model's outputs on the batch: der.observe(x, y, out)")
        if labels is None and self._beta > 0:
            raise ValueError("DER++ (beta > 0) replays labels: der.observe(x, y, out) needs y")
        picked, problem = None, None
        try:
            picked = tuple(select_tensor(outputs, o.select).detach() for o in self.specs)
            if labels is not None and self._beta > 0 and self.label_loss is None:
                _check_batch_labels(outputs, labels, [o for o in self.specs if o.kind == "softmax"])
        except ValueError as err:  # raised by the buffer, after the ranks have shared their verdicts
            problem = err

        def check() -> None:
            if problem is not None:
                raise problem

        self.buffer.observe(inputs, labels, picked, check=check)

    # -- the loss ---------------------------------------------------------------------------------
    def forward(self, model: nn.Module, inputs: Any = None, outputs: Any = None) -> Tensor:
        """α·MSE on one draw + β·CE on another; a zero tensor while the buffer is empty. The current
        batch's ``inputs``, where given, set the dtype of the replayed floating inputs (the same
        structure: cast leaf by leaf); ``outputs`` is not used."""
        empty = self._empty(model)
        if empty is not None:
            return empty
        self._resolve(model)
        self._require("outputs", "DER", "observe(x, y, out)")
        value = torch.zeros((), device=model_device(model))
        if self._alpha > 0:
            value = value + self._alpha * self._output_term(model, inputs)
        if self._beta > 0:
            self._require("labels", "DER++", "observe(x, y, out)")
            value = value + self._beta * self._label_term(model, inputs)
        self.last_value = value.detach()
        return value

    def _output_term(self, model: nn.Module, like: Any) -> Tensor:
        draw, out = self._replay(model, like)
        total: Tensor | None = None
        for o, stored in zip(self.specs, draw.outputs):
            current = select_tensor(out, o.select)
            class_dim = o.class_dim if o.kind == "softmax" else 1
            term = logit_mse(current, stored, channels=o.channels, class_dim=class_dim)
            total = term if total is None else total + term
        return total  # type: ignore[return-value]

    def _label_term(self, model: nn.Module, like: Any) -> Tensor:
        draw, out = self._replay(model, like)
        if self.label_loss is not None:
            return self.label_loss(out, draw.labels)
        return cross_entropy_of(out, draw.labels, [o for o in self.specs if o.kind == "softmax"])

    # -- state ------------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "outputs": [o.to_config() for o in self.specs]}

    def _set_config(self, config: dict[str, Any]) -> None:
        config = dict(config)
        saved = config.pop("outputs", None)
        ours = [o.to_config() for o in self.specs]
        if saved is not None and None not in ours and None not in saved and saved != ours:
            raise ValueError(f"DER state was saved for the outputs {saved}, this DER matches {ours}")
        super()._set_config(config)
