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
  :class:`~clreg.TaskSpec` (one, or a callable of the task's index).
* **Checkpoints.** The regularizer's state is the callback's state in Lightning's checkpoints, so
  ``fit(..., ckpt_path=...)`` continues with the same penalties.
* **Logging.** Every ``log_every_n_steps`` steps each member's value is logged as ``clreg/<name>``.

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

from ..regularizers import Compose, Regularizer
from ..spec import TaskSpec
from ._common import is_data_factory, members

__all__ = ["ContinualLearning"]

DataSource = Any  # a Dataset, a DataLoader, an iterable of batches, or (trainer, module) -> one of them


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under Lightning's wrapper."""
    return getattr(optimizer, "optimizer", optimizer) if not isinstance(optimizer, torch.optim.Optimizer) else optimizer


class ContinualLearning(pl.Callback):
    """One regularizer across a sequence of ``fit`` calls (see the module).

    Args:
        regularizer: a clreg regularizer or Compose, built on ``model(pl_module)``'s parameters.
        data: what each task consolidates on (default: the datamodule's ``train_dataloader()``, else
            the trainer's training loader).
        spec: the task's :class:`~clreg.TaskSpec`, or a callable of the task's index (0, 1, …).
        model: which module the regularizer works on (default: the LightningModule itself).
        log_every_n_steps: how often each member's value is logged (``None``: never).
    """

    def __init__(
        self,
        regularizer: Regularizer | Compose,
        data: DataSource = None,
        spec: TaskSpec | Callable[[int], TaskSpec] | None = None,
        *,
        model: Callable[[pl.LightningModule], nn.Module] | None = None,
        log_every_n_steps: int | None = 50,
    ) -> None:
        if not isinstance(regularizer, (Regularizer, Compose)):
            raise TypeError(f"ContinualLearning takes a clreg regularizer or Compose, got {type(regularizer).__name__}")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1 or None, got {log_every_n_steps}")
        self.regularizer, self.data, self.spec = regularizer, data, spec
        self.model_of = model or (lambda m: m)
        self.log_every_n_steps = log_every_n_steps
        self.tasks = 0  # tasks consolidated so far

    # -- the regularizer on the trainer's optimizer --------------------------------------------------
    def _attachable(self) -> bool:
        reg = self.regularizer
        return bool(reg.members_that("attachable")) if isinstance(reg, Compose) else type(reg).attachable

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"ContinualLearning needs exactly one optimizer, the trainer has {len(trainer.optimizers)}"
            )
        model = self.model_of(pl_module)
        self.regularizer.to(next(model.parameters()).device)
        for _, member in members(self.regularizer):  # this module's parameters, checked against the built ones
            member._resolve(model)
        if self._attachable():
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self.regularizer.attach(_torch_optimizer(trainer.optimizers[0]), scaler=scaler, hook=False)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._attachable():
            self.regularizer.pre_step()

    def penalty(self, pl_module: pl.LightningModule, inputs: Any = None, outputs: Any = None) -> Tensor:
        """What ``training_step`` adds to its loss: the members without a closed form (LwF …), whose
        gradient must come from autograd; zero when every member is attached."""
        return self.regularizer.autograd_value(self.model_of(pl_module), inputs=inputs, outputs=outputs)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        n = self.log_every_n_steps
        if n is None or trainer.global_step % n:
            return
        model = self.model_of(pl_module)
        for name, member in members(self.regularizer):
            value = member(model).detach() if getattr(member, "attached", False) else member.last_value
            pl_module.log(f"clreg/{name}", value.to(torch.float32), on_step=True, on_epoch=False, sync_dist=False)

    # -- the end of a task -----------------------------------------------------------------------
    def _task_data(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if is_data_factory(self.data):
            return self.data(trainer, pl_module)
        if self.data is not None:
            return self.data
        if trainer.datamodule is not None:
            return trainer.datamodule.train_dataloader()
        return trainer.train_dataloader

    def _task_spec(self) -> TaskSpec | None:
        return self.spec(self.tasks) if callable(self.spec) else self.spec

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Consolidate on the task's data, then count the task."""
        self.regularizer.detach()
        if trainer.interrupted:  # stopped by hand or by an exception: the task is not over
            return
        self.regularizer.consolidate(self.model_of(pl_module), self._task_data(trainer, pl_module), self._task_spec())
        self.tasks += 1

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.regularizer.detach()

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"regularizer": self.regularizer.state_dict(), "tasks": self.tasks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.regularizer.load_state_dict(state_dict["regularizer"])
        self.tasks = int(state_dict["tasks"])
