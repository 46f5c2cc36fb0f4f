"""clreg inside Lightning: :class:`ContinualLearning`, a callback that owns one regularizer (or a
:class:`~clreg.Compose`) across a sequence of ``fit`` calls, one fit per task.

* **Penalties.** Lightning runs ``training_step``, ``zero_grad`` and ``backward`` in a closure inside
  ``optimizer.step``, so an optimizer step pre-hook would fire before the backward and its gradient
  would be wiped. The callback attaches every attachable member with ``hook=False`` when training
  starts and adds their closed-form gradient from ``on_before_optimizer_step``: after the backward
  (and, with ``16-mixed``, after GradScaler's unscale), once per optimizer step whatever
  ``accumulate_grad_batches`` is, and *before* Lightning's own gradient clipping (so
  ``gradient_clip_val`` clips the penalty's gradient too, unlike clreg's plain attached mode).
  SI's path is tracked by a step post-hook. ``training_step`` is untouched, except for members
  without a closed form (LwF): add ``self.continual.penalty(self, x, out)`` (or the callback you
  hold) to the loss — one line.
* **Tasks.** At the end of each ``fit`` the regularizer consolidates on the data you name (a
  ``Dataset``, a ``DataLoader``, or a callable ``(trainer, module) -> data``; default the
  datamodule's ``train_dataloader()``, else the trainer's), with the task's
  :class:`~clreg.TaskSpec` (one, or a callable of the task's index), with the module in eval mode
  (BatchNorm statistics untouched, dropout off; each submodule's mode restored after). A fit that
  is interrupted (by hand or by an exception) consolidates nothing.
* **Checkpoints.** ``{"regularizer": state_dict, "tasks": n}`` is the callback's state in Lightning's checkpoints, so
  ``fit(..., ckpt_path=...)`` continues with the same penalties. Under ``ModelParallelStrategy``
  Lightning writes the callbacks' state from rank 0 alone (the model's and optimizer's go through
  ``torch.distributed.checkpoint``), so a sharded regularizer's state is stored in its full form:
  every rank gathers each sharded tensor (one all-gather each, on the CPU) when the checkpoint is
  made, and on resume each rank keeps its shard of it.
* **Logging.** Every ``log_every_n_steps`` steps each member's value is logged as ``clreg/<name>``.

The callback is a mapping of Lightning's hooks onto a :class:`~clreg.session.ContinualSession`
(``continual.session``): ``on_train_start`` → ``begin_task(hook=False)``, ``on_before_optimizer_step``
→ ``pre_step``, ``on_train_end`` → ``end_task`` (``abort_task`` when interrupted), the callback's state
→ the session's.

Example:
    >>> import torch, lightning as L, clreg
    >>> from clreg.integrations.lightning import ContinualLearning
    >>> class Net(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layer = torch.nn.Linear(4, 3)
    ...     def forward(self, x):
    ...         return self.layer(x)
    ...     def training_step(self, batch, i):
    ...         x, y = batch
    ...         return torch.nn.functional.cross_entropy(self(x), y)
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> net = Net()
    >>> data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    >>> continual = ContinualLearning(clreg.EWC(net, lam=10.0), data=data)
    >>> for task in range(2):
    ...     trainer = L.Trainer(max_steps=3, callbacks=[continual], logger=False, enable_checkpointing=False,
    ...                         enable_progress_bar=False, enable_model_summary=False)
    ...     trainer.fit(net, torch.utils.data.DataLoader(data, batch_size=8))
    >>> continual.tasks, int(continual.regularizer.n_tasks)
    (2, 2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from .._sharding import full, is_sharded
from ..regularizers import Compose, Regularizer
from ..session import ContinualSession
from ..spec import TaskSpec
from ._common import is_data_factory

__all__ = ["ContinualLearning"]

DataSource = Any  # a Dataset, a DataLoader, an iterable of batches, or (trainer, module) -> one of them


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under Lightning's wrapper."""
    return getattr(optimizer, "optimizer", optimizer) if not isinstance(optimizer, torch.optim.Optimizer) else optimizer


class ContinualLearning(pl.Callback):
    """One regularizer across a sequence of ``fit`` calls (see the module): a mapping of Lightning's hooks
    onto a :class:`~clreg.session.ContinualSession` (``self.session``).

    Args:
        regularizer: a clreg regularizer or Compose, built on ``model(pl_module)``'s parameters; or a
            callable ``module -> regularizer`` that the callback calls once, when the first fit starts
            training, on ``model(pl_module)`` as the strategy made it: for a module sharded in its
            ``configure_model`` (``fully_shard`` under ``ModelParallelStrategy``), whose parameters
            exist only then.
        data: what each task consolidates on (default: the datamodule's ``train_dataloader()``, else
            the trainer's training loader).
        spec: the task's :class:`~clreg.TaskSpec`, or a callable of the task's index (0, 1, …).
        model: which module the regularizer works on (default: the LightningModule itself).
        log_every_n_steps: how often each member's value is logged (``None``: never).
    """

    def __init__(
        self,
        regularizer: Regularizer | Compose | Callable[[nn.Module], Regularizer | Compose],
        data: DataSource = None,
        spec: TaskSpec | Callable[[int], TaskSpec] | None = None,
        *,
        model: Callable[[pl.LightningModule], nn.Module] | None = None,
        log_every_n_steps: int | None = 50,
    ) -> None:
        built = isinstance(regularizer, (Regularizer, Compose))
        if not built and (isinstance(regularizer, nn.Module) or not callable(regularizer)):
            raise TypeError(
                "ContinualLearning takes a clreg regularizer or Compose, or a callable module -> regularizer, "
                f"got {type(regularizer).__name__}"
            )
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1 or None, got {log_every_n_steps}")
        self._factory = None if built else regularizer
        self._session = _session(regularizer) if built else None
        self._pending: dict[str, Any] | None = None  # a checkpoint's state, loaded before the factory ran
        self.data, self.spec = data, spec
        self.model_of = model or (lambda m: m)
        self.log_every_n_steps = log_every_n_steps

    @property
    def session(self) -> ContinualSession:
        """The :class:`~clreg.session.ContinualSession` the hooks map onto (with a factory: from the first
        fit's start of training on)."""
        if self._session is None:
            raise ValueError(
                "the regularizer is built from the module when the first fit starts training (a factory was "
                "given): it does not exist yet"
            )
        return self._session

    @property
    def regularizer(self) -> Regularizer | Compose:
        """The regularizer (or Compose) the callback owns."""
        return self.session.regularizer

    @property
    def tasks(self) -> int:
        """Tasks consolidated so far."""
        if self._session is None:
            return int(self._pending["tasks"]) if self._pending else 0
        return self._session.tasks

    def _build(self, pl_module: pl.LightningModule) -> None:
        """The factory's regularizer on the module as the strategy made it, once (with a checkpoint's state)."""
        if self._session is not None:
            return
        reg = self._factory(self.model_of(pl_module))  # type: ignore[misc]
        if not isinstance(reg, (Regularizer, Compose)):
            raise TypeError(
                f"the regularizer factory must return a clreg regularizer or Compose, got {type(reg).__name__}"
            )
        self._session = _session(reg)
        if self._pending:
            self._session.load_state_dict(self._pending)
        self._pending = None

    # -- hooks -> session ------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``begin_task`` on the trainer's optimizer, without a step pre-hook (the step runs a closure)."""
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"ContinualLearning needs exactly one optimizer, the trainer has {len(trainer.optimizers)}"
            )
        self._build(pl_module)
        self.session.abort_task()  # a fit that ended without on_train_end
        optimizer = _torch_optimizer(trainer.optimizers[0]) if self.session.needs_optimizer else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.session.begin_task(optimizer, scaler=scaler, hook=False, model=self.model_of(pl_module))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """``pre_step``: after the step's last backward (and GradScaler's unscale), before the clipping."""
        self.session.pre_step()

    def penalty(self, pl_module: pl.LightningModule, inputs: Any = None, outputs: Any = None) -> Tensor:
        """What ``training_step`` adds to its loss: the members without a closed form (LwF …), whose
        gradient must come from autograd; zero when every member is attached."""
        return self.session.penalty(self.model_of(pl_module), inputs=inputs, outputs=outputs)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        n = self.log_every_n_steps
        if n is None or trainer.global_step % n:
            return
        for name, value in self.session.values(self.model_of(pl_module)).items():
            pl_module.log(f"clreg/{name}", value.to(torch.float32), on_step=True, on_epoch=False, sync_dist=False)

    def _task_data(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if is_data_factory(self.data):
            return self.data(trainer, pl_module)
        if self.data is not None:
            return self.data
        if trainer.datamodule is not None:
            return trainer.datamodule.train_dataloader()
        return trainer.train_dataloader

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``end_task`` on the task's data (model in eval mode, its modes restored); an interrupted fit
        (by hand or by an exception) is not the task's end: ``abort_task``."""
        if trainer.interrupted or not self.session.in_task:
            self.session.abort_task()
            return
        self.session.end_task(self.model_of(pl_module), self._task_data(trainer, pl_module), self.spec)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._session is not None:
            self._session.abort_task()

    # -- checkpoints: {"regularizer": ..., "tasks": n}, the layout of every earlier version -----------------
    def state_dict(self) -> dict[str, Any]:
        if self._session is None:  # a factory that has not run: what a checkpoint gave it, if anything
            return dict(self._pending or {})
        return _gathered(self.session.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._session is None:
            self._pending = dict(state_dict) if state_dict else None
        else:
            self.session.load_state_dict(state_dict)


def _gathered(state: Any) -> Any:
    """``state`` with every sharded tensor (DTensor) gathered whole on the CPU, the rest as it is."""
    if isinstance(state, dict):
        return {k: _gathered(v) for k, v in state.items()}
    return full(state).detach().cpu() if is_sharded(state) else state


def _session(regularizer: Regularizer | Compose) -> ContinualSession:
    return ContinualSession(regularizer, optimizer_label="the trainer's optimizer")
