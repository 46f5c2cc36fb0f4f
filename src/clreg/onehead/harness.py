"""A generic, resumable harness for sequential training: stages, methods, evaluations, checkpoints.

A run is a list of :class:`Stage` (a task name, a budget in optimizer steps, a learning rate,
per-stage method settings) over a dict of :class:`HarnessTask` (training data, per-sample loss,
:class:`~clreg.TaskSpec`, an ``evaluate(model)`` returning a metric). For every method it trains the
stages in order with the method's regularizer and replay buffer and evaluates every task after every
stage: the accuracy matrix ``R[stage][task]``. It also trains each task alone (the single-task
baseline, same budget) and all tasks together (the joint reference).

Stage 1 has no regularizer, so one stage-1 run serves every method (with SI's path tracking on);
each later unit of work starts from a saved state. Every unit's end state (model, optimizer,
regularizer, replay buffer, RNG state, evaluations) is written atomically to
``<out>/state/seed<k>/<unit>.pt`` and loads with ``torch.load(weights_only=True)``: a run killed at any
point resumes after the last finished unit, and a finished unit is never repeated. Every unit seeds
its own randomness from (seed, unit), so a resumed run gives the numbers of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import stable_seed, tree_slice, tree_to
from ..distributed import rank_and_world
from ..regularizers.si import SI
from .methods import Method
from .metrics import _interval, resample_counts

__all__ = ["HarnessTask", "RunSettings", "Runner", "Stage", "cosine_schedule", "evaluation_record", "peak_rss_sampler"]

log = logging.getLogger("clreg.onehead")


@dataclass
class HarnessTask:
    """What the harness needs of a task."""

    name: str
    train_data: Dataset
    loss: Callable[[Any, Any], Tensor]  # per sample: (outputs, target) -> Tensor[B]
    spec: Any  # a clreg.TaskSpec
    evaluate: Callable[[nn.Module], Any]  # -> a metric with value(), scores(counts), n
    metric_name: str = "score"
    fit_data: Dataset | None = None  # training images with the evaluation transform, for consolidate
    chance: float = 0.0
    extras: Callable[[Any], dict[str, Any]] | None = None  # more figures from a metric (per-class, …)
    # called on the model when the task's stage starts after another stage (the same for every method)
    prepare: Callable[[nn.Module], None] | None = None


@dataclass
class Stage:
    task: str
    steps: int
    lr: float | None = None  # None: the method's "lr" setting
    settings: dict[str, float] = field(default_factory=dict)  # per-stage overrides, e.g. {"ewc.lam": 3.0}
    warmup_steps: int | None = None  # None: the RunSettings' warmup


@dataclass
class RunSettings:
    batch_size: int = 16
    weight_decay: float = 1e-4
    bn: str = "train"  # "train" or "freeze" (BatchNorm statistics frozen after stage 1)
    fisher_samples: int | None = None  # None: the whole training set
    resamples: int = 1000
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

    def factor(s: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        return cosine * min(1.0, (s + 1) / warmup_steps) if warmup_steps else cosine

    return factor


def evaluation_record(metric: Any, resamples: int, extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """A metric's value, its 95 % bootstrap interval and the resampled scores (seeded by the number
    of images, so every record of a task uses the same resamples and can be paired)."""
    boot = metric.scores(resample_counts(metric.n, resamples, seed=metric.n)).double()
    lo, hi = _interval(boot)
    return {"value": float(metric.value()), "lo": lo, "hi": hi, "n": int(metric.n), "boot": boot, **(extras or {})}


# -- memory ------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def peak_rss_sampler(interval: float = 0.05) -> Iterator[dict[str, int]]:
    """The peak resident memory of this process while the block runs, sampled every ``interval`` s
    (reset at entry, so one unit's peak cannot hide another's): ``{"start", "peak"}`` in bytes."""
    box = {"start": _rss_bytes(), "peak": _rss_bytes()}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            box["peak"] = max(box["peak"], _rss_bytes())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield box
    finally:
        stop.set()
        t.join()
        box["peak"] = max(box["peak"], _rss_bytes())


# -- checkpoints -------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _regularizer_bytes(reg: nn.Module | None, buffer: nn.Module | None) -> int:
    n = 0
    if reg is not None:
        n += sum(t.numel() * t.element_size() for t in reg.state_dict().values() if isinstance(t, Tensor))
    if buffer is not None:
        n += buffer.state_bytes()
    return n


# -- training ----------------------------------------------------------------------------------------


def collate(batch: list) -> tuple[Tensor, Any]:
    """Stack ``(input, target)`` items; a dict target is stacked per key."""
    xs = torch.stack([b[0] for b in batch])
    ys = [b[1] for b in batch]
    if isinstance(ys[0], dict):
        return xs, {k: torch.stack([y[k] for y in ys]) for k in ys[0]}
    return xs, torch.stack(ys)


def _batches(data: Dataset, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Any]]:
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


def _freeze_batchnorm(model: nn.Module) -> None:
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


def train_steps(
    model: nn.Module,
    tasks: list[HarnessTask],
    steps: int,
    lr: float,
    run: RunSettings,
    seed: int,
    *,
    reg: nn.Module | None = None,
    replay: Any = None,
    replay_tasks: dict[str, HarnessTask] | None = None,
    replay_per_step: int = 8,
    replay_weight: float = 1.0,
    si_track: SI | None = None,
    freeze_bn: bool = False,
    desc: str = "",
) -> dict[str, Any]:
    """``steps`` AdamW steps (cosine schedule). Each step takes one batch of every task in ``tasks``
    (one for a stage, all for the joint reference) plus, with a replay buffer, ``replay_per_step``
    stored samples, all in one forward pass; the loss is the sum of the tasks' mean losses
    (replayed tasks weighted by ``replay_weight``) plus the regularizer."""
    device = torch.device(run.device)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)  # in place: the parameter objects stay the same
    named = [(n.removeprefix("module."), p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not n.startswith("backbone.")], "lr": lr},
        {"params": [p for n, p in named if n.startswith("backbone.")], "lr": lr * run.backbone_lr_scale},
    ]
    # foreach: one fused pass per state tensor kind on every device (CPU too), the same arithmetic
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=run.weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps, run.warmup_steps))
    if reg is not None:
        reg.attach(opt)
    if si_track is not None:
        si_track.track(opt)
    rank, world = rank_and_world()
    per_rank = max(1, run.batch_size // world)  # the global batch stays run.batch_size under DDP
    streams = [_batches(t.train_data, per_rank, stable_seed(seed, "batches", t.name)) for t in tasks]
    g = torch.Generator().manual_seed(stable_seed(seed, "replay", rank))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if run.amp else contextlib.nullcontext()
    epoch_steps = max(1, len(tasks[0].train_data) // (per_rank * world))  # batches per epoch (first task)
    bar = _Progress(steps, desc, run.progress, epoch_steps)
    model.train()
    if freeze_bn:
        _freeze_batchnorm(model)
    t0, running = time.perf_counter(), 0.0
    try:
        for step in range(steps):
            parts = [(t, *next(s)) for t, s in zip(tasks, streams)]
            if replay is not None and len(replay):
                for name, (x, y) in replay.sample(max(1, replay_per_step // world), generator=g).items():
                    parts.append((replay_tasks[name], x, y))
            xs = torch.cat([p[1] for p in parts]).to(device)
            if run.channels_last:
                xs = xs.contiguous(memory_format=torch.channels_last)
            with autocast:
                out = model(xs)
            loss = torch.zeros((), device=device)
            start = 0
            for i, (task, x, y) in enumerate(parts):
                n = x.shape[0]
                o = tree_slice(out, slice(start, start + n))
                w = 1.0 if i < len(tasks) else replay_weight
                loss = loss + w * task.loss(o, tree_to(y, device)).float().mean()
                start += n
            if reg is not None:
                loss = loss + reg(model, inputs=xs, outputs=out)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"{desc}: the loss became {value} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running = 0.95 * running + 0.05 * value if step else value
            bar.update(running, step)
    finally:
        bar.close()
        if reg is not None:
            reg.detach()
        if si_track is not None:
            si_track.detach()
    return {"steps": steps, "seconds": time.perf_counter() - t0, "loss": running, "optimizer": opt.state_dict()}


# -- the runner --------------------------------------------------------------------------------------


class Runner:
    """Runs the units of one seed: the shared stage 1, the single-task baselines, the joint
    reference and each method's later stages, each resumable from ``<out>/state/seed<k>/``.

    Args:
        make_model: builds a fresh model (same architecture every time); seeded by the runner.
        tasks: the tasks by name.
        stages: the sequence; stage 1 trains without a regularizer.
        run: batch size, weight decay, BatchNorm policy, device, …
        out: the output folder.
        seed: the seed of this run.
        wrap: an optional ``model -> model`` applied for training (e.g. DDP).
        log_line: receives one line per finished unit.
    """

    def __init__(
        self,
        make_model: Callable[[], nn.Module],
        tasks: dict[str, HarnessTask],
        stages: list[Stage],
        run: RunSettings,
        out: str | Path,
        seed: int = 0,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        log_line: Callable[[str], None] = print,
        lr: float = 2e-3,
    ) -> None:
        unknown = [s.task for s in stages if s.task not in tasks]
        if unknown:
            raise ValueError(f"stages name unknown tasks {unknown}; tasks: {list(tasks)}")
        if len({s.task for s in stages}) != len(stages):
            raise ValueError("each task may appear in one stage only")
        self.make_model, self.tasks, self.stages, self.run = make_model, tasks, stages, run
        self.seed = seed
        self.state_dir = Path(out) / "state" / f"seed{seed}"
        self.wrap = wrap or (lambda m: m)
        self.log_line = log_line
        self.rank = rank_and_world()[0]
        self.default_lr = lr

    # -- units --------------------------------------------------------------------------------------
    def _path(self, unit: str) -> Path:
        return self.state_dir / (unit.replace("/", "__") + ".pt")

    def done(self, unit: str) -> bool:
        return self._path(unit).is_file()

    def load(self, unit: str) -> dict[str, Any]:
        return torch.load(self._path(unit), map_location="cpu", weights_only=True)

    def _unit(self, unit: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if self.done(unit):
            return self.load(unit)
        torch.manual_seed(stable_seed(self.seed, unit))
        with peak_rss_sampler() as mem:
            t0 = time.perf_counter()
            state = fn()
            state["seconds"] = time.perf_counter() - t0
        state["peak_rss"] = mem["peak"]
        state["rng"] = torch.get_rng_state()
        if self.rank == 0:
            atomic_save(state, self._path(unit))
        _barrier()
        scores = ", ".join(f"{k} {v['value']:.3f}" for k, v in state.get("evals", {}).items())
        self.log_line(f"[seed {self.seed}] {unit}: {scores} ({state['seconds']:.0f} s)")
        return state

    def _fresh_model(self, unit: str) -> nn.Module:
        torch.manual_seed(stable_seed(self.seed, "model"))  # every unit starts from the same init
        model = self.make_model().to(self.run.device)
        torch.manual_seed(stable_seed(self.seed, unit))
        return model

    def _evaluate(self, model: nn.Module, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        out = {}
        for name in names or list(self.tasks):
            task = self.tasks[name]
            metric = task.evaluate(model)
            out[name] = evaluation_record(metric, self.run.resamples, task.extras(metric) if task.extras else None)
        return out

    def _run(self, stage: Stage) -> RunSettings:
        """The run settings for training ``stage``'s task (its own warmup where it sets one)."""
        return self.run if stage.warmup_steps is None else replace(self.run, warmup_steps=stage.warmup_steps)

    def _lr(self, stage: Stage, method: Method | None) -> float:
        if stage.lr is not None:
            return stage.lr
        return method.settings["lr"] if method is not None else self.default_lr

    def stage_one(self) -> dict[str, Any]:
        """Stage 1 (no regularizer), with SI's path tracking on, shared by every method; its model is
        also the first task's single-task baseline."""
        s = self.stages[0]

        def fn() -> dict[str, Any]:
            model = self._fresh_model("stage1")
            si = SI(model)
            res = train_steps(
                self.wrap(model), [self.tasks[s.task]], s.steps, self._lr(s, None), self._run(s),
                stable_seed(self.seed, "stage1"), si_track=si, desc=f"stage 1 ({s.task})",
            )  # fmt: skip
            return {
                "model": model.state_dict(),
                "si": si.state_dict(),
                "optimizer": res.pop("optimizer"),
                "train": res,
                "evals": self._evaluate(model),
            }

        return self._unit("stage1", fn)

    def single(self, index: int) -> dict[str, Any]:
        """The single-task baseline of stage ``index`` (0-based; stage 0's is the stage-1 run)."""
        if index == 0:
            return self.stage_one()
        s = self.stages[index]
        unit = f"single/{s.task}"

        def fn() -> dict[str, Any]:
            model = self._fresh_model(unit)
            res = train_steps(
                self.wrap(model), [self.tasks[s.task]], s.steps, self._lr(s, None), self._run(s),
                stable_seed(self.seed, unit), desc=f"single-task {s.task}",
            )  # fmt: skip
            return {"train": _drop_opt(res), "evals": self._evaluate(model, [s.task])}

        return self._unit(unit, fn)

    def joint(self) -> dict[str, Any]:
        """All tasks together: each step one batch of every task, for the sequence's total number of
        samples per task (Σ steps / number of tasks steps; the same compute as the sequence)."""
        total = sum(s.steps for s in self.stages)
        steps = max(1, round(total / len(self.stages)))

        def fn() -> dict[str, Any]:
            model = self._fresh_model("joint")
            res = train_steps(
                self.wrap(model), [self.tasks[s.task] for s in self.stages], steps, self._lr(self.stages[0], None),
                self._run(self.stages[0]), stable_seed(self.seed, "joint"), desc="joint",
            )  # fmt: skip
            return {"train": _drop_opt(res), "evals": self._evaluate(model)}

        return self._unit("joint", fn)

    def method(self, method: Method) -> list[dict[str, Any]]:
        """Stages 2… of ``method``, each from the previous one's saved state; returns every stage's
        state (stage 1's shared one first)."""
        states = [self.stage_one()]
        for i in range(1, len(self.stages)):
            unit = f"{self.method_key(method)}/stage{i + 1}"
            if self.done(unit):
                states.append(self.load(unit))
                continue
            prev = states[-1]
            states.append(self._unit(unit, lambda i=i, prev=prev: self._method_stage(method, i, prev)))
        return states

    def method_key(self, method: Method) -> str:
        """The method's name and a digest of the settings it reads (and the per-stage overrides), so
        units of other settings never mix and changing one method's settings reuses everything else."""
        blob = json.dumps([method.relevant_settings(), [s.settings for s in self.stages]], sort_keys=True)
        return f"{method.name}@{hashlib.sha256(blob.encode()).hexdigest()[:8]}"

    def _method_stage(self, method: Method, i: int, prev: dict[str, Any]) -> dict[str, Any]:
        stage, prev_task = self.stages[i], self.tasks[self.stages[i - 1].task]
        model = self._fresh_model(f"{method.name}/stage{i + 1}")  # the same init for every setting
        model.load_state_dict(prev["model"])
        if self.tasks[stage.task].prepare is not None:  # before consolidating: anchors = the stage's start
            self.tasks[stage.task].prepare(model)
        reg = method.regularizer(model, seed=self.seed)
        buffer = method.replay_buffer(seed=self.seed)
        fit_data = prev_task.fit_data if prev_task.fit_data is not None else prev_task.train_data
        if reg is not None:
            if "reg" in prev:
                reg.load_state_dict(prev["reg"])
            elif "si" in method.parts:  # the shared stage-1 run tracked SI's path
                _si_member(reg).load_state_dict(prev["si"])
                _si_member(reg).c = method.settings["si.c"]
            reg.to(self.run.device)
            t0 = time.perf_counter()
            reg.consolidate(model, fit_data, prev_task.spec)
            consolidate_s = time.perf_counter() - t0
        else:
            consolidate_s = 0.0
        if buffer is not None:
            if "buffer" in prev:
                buffer.load_state_dict(prev["buffer"])
            g = torch.Generator().manual_seed(stable_seed(self.seed, "replay-pick", prev_task.name))
            idx = torch.randperm(len(fit_data), generator=g)[: buffer.capacity_per_task].tolist()
            rank, world = rank_and_world()  # each rank offers its share; the buffer gathers them
            buffer.add(prev_task.name, [fit_data[j] for j in idx[rank::world]])
        method.apply(reg, stage.settings)
        res = train_steps(
            self.wrap(model), [self.tasks[stage.task]], stage.steps, self._lr(stage, method), self._run(stage),
            stable_seed(self.seed, method.name, i), reg=reg, replay=buffer,
            replay_tasks=self.tasks, replay_per_step=int(method.settings["replay.per_step"]),
            replay_weight=method.settings["replay.weight"], freeze_bn=self.run.bn == "freeze",
            desc=f"{method.name} stage {i + 1} ({stage.task})",
        )  # fmt: skip
        state: dict[str, Any] = {
            "model": model.state_dict(),
            "optimizer": res.pop("optimizer"),
            "train": {**res, "consolidate_seconds": consolidate_s},
            "evals": self._evaluate(model),
            "regularizer_bytes": _regularizer_bytes(reg, buffer),
        }
        if reg is not None:
            state["reg"] = reg.state_dict()
        if buffer is not None:
            state["buffer"] = buffer.state_dict()
        return state


def _si_member(reg: nn.Module) -> SI:
    return next(m for m in reg.members if isinstance(m, SI))


def _drop_opt(res: dict[str, Any]) -> dict[str, Any]:
    res = dict(res)
    res.pop("optimizer", None)
    return res


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
