"""clreg inside the Hugging Face ``Trainer``: :class:`ContinualCallback`, a callback that owns one regularizer
(or a :class:`~clreg.Compose`) across a sequence of ``trainer.train()`` calls, one per task (a new ``Trainer``
per task is normal: pass the same callback to each), and :class:`ContinualTrainer`, a ``Trainer`` that adds
the terms without a closed form (LwF) to the loss.

Where things happen, relative to the Trainer's loop (transformers 5: ``_run_epoch``):

* **Penalties.** When training begins the callback attaches every attachable member (EWC, Online EWC,
  SI, MAS, K-FAC EWC) to the torch optimizer under Accelerate's ``AcceleratedOptimizer``, with the normal
  step pre-hook: their closed-form gradient is added to ``.grad`` inside ``optimizer.step()``. The Trainer
  clips (``max_grad_norm``) *before* that step, so the clip bounds the task gradient only, as in clreg's
  plain attached mode (the Lightning callback, which adds the penalty before Lightning's clipping, differs
  here). The step runs once per optimizer step, so the penalty is added once whatever
  ``gradient_accumulation_steps`` is. Under ``fp16`` on a GPU, Accelerate's step is ``scaler.step``, which
  unscales ``.grad`` (if the clip has not already) and then calls the torch optimizer's ``step``: the
  pre-hook sees unscaled gradients, and a step skipped for an overflow skips the penalty too. On a CPU
  ``fp16=True`` turns nothing on (no autocast, no scaler); ``bf16=True`` autocasts the forward and has no
  scaler. SI's path is tracked by a step post-hook.
* **Zero grad.** The Trainer calls ``model.zero_grad()`` (``set_to_none``) after the step and *before*
  ``on_step_end``: a callback reading ``p.grad`` in ``on_step_end`` reads ``None``. Gradients are there in
  ``on_pre_optimizer_step`` (task gradient, clipped; the penalty is added later, inside the step).
* **Terms without a closed form** (LwF) need the batch: :class:`ContinualTrainer` adds
  ``callback.penalty(...)`` to the loss in ``compute_loss``, scaled so that its gradient per optimizer step
  is the mean over the micro-batches of the per-micro-batch term (the Trainer divides a loss that is a
  per-batch mean by the accumulation steps; a loss the model already normalised over the accumulated
  tokens, ``num_items_in_batch``, it does not divide, so ContinualTrainer divides the term itself). Its
  teacher is called as ``model(**inputs)`` on the batch without its labels (a :class:`~clreg.KeywordInputs`).
  With ``attach=False`` every member goes this way (then the Trainer's clip bounds the penalty too).
* **Tasks.** ``on_train_end`` detaches, then consolidates on the task's data (default: the Trainer's
  training loader, its dict batches turned into ``(KeywordInputs(inputs), labels)`` by
  :func:`keyword_batches`, or by the ``batches`` adapter you give, e.g.
  :func:`clreg.integrations.causal_lm.causal_lm_batches`) with the model in eval mode (its modes restored
  after), then counts the task. Under ``bf16`` Accelerate leaves its autocast wrapper on the model's
  ``forward``, so the consolidation's forward passes are autocast too, as the training's were. The Trainer calls ``on_train_end`` only when training ends normally
  (``max_steps``, the last epoch, or a callback's ``should_training_stop``): a ``train()`` that raises
  consolidates nothing.
* **Checkpoints.** ``on_save`` (after the Trainer wrote ``<output_dir>/checkpoint-<step>``) writes
  ``clreg.pt`` there: ``{"regularizer": state_dict, "tasks": n}``, loadable with ``weights_only=True``. On
  ``train(resume_from_checkpoint=...)`` (``global_step > 0`` when training begins) the callback loads it
  back from ``<output_dir>/checkpoint-<global_step>`` (or the path you set in ``resume_from``;
  :class:`ContinualTrainer` sets it from ``resume_from_checkpoint``); a ValueError naming the path when it
  is missing. Give each task's Trainer its own ``output_dir``: the step count starts at 0 for each.
* **Logging.** Each member's value goes into the Trainer's logs as ``clreg/<name>``. The Trainer calls
  the reporters (``report_to``) before the callbacks you pass, so :class:`ContinualTrainer` adds the
  values in ``log()``, before any callback; with a plain ``Trainer`` the callback adds them in ``on_log``,
  which reaches the callbacks after it (the console printer) and ``state.log_history``, not the reporters.

The callback is a mapping of the Trainer's events onto a :class:`~clreg.session.ContinualSession`
(``callback.session``): ``on_train_begin`` → ``begin_task`` (step pre-hook on), ``compute_loss`` →
``penalty``, ``on_train_end`` → ``end_task``, ``clreg.pt`` → the session's state.

Example:
    >>> import tempfile, torch, transformers, clreg
    >>> from transformers.trainer_callback import PrinterCallback
    >>> from clreg.integrations.transformers import ContinualCallback
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layer = torch.nn.Linear(4, 3)
    ...     def forward(self, x, labels=None):
    ...         logits = self.layer(x)
    ...         loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
    ...         return {"loss": loss, "logits": logits}
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> data = [{"x": x[i], "labels": y[i]} for i in range(16)]
    >>> net = Net()
    >>> ewc = clreg.EWC(net, lam=10.0)
    >>> continual = ContinualCallback(ewc, spec=clreg.TaskSpec(clreg.OutputSpec(select="logits")))
    >>> out = tempfile.TemporaryDirectory()
    >>> for task in range(2):
    ...     args = transformers.TrainingArguments(output_dir=f"{out.name}/{task}", max_steps=3,
    ...                                           per_device_train_batch_size=8, use_cpu=True, report_to=[],
    ...                                           save_strategy="no", disable_tqdm=True)
    ...     trainer = transformers.Trainer(net, args, train_dataset=data, callbacks=[continual])
    ...     trainer.remove_callback(PrinterCallback)  # keeps this example's output quiet
    ...     _ = trainer.train()
    >>> continual.tasks, int(ewc.n_tasks)
    (2, 2)
    >>> out.cleanup()
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..data import KeywordInputs
from ..regularizers import Compose, Regularizer
from ..session import ContinualSession
from ..spec import TaskSpec
from ._common import is_data_factory

__all__ = ["CHECKPOINT_NAME", "ContinualCallback", "ContinualTrainer", "keyword_batches"]

CHECKPOINT_NAME = "clreg.pt"
"""The file the callback writes into each of the Trainer's checkpoint folders."""

DataSource = Any  # a Dataset, a DataLoader, an iterable of batches, or (task, model) -> one of them


def keyword_batches(data: Iterable[Mapping[str, Any]], label_names: Sequence[str] = ("labels",)) -> Iterable:
    """The Trainer's dict batches as clreg batches: ``(KeywordInputs(the other keys), labels)``.

    The labels are the batch's ``label_names`` entry (a dict of them when there are several; ``None``
    when the batch has none), the model is then called as ``model(**inputs)``. The result can be iterated
    again (each pass iterates ``data`` again).

    Example:
        >>> import torch
        >>> (x, y), = keyword_batches([{"input_ids": torch.ones(2, 3), "labels": torch.zeros(2)}])
        >>> type(x).__name__, sorted(x), y.shape
        ('KeywordInputs', ['input_ids'], torch.Size([2]))
    """
    return _KeywordBatches(data, tuple(label_names))


class _KeywordBatches:
    def __init__(self, data: Iterable[Mapping[str, Any]], label_names: tuple[str, ...]) -> None:
        self.data, self.label_names = data, label_names

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[KeywordInputs, Any]]:
        for batch in self.data:
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"keyword_batches expects dict batches (the Trainer's), got {type(batch).__name__}; give the "
                    "callback data= in clreg's form ((input, target) items or batches) instead"
                )
            inputs = KeywordInputs({k: v for k, v in batch.items() if k not in self.label_names})
            labels = {k: batch[k] for k in self.label_names if k in batch}
            if not labels:
                yield inputs, None
            elif len(labels) == 1:
                yield inputs, next(iter(labels.values()))
            else:
                yield inputs, labels


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under Accelerate's ``AcceleratedOptimizer`` (itself an Optimizer subclass that
    never ran ``Optimizer.__init__``, so it holds no hooks)."""
    seen = optimizer
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer) or not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        raise ValueError(
            f"ContinualCallback cannot find the torch optimizer under the Trainer's {type(seen).__name__} "
            "(DeepSpeed and other engines that step outside a torch optimizer are not supported; "
            "use attach=False with ContinualTrainer)"
        )
    return optimizer


class ContinualCallback(transformers.TrainerCallback):
    """One regularizer across a sequence of ``trainer.train()`` calls (see the module).

    Args:
        regularizer: a clreg regularizer or Compose, built on the model given to the Trainer (after any
            PEFT wrapping).
        data: what each task consolidates on: a ``Dataset`` or ``DataLoader`` in clreg's form, an iterable of
            batches, or a callable ``(task, model) -> data`` (``task``: 0, 1, … the task's index). Default: the
            Trainer's training loader, its dict batches turned into clreg batches by ``batches`` (default
            :func:`keyword_batches` over the Trainer's label names).
        spec: the task's :class:`~clreg.TaskSpec`, or a callable of the task's index. For a model returning a
            dict or a ``ModelOutput``, select the logits: ``TaskSpec(OutputSpec(select="logits"))``.
        batches: a callable ``data -> clreg batches`` applied to the task's data (its default and the one you
            give), e.g. :func:`clreg.integrations.causal_lm.causal_lm_batches`.
        attach: attach the members with a closed-form gradient to the optimizer (default); with ``False``
            every member's value goes into :class:`ContinualTrainer`'s loss (SI then tracks its path).
        resume_from: where ``clreg.pt`` is read from when training resumes (a checkpoint folder or the file);
            default ``<output_dir>/checkpoint-<global_step>``. Used once, then cleared.
        log: add each member's value to the Trainer's logs as ``clreg/<name>``.
    """

    def __init__(
        self,
        regularizer: Regularizer | Compose,
        data: DataSource = None,
        spec: TaskSpec | Callable[[int], TaskSpec] | None = None,
        *,
        batches: Callable[[Any], Iterable] | None = None,
        attach: bool = True,
        resume_from: str | os.PathLike | None = None,
        log: bool = True,
    ) -> None:
        if not isinstance(regularizer, (Regularizer, Compose)):
            raise TypeError(f"ContinualCallback takes a clreg regularizer or Compose, got {type(regularizer).__name__}")
        if spec is not None and not isinstance(spec, TaskSpec) and not callable(spec):
            raise TypeError(f"spec must be a TaskSpec or a callable of the task's index, got {type(spec).__name__}")
        if batches is not None and not callable(batches):
            raise TypeError(f"batches must be a callable data -> batches, got {type(batches).__name__}")
        self.session = ContinualSession(regularizer, attach=attach, optimizer_label="the Trainer's optimizer")
        self.data, self.spec, self.batches = data, spec, batches
        self.log = bool(log)
        self.resume_from = resume_from
        self._penalty_calls = 0
        self._warned = False

    @property
    def regularizer(self) -> Regularizer | Compose:
        """The regularizer (or Compose) the callback owns."""
        return self.session.regularizer

    @property
    def attach(self) -> bool:
        """Whether the members with a closed-form gradient are attached to the optimizer."""
        return self.session.attach

    @property
    def tasks(self) -> int:
        """Tasks consolidated so far."""
        return self.session.tasks

    @property
    def needs_autograd(self) -> bool:
        """True when some member's gradient must come from the loss (LwF, or every member with
        ``attach=False``): train with :class:`ContinualTrainer` (or add :meth:`penalty` to your loss)."""
        return self.session.needs_autograd

    # -- hooks -> session ------------------------------------------------------------------------
    def on_train_begin(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
                       control: transformers.TrainerControl, **kwargs: Any) -> None:  # fmt: skip
        """Load the checkpoint's state when resuming, then ``begin_task`` on the torch optimizer."""
        self.session.abort_task()  # a train() that raised never reached on_train_end
        model = kwargs["model"]
        self._penalty_calls, self._warned = 0, False
        try:
            self.session.set_model(model)  # the Trainer's model, checked against the built one
        except ValueError as err:
            raise ValueError(
                f"ContinualCallback: {err}; build the regularizer on the model you give the Trainer "
                "(after any PEFT wrapping)"
            ) from err
        if state.global_step > 0:
            self._load(self._resume_path(args, state), state.global_step)
        self.resume_from = None
        if args.optim in ("lomo", "adalomo") and self.session.needs_optimizer:
            raise ValueError(
                f"optim={args.optim!r} updates the parameters in the backward and never steps a torch optimizer: "
                "clreg's attached penalties and SI's path need one"
            )
        optimizer = kwargs["optimizer"]
        scaler = getattr(optimizer, "scaler", None)  # AcceleratedOptimizer's GradScaler under fp16 on a GPU
        torch_optimizer = _torch_optimizer(optimizer) if self.session.needs_optimizer else None
        self.session.begin_task(torch_optimizer, scaler=scaler)

    def penalty(self, model: nn.Module | None = None, inputs: Any = None, outputs: Any = None) -> Tensor:
        """What a loss adds: the members without a closed form (LwF …), or every member with
        ``attach=False``, whose gradient must come from autograd; zero when every member is attached.
        ``model``: default the Trainer's. :class:`ContinualTrainer` calls it in ``compute_loss``."""
        if model is None and self.session.model is None:
            raise ValueError("ContinualCallback.penalty needs the model (or a train() under way)")
        self._penalty_calls += 1
        return self.session.penalty(model, inputs=inputs, outputs=outputs)

    def on_step_end(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
                    control: transformers.TrainerControl, **kwargs: Any) -> None:  # fmt: skip
        if self.needs_autograd and self._penalty_calls == 0 and not self._warned:
            self._warned = True
            attached = self.session.attached_members
            names = [n for n, m in self.session.members if not any(m is a for a in attached)]
            warnings.warn(
                f"the members {names} have no closed-form gradient here and nothing added them to the loss on "
                "this step: train with clreg.integrations.transformers.ContinualTrainer(..., continual=callback), "
                "or add callback.penalty(model, inputs, outputs) to your compute_loss",
                stacklevel=2,
            )

    # -- logging ---------------------------------------------------------------------------------
    def values(self, model: nn.Module | None = None) -> dict[str, float]:
        """Each member's value as ``clreg/<name>``: an attached member's at the current parameters, the
        others' last value (from the last loss that added them)."""
        return {f"clreg/{name}": float(v.float()) for name, v in self.session.values(model).items()}

    def on_log(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
               control: transformers.TrainerControl, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:  # fmt: skip
        if not self.log or logs is None or any(k.startswith("clreg/") for k in logs):
            return
        values = self.values(kwargs.get("model"))
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    # -- the end of a task -----------------------------------------------------------------------
    def _label_names(self, args: transformers.TrainingArguments, model: nn.Module) -> list[str]:
        inner = getattr(model, "get_base_model", lambda: model)()
        return list(args.label_names or transformers.utils.find_labels(type(inner)) or ["labels"])

    def _task_data(self, args: transformers.TrainingArguments, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        if self.data is None:
            data = kwargs.get("train_dataloader")
            if data is None:
                raise ValueError("ContinualCallback has no data to consolidate on: give it data=")
            names = self._label_names(args, model)
            adapt = self.batches or (lambda d: keyword_batches(d, names))
        else:
            data = self.data(self.tasks, model) if is_data_factory(self.data) else self.data
            adapt = self.batches
        return data if adapt is None else adapt(data)

    def on_train_end(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
                     control: transformers.TrainerControl, **kwargs: Any) -> None:  # fmt: skip
        """``end_task``: consolidate on the task's data (model in eval mode, its modes restored after), count
        the task."""
        model = kwargs["model"]
        self.session.end_task(model, self._task_data(args, model, kwargs), self.spec)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What ``clreg.pt`` holds: ``{"regularizer": ..., "tasks": n}``."""
        return self.session.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.session.load_state_dict(state_dict)

    def on_save(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
                control: transformers.TrainerControl, **kwargs: Any) -> None:  # fmt: skip
        """Write ``clreg.pt`` into the checkpoint folder the Trainer just wrote."""
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self.state_dict(), os.path.join(folder, CHECKPOINT_NAME))

    def _resume_path(self, args: transformers.TrainingArguments, state: transformers.TrainerState) -> str:
        where = self.resume_from
        if where is None:
            where = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        where = os.fspath(where)
        return os.path.join(where, CHECKPOINT_NAME) if os.path.isdir(where) or not where.endswith(".pt") else where

    def _load(self, path: str, step: int) -> None:
        if not os.path.isfile(path):
            raise ValueError(
                f"training resumes from a checkpoint at step {step}, but there is no clreg state at {path}: was the "
                "checkpoint written by a Trainer with this callback? (set callback.resume_from to where it is)"
            )
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


class ContinualTrainer(transformers.Trainer):
    """A ``Trainer`` whose loss carries the terms without a closed form (see the module).

    ``compute_loss`` adds ``continual.penalty(model, inputs=KeywordInputs(batch without labels),
    outputs=outputs)`` to the task loss while training (not in evaluation), divided by the micro-batches of
    the optimizer step when the Trainer will not divide the loss itself (``loss_is_scaled_for_ga``, or a
    model that takes ``num_items_in_batch``): the term's gradient per step is the mean over the micro-batches
    of the per-micro-batch term. ``log`` adds the members' values before any callback sees the logs, and
    ``train(resume_from_checkpoint=...)`` tells the callback where ``clreg.pt`` is.

    Args:
        args, kwargs: the ``Trainer``'s arguments.
        continual: the :class:`ContinualCallback` (added to the callbacks when it is not among them).
        teacher_inputs: ``batch -> inputs`` for the regularizer (LwF's teacher); default
            ``KeywordInputs`` of the batch without its label names.
    """

    def __init__(
        self,
        *args: Any,
        continual: ContinualCallback,
        teacher_inputs: Callable[[Mapping[str, Any]], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(continual, ContinualCallback):
            raise TypeError(f"continual must be a ContinualCallback, got {type(continual).__name__}")
        super().__init__(*args, **kwargs)
        if continual not in self.callback_handler.callbacks:
            self.add_callback(continual)
        self.continual = continual
        self.teacher_inputs = teacher_inputs

    def _regularizer_inputs(self, inputs: Mapping[str, Any]) -> Any:
        if self.teacher_inputs is not None:
            return self.teacher_inputs(inputs)
        drop = set(self.label_names or ()) | {"labels", "num_items_in_batch"}
        return KeywordInputs({k: v for k, v in inputs.items() if k not in drop})

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Mirrors ``training_step``: True when the Trainer will not divide the loss by the micro-batches."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        if not (model.training and self.continual.needs_autograd):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)  # fmt: skip
        reg_inputs = self._regularizer_inputs(inputs)  # before the Trainer pops the labels
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        term = self.continual.penalty(self.model, inputs=reg_inputs, outputs=outputs)
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            term = term / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        loss = loss + term.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.continual.log and self.is_in_train:
            logs.update(self.continual.values(self.model))
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            found = get_last_checkpoint(self.args.output_dir)
            if found is not None:
                self.continual.resume_from = found
        elif resume_from_checkpoint:
            self.continual.resume_from = resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)
