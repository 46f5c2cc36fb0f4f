"""The tune: each method's settings chosen on the validation split, on training seeds a report never
uses.

A candidate's score is the mean over the tune seeds of ACC, the average over tasks of the final
metric, on the validation split (the report's own measure; with seeds the mean rewards a setting that
is good on average rather than on one trajectory). The search per method:

* a method of one part: every combination of its grid keys (``grid`` keys of its part, e.g.
  ``ewc.lam``; ``lr`` when the grid has it);
* a combination: it starts from each part's own choice (tuned first when the parts are in the list)
  and sweeps each of its keys once, in the grid's order, keeping a value when it scores higher;
* ``joint``: its ``lr`` over the grid's ``lr`` values (the scenario's default without them).

A choice at the edge of its key's grid is flagged (``edges``): widen the grid there, or say why the
edge is a limit.

Example:
    >>> from clreg.bench import make_scenario
    >>> from clreg.bench.tune import tune
    >>> scenario = make_scenario("digits", setting="class", epochs=1)
    >>> out = tune(scenario, ["ewc"], {"ewc.lam": (1.0, 10.0)}, seeds=[100], progress=None)
    >>> sorted(out["ewc"])
    ['edges', 'score', 'settings', 'trials']
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from .experiment import Progress, run_all
from .method import check_method_name
from .runner import REFERENCES
from .scenario import Scenario
from .settings import SettingKey
from .store import RunStore
from .summary import sequence_measures

__all__ = ["TUNE_SEEDS", "tune"]

TUNE_SEEDS = (100, 101)
"""The training seeds a tune uses by default; reports use 0, 1, 2, …"""


def _keys(method: str, grid: Mapping[str, Sequence[float]]) -> list[str]:
    parts = set(check_method_name(method)) if method not in REFERENCES else set()
    out = []
    for name in grid:
        key = SettingKey.parse(name)
        if (key.part in parts) or (not key.part and key.name == "lr"):
            out.append(name)
    return out


class _Scorer:
    """Scores candidate settings (mean over seeds of ACC on the validation split), each once."""

    def __init__(
        self, scenario: Scenario, seeds: Sequence[int], store: RunStore | None, workers: int, progress: Progress
    ):
        self.scenario, self.seeds, self.store, self.workers, self.progress = scenario, seeds, store, workers, progress
        self.trials: dict[str, list[dict[str, Any]]] = {}

    def __call__(self, method: str, settings: Mapping[str, float]) -> float:
        done = [t for t in self.trials.get(method, []) if t["settings"] == dict(settings)]
        if done:
            return done[0]["score"]
        store = RunStore(self.store.folder / "tune" / _slug(settings)) if self.store is not None else None
        runs = run_all(self.scenario, [method], self.seeds, "val", {method: settings}, store=store,
                       workers=self.workers, progress=None)[method]  # fmt: skip
        per_seed = {r.seed: sequence_measures(r.matrix)["acc"] for r in runs}
        score = sum(per_seed.values()) / len(per_seed)
        self.trials.setdefault(method, []).append({"settings": dict(settings), "score": score, "per_seed": per_seed})
        if self.progress is not None:
            self.progress(f"tune {method} {dict(settings)}: {score:.3f}")
        return score


def _slug(settings: Mapping[str, float]) -> str:
    text = ",".join(f"{k}={v:g}" for k, v in sorted(settings.items())) or "defaults"
    return text.replace("/", "_").replace(":", "_")


def _edges(settings: Mapping[str, float], grid: Mapping[str, Sequence[float]], keys: Sequence[str]) -> list[str]:
    return [k for k in keys if len(grid[k]) > 1 and settings[k] in (min(grid[k]), max(grid[k]))]


def tune(
    scenario: Scenario,
    methods: Sequence[str],
    grid: Mapping[str, Sequence[float]],
    seeds: Sequence[int] = TUNE_SEEDS,
    base: Mapping[str, Mapping[str, float]] | None = None,
    store: RunStore | None = None,
    workers: int = 1,
    progress: Progress = print,
) -> dict[str, dict[str, Any]]:
    """Each method's chosen settings, score, trials and edge flags (see the module). ``base``: per method,
    settings held fixed (not searched)."""
    score = _Scorer(scenario, seeds, store, workers, progress)
    chosen: dict[str, dict[str, float]] = {}
    out = {}
    singles = [m for m in methods if m in REFERENCES or len(check_method_name(m)) == 1]
    for method in singles + [m for m in methods if m not in singles]:
        fixed = dict((base or {}).get(method, {}))
        keys = [k for k in _keys(method, grid) if k not in fixed]
        if method in REFERENCES or len(check_method_name(method)) == 1:
            candidates = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
            best = max(candidates or [{}], key=lambda c: score(method, {**fixed, **c}))
        else:
            best = {}
            for part in check_method_name(method):
                best.update({k: v for k, v in chosen.get(part, {}).items() if k in keys})
            best.update({k: grid[k][0] for k in keys if k not in best})
            for k in keys:
                best[k] = max(grid[k], key=lambda v: score(method, {**fixed, **best, k: v}))
        chosen[method] = best
        settings = {**fixed, **best}
        out[method] = {
            "settings": settings,
            "score": score(method, settings),
            "trials": score.trials.get(method, []),
            "edges": _edges(best, grid, keys),
        }
    return out
