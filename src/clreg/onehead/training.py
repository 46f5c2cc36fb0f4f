"""The training loop: AdamW with a cosine schedule over a fixed number of optimizer steps, one batch of
every task of a stage (plus replayed samples) in one forward pass, the regularizers through the core's
task lifecycle (:class:`~clreg.ContinualSession`: the closed-form members on the optimizer's steps, the
others in the loss, SI's path tracked).

:class:`RunSettings` holds what stays fixed across a run (batch size, weight decay, device, …);
:class:`TrainJob` what one call trains (tasks, budget, learning rate, seed, sessions, replay);
:func:`train` runs it and returns a :class:`TrainResult`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import stable_seed, tree_slice, tree_to
from ..distributed import rank_and_world
from ..session import ContinualSession
from .collate import collate

if TYPE_CHECKING:
    from ..replay import ReplayBuffer
    from .tasks import Task

__all__ = [
    "Replay",
    "RunSettings",
    "TrainJob",
    "TrainResult",
    "active_tasks",
    "collate",
    "cosine_schedule",
    "train",
    "train_task",
]


@dataclass(frozen=True)
class RunSettings:
    """What every training call and evaluation of a run shares."""

    batch_size: int = 16
    weight_decay: float = 1e-4
    bn: str = "train"  # "train" or "freeze" (BatchNorm statistics frozen after stage 1)
    resamples: int = 1000  # bootstrap resamples of every evaluation
    device: str = "cpu"
    amp: bool = False
    progress: bool = True
    backbone_lr_scale: float = 1.0  # the learning rate of parameters named "backbone.*", relative
    channels_last: bool = False  # train in the channels-last memory format (faster convolutions on CPU)
    warmup_steps: int = 0  # a linear learning-rate warmup before the cosine schedule (see cosine_schedule)

    def __post_init__(self) -> None:
        if self.bn not in ("train", "freeze"):
            raise ValueError(f"bn must be 'train' or 'freeze', got {self.bn!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class Replay:
    """Stored samples of past tasks mixed into every step: ``per_step`` in all, each past task's
    loss weighted by ``weight``."""

    buffer: ReplayBuffer
    tasks: dict[str, Task]
    per_step: int = 8
    weight: float = 1.0


@dataclass
class TrainJob:
    """One call of the training loop."""

    tasks: Sequence[Task]  # one batch of each per step (one task for a stage, all for the joint reference)
    steps: int
    lr: float
    seed: int
    sessions: Sequence[ContinualSession] = ()  # each begins its task on the optimizer; its penalty joins the loss
    watch: Callable[[nn.Module], AbstractContextManager] | None = None  # the forward's context (feature hooks)
    replay: Replay | None = None
    freeze_bn: bool = False
    desc: str = ""
    batches_per_task: Sequence[int] | None = None  # None: a batch of every task each step; else see active_tasks
    task_weights: Sequence[float] | None = None  # each task's loss weight (None: 1 each)

    def __post_init__(self) -> None:
        n = len(self.tasks)
        for name, v in (("batches_per_task", self.batches_per_task), ("task_weights", self.task_weights)):
            if v is not None and len(v) != n:
                raise ValueError(f"{name} needs one value per task ({n}), got {len(v)}")
        if self.batches_per_task is not None and not all(0 <= b <= self.steps for b in self.batches_per_task):
            raise ValueError(f"batches_per_task must lie in [0, steps={self.steps}], got {list(self.batches_per_task)}")


def active_tasks(step: int, steps: int, batches_per_task: Sequence[int] | None, n_tasks: int) -> list[int]:
    r"""The tasks that take a batch at ``step``: all of them, or, with ``batches_per_task`` (b_k of
    ``steps`` S), task k at the steps where :math:`\lfloor (s+1) b_k / S \rfloor > \lfloor s b_k / S \rfloor`:
    b_k steps spread evenly over the S (a task with b_k = S at every step).

    Example:
        >>> [active_tasks(s, 4, [4, 2, 1], 3) for s in range(4)]
        [[0], [0, 1], [0], [0, 1, 2]]
    """
    if batches_per_task is None:
        return list(range(n_tasks))
    return [k for k, b in enumerate(batches_per_task) if (step + 1) * b // steps > step * b // steps]


@dataclass
class TrainResult:
    steps: int
    seconds: float
    loss: float  # the running mean of the last steps' losses
    optimizer: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """What a unit keeps of it (the optimizer state is kept separately)."""
        return {"steps": self.steps, "seconds": self.seconds, "loss": self.loss}


def cosine_schedule(steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    r"""The learning-rate factor at optimizer step ``s`` (for ``LambdaLR``):

    .. math:: f(s) = \tfrac12\bigl(1 + \cos(\pi \min(s, T) / T)\bigr) \cdot \min\bigl(1, (s + 1) / W\bigr)

    with T = ``steps`` and W = ``warmup_steps`` (no warmup factor when W = 0). A warmup lets a model
    trained from scratch take a larger learning rate without diverging.

    Example:
        >>> f = cosine_schedule(100, warmup_steps=10)
        >>> round(f(0), 4), round(f(9), 4), f(100)
        (0.1, 0.9801, 0.0)
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def factor(s: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        return cosine * min(1.0, (s + 1) / warmup_steps) if warmup_steps else cosine

    return factor


def batches(data: Dataset, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Any]]:
    """Endless shuffled batches (drop-last), a new order and augmentation every epoch; under
    torch.distributed each rank reads its share (a DistributedSampler)."""
    rank, world = rank_and_world()
    epoch = 0
    while True:
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(data, world, rank, shuffle=True, seed=seed, drop_last=True)
            sampler.set_epoch(epoch)
            dl = DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True)
        else:
            g = torch.Generator().manual_seed(stable_seed(seed, epoch))
            dl = DataLoader(data, batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate, drop_last=True)
        n = 0
        for batch in dl:
            n += 1
            yield batch
        if n == 0:
            raise ValueError(f"the training data ({len(data)} items) is smaller than one batch ({batch_size})")
        epoch += 1


def freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool, epoch_steps: int = 1) -> None:
        self.bar = None
        self.epoch_steps, self.epochs = epoch_steps, math.ceil(total / epoch_steps)
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
            except ImportError:  # pragma: no cover - tqdm is in the benchmark extra
                self.bar = None

    def update(self, loss: float, step: int) -> None:
        if self.bar is not None:
            epoch = f"{step // self.epoch_steps + 1}/{self.epochs}"
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _optimizer(model: nn.Module, lr: float, run: RunSettings) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, the backbone's at ``lr × backbone_lr_scale``."""
    named = [(n.removeprefix("module."), p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not n.startswith("backbone.")], "lr": lr},
        {"params": [p for n, p in named if n.startswith("backbone.")], "lr": lr * run.backbone_lr_scale},
    ]
    # foreach: one fused pass per state tensor kind on every device (CPU too), the same arithmetic
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=run.weight_decay, foreach=True)


def _step_parts(
    job: TrainJob, step: int, streams: list[Iterator], g: torch.Generator, world: int
) -> list[tuple[Any, ...]]:
    """(task, inputs, targets, weight) of one step: a batch of every active task, then replayed samples."""
    weights = job.task_weights or [1.0] * len(job.tasks)
    active = active_tasks(step, job.steps, job.batches_per_task, len(job.tasks))
    parts = [(job.tasks[k], *next(streams[k]), weights[k]) for k in active]
    replay = job.replay
    if replay is not None and len(replay.buffer):
        for name, (x, y) in replay.buffer.sample(max(1, replay.per_step // world), generator=g).items():
            parts.append((replay.tasks[name], x, y, replay.weight))
    return parts


def _loss(model: nn.Module, parts: list[tuple[Any, ...]], job: TrainJob, run: RunSettings, autocast: Any) -> Tensor:
    """The sum of the parts' mean losses (one forward pass over all of them) plus the sessions'
    penalties (the members that are not attached)."""
    device = torch.device(run.device)
    xs = torch.cat([p[1] for p in parts]).to(device)
    if run.channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    with autocast, job.watch(model) if job.watch is not None else contextlib.nullcontext():
        out = model(xs)
    loss = torch.zeros((), device=device)
    start = 0
    for task, x, y, w in parts:
        n = x.shape[0]
        loss = loss + w * task.loss(tree_slice(out, slice(start, start + n)), tree_to(y, device)).float().mean()
        start += n
    for session in job.sessions:
        if session.needs_autograd:
            loss = loss + session.penalty(model, inputs=xs, outputs=out)
    return loss


def train(model: nn.Module, job: TrainJob, run: RunSettings) -> TrainResult:
    """``job.steps`` AdamW steps (cosine schedule); each step's loss is the sum of the tasks' mean
    losses (replayed tasks weighted) plus the sessions' penalties, each session's task begun on the
    optimizer and left (detached) at the end. A non-finite loss stops with an error."""
    device = torch.device(run.device)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)  # in place: the parameter objects stay the same
    opt = _optimizer(model, job.lr, run)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(job.steps, run.warmup_steps))
    for session in job.sessions:
        session.begin_task(opt)
    rank, world = rank_and_world()
    per_rank = max(1, run.batch_size // world)  # the global batch stays run.batch_size under DDP
    streams = [batches(t.train_data, per_rank, stable_seed(job.seed, "batches", t.name)) for t in job.tasks]
    g = torch.Generator().manual_seed(stable_seed(job.seed, "replay", rank))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if run.amp else contextlib.nullcontext()
    epoch_steps = max(1, len(job.tasks[0].train_data) // (per_rank * world))  # batches per epoch (first task)
    bar = _Progress(job.steps, job.desc, run.progress, epoch_steps)
    model.train()
    if job.freeze_bn:
        freeze_batchnorm(model)
    t0, running = time.perf_counter(), 0.0
    try:
        for step in range(job.steps):
            loss = _loss(model, _step_parts(job, step, streams, g, world), job, run, autocast)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"{job.desc}: the loss became {value} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running = 0.95 * running + 0.05 * value if step else value
            bar.update(running, step)
    finally:
        bar.close()
        for session in job.sessions:
            session.abort_task()
    return TrainResult(job.steps, time.perf_counter() - t0, running, opt.state_dict())


def train_task(
    model: nn.Module,
    task: Task,
    steps: int,
    *,
    lr: float = 2e-3,
    run: RunSettings | None = None,
    seed: int = 0,
    regularizer: nn.Module | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """:func:`train` on one task's loss (+ regularizer), with a progress bar when ``log`` is given,
    then one line to it; returns the result's record."""
    run = run or RunSettings(progress=log is not None)
    sessions = () if regularizer is None else (ContinualSession(regularizer),)
    res = train(model, TrainJob([task], steps, lr, seed, sessions=sessions, desc=task.name), run).record()
    if log is not None:
        log(f"{task.name}: {steps} steps, loss {res['loss']:.4f} ({res['seconds']:.0f} s)")
    return res
