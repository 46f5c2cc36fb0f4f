"""Many runs of one scenario: every (method, seed) pair on a split, resumed from a :class:`RunStore`,
spread over worker processes (one thread each), with a line of progress per run.

Example:
    >>> from clreg.bench import make_scenario
    >>> from clreg.bench.experiment import run_all
    >>> scenario = make_scenario("digits", setting="class", epochs=1)
    >>> results = run_all(scenario, ["naive", "replay"], seeds=[0, 1], split="val", progress=None)
    >>> sorted(results), [r.seed for r in results["replay"]]
    (['naive', 'replay'], [0, 1])
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .runner import RunResult, effective_settings, run
from .scenario import Scenario, Stage, make_scenario
from .store import RunStore

__all__ = ["Job", "run_all"]

Progress = Callable[[str], None] | None


@dataclass(frozen=True)
class Job:
    """One run: ``method`` on ``seed``, scored on ``split``, with ``settings``."""

    method: str
    seed: int
    split: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    save: str | None = None  # where the final model goes (None: not saved)


def _stage_record(stage: Stage) -> list[Any]:
    return [stage.task, stage.steps, stage.lr, stage.warmup, dict(stage.settings)]


def _run_job(args: tuple[str, dict, dict, list[Stage], Job]) -> RunResult:
    name, options, record, stages, job = args
    torch.set_num_threads(1)
    scenario = make_scenario(name, **options)
    if scenario.record(scenario.task_list(stages)) != record:
        raise ValueError(
            f"scenario {name!r} rebuilt from its options {options} records {scenario.record(scenario.task_list(stages))}, "
            f"not {record}: set its `options` to the keyword arguments it was built with"
        )
    return run(scenario, job.method, stages, job.seed, job.split, job.settings, save=job.save)


def _execute(scenario: Scenario, stages: list[Stage], jobs: list[Job], workers: int) -> Any:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield run(scenario, job.method, stages, job.seed, job.split, job.settings, save=job.save)
        return
    record = scenario.record(scenario.task_list(stages))
    args = [(scenario.name, dict(scenario.options), record, stages, job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_run_job, args)


def run_all(
    scenario: Scenario,
    methods: Sequence[str],
    seeds: Sequence[int],
    split: str = "test",
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    stages: Sequence[Stage] | None = None,
    store: RunStore | None = None,
    workers: int = 1,
    progress: Progress = print,
    save_models: bool = False,
) -> dict[str, list[RunResult]]:
    """Every method on every seed (``settings``: per method, its settings), the runs a ``store`` holds
    with the same settings read back instead of trained; ``workers`` processes. ``save_models``: each
    trained model goes to ``<store>/models/<method>-seed<seed>.pt`` (:mod:`clreg.bench.checkpoint`)."""
    if save_models and store is None:
        raise ValueError("save_models needs a store: its folder holds the models")
    stages = list(stages if stages is not None else scenario.stages())
    record = {**scenario.record(scenario.task_list(stages)), "stages": [_stage_record(s) for s in stages]}
    results: dict[tuple[str, int], RunResult] = {}
    todo = []
    for method in methods:
        own = dict((settings or {}).get(method, {}))
        effective = effective_settings(method, stages, own)
        for seed in seeds:
            found = store.load(method, seed, split, effective, record) if store is not None else None
            if found is not None:
                results[method, seed] = found
            else:
                path = str(store.folder / "models" / f"{method}-seed{seed}.pt") if save_models else None  # type: ignore[union-attr]
                todo.append(Job(method, seed, split, own, path))
    if progress is not None and results:
        progress(f"{scenario.name}: {len(results)} run(s) read back from {store.folder}")  # type: ignore[union-attr]
    for i, result in enumerate(_execute(scenario, stages, todo, workers), start=1):
        if store is not None:
            store.save(result, record)
        results[result.method, result.seed] = result
        if progress is not None:
            acc = sum(result.matrix[-1]) / len(result.matrix[-1])
            progress(
                f"[{i}/{len(todo)}] {result.method} seed {result.seed} ({split}): average {acc:.3f} ({result.seconds:.1f} s)"
            )
    return {m: [results[m, s] for s in seeds] for m in methods}
