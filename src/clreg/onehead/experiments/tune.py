"""The tune: a coordinate search over the profile's grid on the validation split, one setting at a
time per method, each candidate scored as the challenge judges (the worst task's final / baseline)."""

from __future__ import annotations

import json
from typing import Any

from ..config import BenchmarkConfig
from ..methods import Method
from ..protocol import SeedRun, method_stages, single_task
from ..provenance import provenance
from ..report import lambda_figure
from .workspace import open_workspace

__all__ = ["tune"]


def _trial(run: SeedRun, method: Method, settings: dict[str, float], base: dict[str, float]) -> dict[str, Any]:
    """One candidate: its final / baseline per task, its score (the worst) and the mean (tie-break)."""
    states = method_stages(run, method.with_settings(settings))
    finals = {t: states[-1].evals[t].value / max(b, 1e-9) for t, b in base.items()}
    score, mean = min(finals.values()), sum(finals.values()) / len(finals)
    return {"settings": dict(settings), "score": score, "mean": mean, "final": finals}


def _search(run: SeedRun, method: Method, grid: dict[str, Any], base: dict[str, float], done: dict) -> dict:
    """A ``+`` combination runs once with the values its parts chose; a single part searches each
    setting of the grid it reads in turn (the learning rate only for naive fine-tuning)."""
    chosen = dict(method.relevant_settings())
    if len(method.parts) > 1:
        for part in method.parts:
            picked = done.get(part, {}).get("chosen", {})
            chosen.update({k: v for k, v in picked.items() if k != "lr"})
        return {"chosen": chosen, "trials": [_trial(run, method, chosen, base)]}
    trials = []
    for key in [k for k in grid if k in chosen and (k != "lr" or method.name == "naive")]:
        tried = [_trial(run, method, {**chosen, key: value}, base) for value in grid[key]]
        chosen[key] = max(tried, key=lambda t: (t["score"], t["mean"]))["settings"][key]
        trials += tried
    return {"chosen": chosen, "trials": trials}


def tune(config: BenchmarkConfig) -> dict[str, Any]:
    """``tune.json`` (the grid, the baselines, every trial and each method's choice) and the EWC
    λ-sensitivity figure, from seed 0 on the validation split."""
    ws = open_workspace(config)
    config = ws.config
    run = ws.seed_run(0)
    base = {st.task: single_task(run, i).evals[st.task].value for i, st in enumerate(run.stages)}
    grid = config.profile.tune_grid
    report: dict[str, Any] = {"grid": grid, "baselines": base, "methods": {}, "split": "val"}
    for name in config.methods:
        report["methods"][name] = _search(run, Method.parse(name, config.settings), grid, base, report["methods"])
        ws.log(f"tune {name}: {report['methods'][name]['chosen']}")
    report["provenance"] = provenance()
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "tune.json").write_text(json.dumps(report, indent=1))
    lambda_figure(report, config.out)
    ws.log(f"tuning results: {config.out / 'tune.json'}")
    return report
