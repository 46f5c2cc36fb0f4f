r"""``clreg.testing``: one contract for every regularizer, clreg's own and yours.

:func:`check_regularizer` runs the same checks on any :class:`~clreg.Regularizer` and raises an
``AssertionError`` naming the check that failed (``clreg.testing: EWC fails check 'gradient': …``).
On a float64 copy of the model it

1. ``zero``: before any consolidation, the value is a zero tensor on the parameters' device;
2. ``training``: trains the model a few SGD steps on ``data`` with the regularizer in the loss
   (tracking the optimizer where the class ``tracks_path``), consolidates, repeats for a second task,
   then perturbs the parameters; ``non-trivial``: the value is then not 0;
3. ``reference``: the value equals ``reference(model, reg, inputs, tasks)``, a plain-PyTorch
   computation from the definitions that the caller supplies (the tasks' records give it what
   happened: the model at each consolidation, the batch, every step's parameters and task-loss
   gradient); ``gradient``: the regularizer's gradient equals autograd's of the reference;
4. ``finite difference``: the gradient along a random direction equals a central difference of the
   regularizer's own value;
5. ``state round trip``: ``torch.save(reg.state_dict())``, ``torch.load(weights_only=True)``, a fresh
   ``make(model)`` and ``load_state_dict(strict=True)`` give the same value and gradient;
6. ``attached`` (where the class is ``attachable``): one SGD step with the value in the loss and one
   with ``reg.attach(optimizer)`` and the plain loss give the same parameters;
7. ``float64``: the floating-point state is float64 and the value has ``value_dtype``; ``autocast``: on
   a float32 copy under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the value is float32 or wider;
8. ``compile`` (``compile=True``): a regularizer built on ``torch.compile(model, backend="eager")`` has
   the plain parameter names, takes the state and gives the same value;
9. ``bad input``: the value on a model whose parameter has another shape is a ``ValueError`` naming
   that parameter.

The value and the reference are computed with the model in eval mode.

Example:
    >>> import torch, clreg
    >>> from clreg.testing import check_regularizer
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(3, 2)
    >>> data = torch.utils.data.TensorDataset(torch.randn(6, 3), torch.randint(0, 2, (6,)))
    >>> def reference(model, reg, inputs, tasks):   # MAS from its definition, one anchor
    ...     omega = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    ...     for task in tasks:
    ...         old = task.model
    ...         for x in task.batch[0]:
    ...             grads = torch.autograd.grad(old(x[None]).square().sum(), list(old.parameters()))
    ...             for (n, _), g in zip(old.named_parameters(), grads):
    ...                 omega[n] += g.abs() / len(task.batch[0])
    ...     anchor = dict(tasks[-1].model.named_parameters())
    ...     return reg.lam * sum((omega[n] * (p - anchor[n].detach()) ** 2).sum() for n, p in model.named_parameters())
    >>> check_regularizer(lambda m: clreg.MAS(m, lam=2.0), model, data, reference=reference, compile=False)
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from ._params import canonical_name
from .data import batch_size_of, tree_map
from .regularizers.base import Regularizer
from .spec import TaskSpec

__all__ = ["Reference", "StepRecord", "TaskRecord", "check_regularizer"]


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step of the contract's training: the parameters before and after it, and the task
    loss's gradient (without the regularizer's) at ``before``, by parameter name."""

    before: dict[str, Tensor]
    grad: dict[str, Tensor]
    after: dict[str, Tensor]


@dataclass(frozen=True)
class TaskRecord:
    """One task of the contract's training: a copy of the model at its consolidation, the batch
    ``(inputs, targets)`` it trained and consolidated on, the spec, and its steps."""

    model: nn.Module
    batch: tuple[Any, Any]
    spec: TaskSpec | None
    steps: list[StepRecord]


Reference = Callable[[nn.Module, Regularizer, Any, Sequence[TaskRecord]], Tensor]
"""``reference(model, reg, inputs, tasks) -> Tensor``: the value from the definitions (``reg`` for its
hyperparameters, ``tasks`` for what happened)."""


def check_regularizer(
    make: Callable[[nn.Module], Regularizer],
    model: nn.Module,
    data: Dataset,
    spec: TaskSpec | None = None,
    *,
    reference: Reference | None = None,
    inputs: Any = None,
    loss: Callable[[Any, Any], Tensor] | None = None,
    atol: float = 1e-8,
    rtol: float = 1e-6,
    value_dtype: torch.dtype = torch.float64,
    compile: bool = True,
) -> None:
    """Run the contract (see the module) on ``make(model)``; an ``AssertionError`` names a failed check.

    Args:
        make: builds the regularizer on a model (called on copies of ``model``).
        model: a small model; it is not changed (the contract works on copies).
        data: a ``Dataset`` of ``(input, target)`` items, trained on as one batch and consolidated on.
        spec: the :class:`~clreg.TaskSpec` given to ``consolidate``.
        reference: the value from the definitions, see :data:`Reference`; without it the ``reference``
            and ``gradient`` checks are skipped.
        inputs: the inputs the value is checked on (default: the batch's).
        loss: the task loss ``loss(outputs, targets)`` (default: cross-entropy).
        atol, rtol: the tolerances of every comparison (float64).
        value_dtype: the value's dtype on a float64 model (LwF's distillation computes in float32).
        compile: run the ``compile`` check (a ``torch.compile`` with the eager backend).
    """
    run = _Run(make, _float64(model), _float64(_collate(data)), spec, loss or F.cross_entropy, atol, rtol)
    run.inputs = run.batch[0] if inputs is None else _float64(inputs)
    with _check(run, "zero"):
        _check_zero(run)
    with _check(run, "training"):
        _train_tasks(run)
    with _check(run, "non-trivial"):
        assert float(run.value().detach()) != 0.0, "the value is 0 after two tasks and a perturbation"
    if reference is not None:
        _check_reference(run, reference)
    with _check(run, "finite difference"):
        _check_finite_difference(run)
    with _check(run, "state round trip"):
        _check_round_trip(run)
    if type(run.reg).attachable:
        with _check(run, "attached"):
            _check_attached(run)
    _check_dtypes(run, value_dtype)
    if compile:
        with _check(run, "compile"):
            _check_compile(run)
    with _check(run, "bad input"):
        _check_bad_input(run)


# -- the run ---------------------------------------------------------------------------------------

_STEPS, _LR, _TASKS, _NOISE = 3, 0.2, 2, 0.05


@dataclass
class _Run:
    make: Callable[[nn.Module], Regularizer]
    model: nn.Module
    batch: tuple[Any, Any]
    spec: TaskSpec | None
    loss: Callable[[Any, Any], Tensor]
    atol: float
    rtol: float
    inputs: Any = None
    reg: Any = None
    tasks: list[TaskRecord] = field(default_factory=list)

    @property
    def name(self) -> str:
        return type(self.reg).__name__ if self.reg is not None else "the regularizer"

    def value(self, reg: Regularizer | None = None, model: nn.Module | None = None) -> Tensor:
        """The value at ``model``'s parameters on the run's inputs (eval mode)."""
        reg = self.reg if reg is None else reg
        model = self.model if model is None else model
        model.eval()
        return reg(model, inputs=self.inputs, outputs=model(self.inputs))

    def grads(self, value: Tensor, model: nn.Module | None = None, retain: bool = False) -> list[Tensor]:
        """d value / d parameter, zeros where the value does not depend on a parameter."""
        params = _trainable(self.model if model is None else model)
        grads = torch.autograd.grad(value, params, retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]

    def close(self, actual: Any, expected: Any, what: str, scale: float = 1.0) -> None:
        torch.testing.assert_close(
            actual, expected, atol=self.atol * scale, rtol=self.rtol * scale, msg=lambda m: f"{what}: {m}"
        )

    def restore(self, model: nn.Module) -> Regularizer:
        """A fresh regularizer on ``model`` with the state saved by the run's, through ``torch.save``."""
        buf = io.BytesIO()
        torch.save(self.reg.state_dict(), buf)
        buf.seek(0)
        fresh = self.make(model)
        fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
        return fresh


@contextlib.contextmanager
def _check(run: _Run, name: str) -> Iterator[None]:
    try:
        yield
    except AssertionError as err:
        raise AssertionError(f"clreg.testing: {run.name} fails check {name!r}: {err}") from err
    except Exception as err:
        raise AssertionError(f"clreg.testing: {run.name} fails check {name!r}: {type(err).__name__}: {err}") from err


def _float64(tree: Any) -> Any:
    if isinstance(tree, nn.Module):
        return copy.deepcopy(tree).double()
    return tree_map(lambda t: t.double() if t.is_floating_point() else t, tree)


def _collate(data: Dataset) -> tuple[Any, Any]:
    inputs, targets = default_collate([data[i] for i in range(len(data))])  # type: ignore[arg-type]
    return inputs, targets


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _named(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class _Batch(Dataset):
    """The run's batch as a Dataset of items, for ``consolidate``."""

    def __init__(self, batch: tuple[Any, Any]) -> None:
        self.inputs, self.targets = batch

    def __len__(self) -> int:
        return batch_size_of(self.inputs)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        return tree_map(lambda t: t[i], self.inputs), tree_map(lambda t: t[i], self.targets)


# -- the checks ------------------------------------------------------------------------------------


def _check_zero(run: _Run) -> None:
    run.reg = run.make(run.model)
    if not isinstance(run.reg, Regularizer):
        raise TypeError(f"make(model) must return a clreg.Regularizer, got {type(run.reg).__name__}")
    value = run.value()
    device = _trainable(run.model)[0].device
    assert isinstance(value, Tensor), (
        f"the value before any consolidation is {value!r} ({type(value).__name__}), not a tensor"
    )
    assert value.shape == () and float(value.detach()) == 0.0, f"the value before any consolidation is {value}, not 0"
    assert value.device == device, f"the value is on {value.device}, the parameters on {device}"


def _train_tasks(run: _Run) -> None:
    for _ in range(_TASKS):
        opt = torch.optim.SGD(_trainable(run.model), lr=_LR)
        if type(run.reg).tracks_path:
            run.reg.track(opt)
        steps = [_train_step(run, opt) for _ in range(_STEPS)]
        run.reg.detach()
        run.reg.consolidate(run.model, _Batch(run.batch), run.spec)
        run.tasks.append(TaskRecord(copy.deepcopy(run.model).eval(), run.batch, run.spec, steps))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in _trainable(run.model):
            p.add_(_NOISE * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


def _train_step(run: _Run, opt: torch.optim.Optimizer) -> StepRecord:
    model, (x, y) = run.model, run.batch
    model.train()
    before = _named(model)
    opt.zero_grad()
    out = model(x)
    task = run.loss(out, y)
    grads = run.grads(task, retain=True) if task.requires_grad else [torch.zeros_like(p) for p in _trainable(model)]
    (task + run.reg(model, inputs=x, outputs=out)).backward()
    opt.step()
    return StepRecord(before, dict(zip(before, grads)), _named(model))


def _check_reference(run: _Run, reference: Reference) -> None:
    with _check(run, "reference"):
        value = run.value()
        expected = reference(run.model, run.reg, run.inputs, run.tasks)
        run.close(value.detach().to(expected.dtype), expected.detach(), "value against the reference")
    with _check(run, "gradient"):
        assert expected.requires_grad, "the reference does not depend on the parameters (no graph)"
        for g, r, p in zip(run.grads(value), run.grads(expected), _trainable(run.model)):
            run.close(g, r.to(g.dtype), f"gradient of a parameter of shape {tuple(p.shape)} against the reference's")


def _check_finite_difference(run: _Run) -> None:
    params = _trainable(run.model)
    value = run.value()
    g = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params]
    slope = sum((gr * d).sum() for gr, d in zip(run.grads(value), direction))
    eps, scale = (1e-6, 1.0) if value.dtype == torch.float64 else (1e-3, 1e3)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_add_(params, direction, alpha=eps)
        plus = run.value().double()
        torch._foreach_add_(params, direction, alpha=-2 * eps)
        minus = run.value().double()
        torch._foreach_copy_(params, saved)
    central = (plus - minus) / (2 * eps)
    run.close(central, torch.as_tensor(slope, dtype=torch.float64), "central difference against the gradient", scale)


def _check_round_trip(run: _Run) -> None:
    value = run.value()
    fresh = run.restore(run.model)
    again = fresh(run.model, inputs=run.inputs, outputs=run.model(run.inputs))
    run.close(again.detach(), value.detach(), "value after the round trip")
    for a, b in zip(run.grads(again), run.grads(value)):
        run.close(a, b, "gradient after the round trip")
    fresh.detach()


def _check_attached(run: _Run) -> None:
    stepped = []
    for attach in (False, True):
        model = copy.deepcopy(run.model)
        reg = run.restore(model)
        opt = torch.optim.SGD(_trainable(model), lr=_LR)
        if attach:
            reg.attach(opt)
        opt.zero_grad()
        out = model(run.batch[0])
        loss = run.loss(out, run.batch[1])
        (loss if attach else loss + reg(model, inputs=run.batch[0], outputs=out)).backward()
        opt.step()
        reg.detach()
        stepped.append(_trainable(model))
    for a, b in zip(*stepped):
        run.close(b.detach(), a.detach(), "parameters after an attached step against an autograd step")


def _check_dtypes(run: _Run, value_dtype: torch.dtype) -> None:
    with _check(run, "float64"):
        wrong = [n for n, b in run.reg.named_buffers() if b.is_floating_point() and b.dtype != torch.float64]
        assert not wrong, f"state {wrong} is not float64 on a float64 model"
        value = run.value()
        assert value.dtype == value_dtype, f"the value is {value.dtype} on a float64 model, expected {value_dtype}"
    with _check(run, "autocast"):
        model = copy.deepcopy(run.model).float()
        reg = run.restore(model)
        inputs = tree_map(lambda t: t.float() if t.is_floating_point() else t, run.inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = reg(model, inputs=inputs, outputs=model(inputs))
        assert value.dtype in (torch.float32, torch.float64), f"the value under bfloat16 autocast is {value.dtype}"


def _check_compile(run: _Run) -> None:
    compiled = torch.compile(run.model, backend="eager")
    reg = run.make(compiled)
    assert reg.param_names == run.reg.param_names, (
        f"built on a compiled model the names are {reg.param_names[:3]}…, not {run.reg.param_names[:3]}…"
    )
    reg.load_state_dict(run.reg.state_dict(), strict=True)
    run.model.eval()
    value = reg(compiled, inputs=run.inputs, outputs=compiled(run.inputs))
    run.close(value.detach(), run.value().detach(), "value on the compiled model")


def _check_bad_input(run: _Run) -> None:
    name = run.reg.param_names[0]
    model = copy.deepcopy(run.model)
    param = {canonical_name(n): p for n, p in model.named_parameters()}[name]
    param.data = torch.zeros([s + 1 for s in param.shape], dtype=param.dtype, device=param.device)
    try:
        run.reg(model, inputs=run.inputs, outputs=run.model(run.inputs))
    except ValueError as err:
        assert name in str(err), f"the ValueError does not name the parameter {name!r}: {err}"
    else:
        raise AssertionError(f"no ValueError when parameter {name!r} has another shape")
