"""``ContinualSession``: the per-task lifecycle of one regularizer (or :class:`~clreg.Compose`), the calls a
training loop makes around each task, so that a loop, or a framework's callback, needs no more than a
mapping of its hooks onto them:

============================  ===========================================================================
call                          what it does
============================  ===========================================================================
``begin_task(optimizer)``     attach the members with a closed-form gradient to the optimizer (a step
                              pre-hook, or none with ``hook=False``) and track the path of those that
                              follow one without being attached (SI with ``attach=False``)
``penalty(model, …)``         the value of the members that are not attached (LwF …), for the loss
``pre_step()``                with ``hook=False``: add the attached members' gradient now (after the
                              backward, once per optimizer step)
``values()``                  each member's value, for logging
``end_task(model, data)``     detach, consolidate on the task's data with the model in eval mode (its
                              modes restored after), count the task
``consolidate(model, data)``  the same between tasks, for a resumed run that consolidates a task it
                              trained before it stopped
``state_dict()``              the regularizer's state and the task count: ``{"regularizer": …, "tasks": n}``
============================  ===========================================================================

Example:
    >>> import torch, clreg
    >>> from clreg.session import ContinualSession
    >>> model = torch.nn.Linear(4, 3)
    >>> session = ContinualSession(clreg.Compose(clreg.EWC(model, lam=1.0), clreg.LwF(model)))
    >>> data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> for task in range(2):
    ...     optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ...     session.begin_task(optimizer)               # EWC attached, LwF in the loss
    ...     for x, y in torch.utils.data.DataLoader(data, batch_size=4):
    ...         optimizer.zero_grad()
    ...         out = model(x)
    ...         loss = torch.nn.functional.cross_entropy(out, y) + session.penalty(model, x, out)
    ...         loss.backward()
    ...         optimizer.step()                        # EWC's gradient added by the hook
    ...     session.end_task(model, data)
    >>> session.tasks, sorted(session.values(model))
    (2, ['ewc', 'lwf'])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .functional._per_sample import eval_mode
from .integrations._common import members
from .regularizers import Compose, Regularizer
from .spec import TaskSpec

__all__ = ["ContinualSession", "eval_mode"]

SpecSource = TaskSpec | Callable[[int], TaskSpec] | None


class ContinualSession:
    """One regularizer (or Compose) across a sequence of tasks (see the module).

    Args:
        regularizer: a clreg regularizer or :class:`~clreg.Compose`.
        attach: attach the members with a closed-form gradient at :meth:`begin_task` (default); with
            ``False`` every member's value goes into :meth:`penalty` and the members that follow a path
            (SI) only track it.
        optimizer_label: how error messages name the optimizer (e.g. ``"the Trainer's optimizer"``).
    """

    def __init__(
        self, regularizer: Regularizer | Compose, *, attach: bool = True, optimizer_label: str = "the optimizer"
    ) -> None:
        if not isinstance(regularizer, (Regularizer, Compose)):
            raise TypeError(f"ContinualSession takes a clreg regularizer or Compose, got {type(regularizer).__name__}")
        self.regularizer = regularizer
        self.attach = bool(attach)
        self.optimizer_label = optimizer_label
        self.model: nn.Module | None = None  # the model of the task under way (or of the last one)
        self._tasks = 0
        self._in_task = False
        self._hook = True

    # -- what goes where -------------------------------------------------------------------------------
    @property
    def tasks(self) -> int:
        """The tasks ended (consolidated) so far."""
        return self._tasks

    @property
    def in_task(self) -> bool:
        """True between :meth:`begin_task` and :meth:`end_task` (or :meth:`abort_task`)."""
        return self._in_task

    @property
    def members(self) -> list[tuple[str, Regularizer]]:
        """The members by name (``ewc``, ``lwf``, ``ewc_1`` …), nested Compose members flattened."""
        return members(self.regularizer)

    @property
    def attached_members(self) -> list[Regularizer]:
        """The members :meth:`begin_task` attaches (those with a closed-form gradient, with ``attach``)."""
        if not self.attach:
            return []
        reg = self.regularizer
        if isinstance(reg, Compose):
            return reg.members_that("attachable")
        return [reg] if type(reg).attachable else []

    @property
    def trackers(self) -> list[Regularizer]:
        """The members that track the optimizer's path without being attached (SI with ``attach=False``)."""
        attached = self.attached_members
        return [m for _, m in self.members if type(m).tracks_path and not any(m is a for a in attached)]

    @property
    def needs_optimizer(self) -> bool:
        """True when :meth:`begin_task` needs an optimizer (a member to attach or a path to track)."""
        return bool(self.attached_members or self.trackers)

    @property
    def needs_autograd(self) -> bool:
        """True when some member's gradient must come from the loss (:meth:`penalty`)."""
        return len(self.attached_members) < len(self.members)

    # -- a task ----------------------------------------------------------------------------------------
    def begin_task(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: Any = None,
        hook: bool = True,
        *,
        model: nn.Module | None = None,
    ) -> None:
        """Start a task on ``optimizer`` (a torch optimizer; ``None`` when :attr:`needs_optimizer` is
        False): attach the attachable members (``scaler``, a GradScaler, goes to each; with ``hook=False``
        call :meth:`pre_step` after each backward instead of relying on a step pre-hook) and track the
        path of the :attr:`trackers`. ``model``: the model the task trains; when given, the regularizer is
        moved to its device and its parameters are checked against the ones the regularizer was built on
        (a ValueError when they differ)."""
        if self._in_task:
            raise ValueError("begin_task called twice: end_task (or abort_task) the task under way first")
        if model is not None:
            self.set_model(model)
        attached, trackers = self.attached_members, self.trackers
        if attached or trackers:
            if optimizer is None:
                names = [type(m).__name__ for m in attached + trackers]
                raise ValueError(f"begin_task needs the optimizer: {names} attach to it or track its path")
            self._check_optimizer(optimizer, attached + trackers)
            if attached:
                self.regularizer.attach(optimizer, scaler=scaler, hook=hook)
            for member in trackers:
                member.track(optimizer, scaler=scaler)
        self._hook = bool(hook)
        self._in_task = True

    def set_model(self, model: nn.Module) -> None:
        """Make ``model`` the task's model (the default of :meth:`penalty` and :meth:`values`): the
        regularizer is moved to its device and its parameters are checked against the ones the
        regularizer was built on (a ValueError when they differ). :meth:`begin_task` calls it when given
        ``model``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected the model (an nn.Module), got {type(model).__name__}")
        self.regularizer.to(next(model.parameters()).device)
        for _, member in self.members:
            member._resolve(model)
        self.model = model

    def _check_optimizer(self, optimizer: Any, regs: list[Regularizer]) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"begin_task expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for member in regs:
            try:
                params = member._pset.last()
            except ValueError:  # never resolved: the attach itself checks
                continue
            missing = [n for n, p in zip(member.param_names, params) if id(p) not in held]
            if len(missing) == len(params):
                raise ValueError(
                    f"{self.optimizer_label} holds none of the {type(member).__name__}'s parameters (e.g. "
                    f"{missing[:3]}): were they frozen after it was built? Build it over the trainable ones"
                )
            if missing:
                warnings.warn(
                    f"{len(missing)} of the {type(member).__name__}'s parameters are not in {self.optimizer_label} "
                    f"(frozen?), e.g. {missing[:3]}: the penalty does not act on them",
                    stacklevel=4,
                )

    def penalty(self, model: nn.Module | None = None, inputs: Any = None, outputs: Any = None) -> Tensor:
        """What the loss adds: the value of the members that are not attached (LwF …, or every member with
        ``attach=False``); zero when every member is attached. ``model``: default the task's."""
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("ContinualSession.penalty needs the model (or begin_task(..., model=model) first)")
        return self.regularizer.autograd_value(model, inputs=inputs, outputs=outputs)

    def pre_step(self) -> None:
        """Add the attached members' closed-form gradient to ``.grad`` now, once per optimizer step after
        the backward: for a loop that steps in a closure and began the task with ``hook=False``. Nothing
        to do when no member is attached."""
        if not self._in_task:
            raise ValueError("pre_step outside a task: call begin_task(optimizer, hook=False) first")
        if self._hook and self.attached_members:
            raise ValueError("pre_step with the step pre-hook on: begin the task with hook=False to call it")
        if self.attached_members:
            self.regularizer.pre_step()

    def values(self, model: nn.Module | None = None) -> dict[str, Tensor]:
        """Each member's value by name, for logging (detached): an attached member's at ``model``'s current
        parameters (default the task's model), the others' last value (from the last :meth:`penalty`)."""
        model = model if model is not None else self.model
        out = {}
        with torch.no_grad():
            for name, member in self.members:
                attached = getattr(member, "attached", False) and model is not None
                value = member(model) if attached else member.last_value
                out[name] = value.detach()
        return out

    def end_task(self, model: nn.Module, data: Any = None, spec: SpecSource = None) -> None:
        """End the task: detach, consolidate on ``data`` with ``model`` in eval mode (BatchNorm statistics
        untouched, dropout off; every submodule's mode restored after), count the task. ``spec``: the
        task's :class:`~clreg.TaskSpec`, or a callable of the task's index (0, 1, …)."""
        if not self._in_task:
            raise ValueError("end_task without begin_task: there is no task under way")
        if not isinstance(model, nn.Module):
            raise TypeError(f"end_task expects the model (an nn.Module), got {type(model).__name__}")
        self.abort_task()
        self.consolidate(model, data, spec)

    def consolidate(self, model: nn.Module, data: Any = None, spec: SpecSource = None) -> None:
        """Consolidate a task trained without a task under way here (a resumed run that saved the
        model after training and consolidates when it starts again): with ``model`` in eval mode (every
        submodule's mode restored after), count the task. :meth:`end_task` is :meth:`abort_task` and
        this; only between tasks."""
        if self._in_task:
            raise ValueError("consolidate during a task: end_task consolidates the task under way")
        if not isinstance(model, nn.Module):
            raise TypeError(f"consolidate expects the model (an nn.Module), got {type(model).__name__}")
        if spec is not None and not isinstance(spec, TaskSpec):
            if not callable(spec):
                raise TypeError(f"spec must be a TaskSpec or a callable of the task's index, got {type(spec).__name__}")
            spec = spec(self._tasks)
        with eval_mode(model):
            self.regularizer.consolidate(model, data, spec)
        self._tasks += 1

    def abort_task(self) -> None:
        """Leave the task under way without consolidating (a run stopped or raised): detach. Nothing to do
        when no task is under way."""
        self.regularizer.detach()
        self._in_task = False

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"regularizer": the regularizer's state_dict, "tasks": n}`` (loadable with ``weights_only=True``)."""
        return {"regularizer": self.regularizer.state_dict(), "tasks": self._tasks}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` returned, between tasks."""
        if self._in_task:
            raise ValueError("load_state_dict during a task: load the state before begin_task (or after end_task)")
        if not isinstance(state_dict, Mapping) or not {"regularizer", "tasks"} <= set(state_dict):
            got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"not a ContinualSession state: expected the keys 'regularizer' and 'tasks', got {got}")
        tasks = int(state_dict["tasks"])
        if tasks < 0:
            raise ValueError(f"a ContinualSession state's task count must be >= 0, got {tasks}")
        self.regularizer.load_state_dict(state_dict["regularizer"])
        self._tasks = tasks
