"""Only the single-task baselines: each task alone on its stage's budget, for every seed."""

from __future__ import annotations

import json
from typing import Any

from ...distributed import rank_and_world
from ..config import BenchmarkConfig
from ..protocol import single_task
from ..report import mean_std
from .workspace import open_workspace

__all__ = ["baselines_only"]


def baselines_only(config: BenchmarkConfig) -> dict[str, Any]:
    """``baselines.json``: each seed's score, interval and training time per task, and the mean and
    standard deviation over seeds (the same units as a full run's, so they are shared with it)."""
    ws = open_workspace(config)
    config = ws.config
    res: dict[str, Any] = {"steps": list(config.steps), "split": config.eval_split, "seeds": {}}
    for seed in config.seeds:
        run = ws.seed_run(seed)
        res["seeds"][seed] = {}
        for i, st in enumerate(run.stages):
            state = single_task(run, i)
            rec = state.evals[st.task]
            res["seeds"][seed][st.task] = {
                "value": rec.value,
                "interval": [rec.lo, rec.hi],
                "train_seconds": state.train["seconds"],
                **({k: rec.extras[k] for k in ws.tasks[st.task].extra_scores if k in rec.extras}),
            }
    res["mean"] = {t: mean_std([res["seeds"][seed][t]["value"] for seed in config.seeds]) for t in config.tasks}
    for task, m in res["mean"].items():
        ws.log(f"baseline {task}: {m['mean']:.3f} ± {m['std']:.3f} over {len(config.seeds)} seed(s)")
    if rank_and_world()[0] == 0:
        (config.out / "baselines.json").write_text(json.dumps(res, indent=1))
        ws.log(f"baselines: {config.out / 'baselines.json'}")
    return res
