"""The full experiment: every seed's baselines, joint reference and methods, then the report."""

from __future__ import annotations

from typing import Any

from ...distributed import rank_and_world
from ..config import BenchmarkConfig, seeds_shared_with_tune
from ..methods import Method
from ..model import cpu_latency, save_checkpoint
from ..protocol import SeedResult, SeedRun, joint_plan, run_seed
from ..provenance import provenance
from ..report import summarise, write_report
from .parallel import run_in_workers, worker_threads
from .work import describe, planned_work
from .workspace import Workspace, open_workspace

__all__ = ["run_benchmark"]


def _resources(ws: Workspace) -> dict[str, Any]:
    """The model's size, its layers against the challenge's rules and (when the profile asks) its latency."""
    model = ws.make_model()
    arch = model.architecture_report()
    res = {
        "parameters": arch["parameters"],
        "trainable": arch["trainable_parameters"],
        "neck_layers": arch["neck_layers"],
        "head_layers": arch["head_layers"],
    }
    if ws.config.profile.latency:
        lat = cpu_latency(model, size=512, repeats=10)
        res["latency_ms"] = {"model": lat["model_ms"], "head": lat["head_ms"]}
    return res


def _joint_budget(run: SeedRun) -> dict[str, Any]:
    """The joint reference's schedule, optimizer steps, batches of each task, loss weights and rate."""
    steps, per_task = joint_plan(run.stages, run.joint_schedule)
    tasks = [s.task for s in run.stages]
    return {
        "schedule": run.joint_schedule,
        "steps": steps,
        "batches": dict(zip(tasks, per_task or [steps] * len(tasks), strict=True)),
        "baseline_steps": {s.task: s.steps for s in run.stages},
        "weights": None if run.joint_weights is None else dict(zip(tasks, run.joint_weights, strict=True)),
        "lr": run.joint_learning_rate(),
    }


def _save_models(ws: Workspace, seed0: SeedResult) -> None:
    """Each method's final model (seed 0) in the one-head checkpoint format, for ``evaluate``."""
    names = {k: t.class_names for k, t in ws.tasks.items()}
    cmap = {n: i for t in ws.tasks.values() for n, i in t.category_map().items()}
    for name, states in seed0.methods.items():
        path = ws.config.out / "models" / f"{name}.pt"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        model = ws.make_model()
        model.load_state_dict(states[-1].model)
        save_checkpoint(model, path, class_names=names, category_map=cmap, input_size=ws.config.profile.size,
                        extra={"stages": list(ws.config.tasks)})  # fmt: skip


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any] | None:
    """Run (or resume) the benchmark ``config`` describes; returns the JSON-ready results (rank 0)."""
    ws = open_workspace(config)
    config = ws.config
    methods = [Method.parse(name, config.settings_for(name)) for name in config.methods]
    work = planned_work(ws)
    ws.log(f"work: {describe(work)}")
    shared = seeds_shared_with_tune(config)
    if shared:
        ws.log(
            f"warning: training seeds {shared} are among those the tune that chose these settings trained on "
            f"({list(config.profile.tuned_on or [])}): the verdicts on them rest on trajectories the settings "
            "were fitted to; run other seeds (--first-seed) for a report"
        )
    if config.workers > 1 and rank_and_world()[1] == 1:
        ws.log(f"training in {config.workers} processes of {worker_threads(config.workers)} threads each")
        run_in_workers(config, config.workers, config.seeds, [m.name for m in methods])
    seeds = [run_seed(ws.seed_run(seed), methods, config.joint) for seed in config.seeds]
    if rank_and_world()[0] != 0:
        return None
    tasks = list(config.tasks)
    chance = {k: t.chance for k, t in ws.tasks.items()}
    summary = summarise(seeds, tasks, chance, {k: ws.tasks[k].metric_name for k in tasks})
    if config.seeds[0] == 0:  # the saved models are seed 0's (a run of later seeds alone saves none)
        _save_models(ws, seeds[0])
    results = {
        "config": config.record(),
        "seeds": list(config.seeds),
        "seeds_shared_with_tune": shared,
        "within_rules": config.within_rules,
        "classes": {k: {"names": t.class_names, "source": t.class_source} for k, t in ws.tasks.items()},
        "summary": summary,
        "resources": _resources(ws),
        "work": work,
        **({"joint_budget": _joint_budget(ws.seed_run(config.seeds[0]))} if config.joint else {}),
        "provenance": provenance(),
    }
    results = write_report(results, config.out, {k: t.extra_scores for k, t in ws.tasks.items()})
    ws.log(f"report: {config.out / 'report.md'}")
    return results
