"""The tune: on the validation split, on its own training seeds (the profile's ``tune_seeds``, which
no report uses; ``--seeds``/``--first-seed`` choose others), first the baselines' learning rate per
task, then a coordinate search over the profile's grid for every method. Each candidate is trained on
every tune seed and scored as the challenge judges, seed by seed: its worst task's final / that
seed's baseline; the candidate's score is the **worst over the seeds** (the mean over seeds and
tasks breaking ties). The worst rather than the mean: the report's verdict is the lower end of a
hierarchical interval, which widens with the seeds' disagreement, and the worst seed penalises
disagreement alike, where a mean would not.

A single-part method searches each grid key it reads in turn (its learning rate ``lr``, per-stage
values such as ``ewc.lam@2`` and ``ewc.lam@3``, …), starting from the profile's values. A ``+``
combination starts from the values its parts chose and then searches its own keys in the same way,
so it ends with values of its own; a part not among the tune's methods is searched first (kept in
``tune.json``'s ``parts``), so a combination starts from the same values whichever methods a tune
lists beside it. A method may have variants (``Profile.tune_variants``: fixed
settings and a grid of their own, e.g. EWC with each task's Fisher normalised by its mean, whose λ
lives on another scale): each is searched and the best kept. Unless ``--no-joint``, the joint
reference is run under each schedule too, and the one whose worst task keeps most of its baseline
is chosen. Every candidate's units are keyed by its
settings, so a repeated candidate is read back, not trained again, and a killed tune resumes.
Every result is also recorded as it comes in ``OUT/tune-progress.json`` (:class:`TuneProgress`): a
tune whose output folder holds that file, copied there from another machine for instance, takes its
results instead of training them again, so a tune can be spread over several sittings, and tunes of
different ``--methods`` can run at once on one output folder (one process per core, say), a last
tune over every method then reading them all back. A tune with ``recorded_only`` (``--recorded-only``)
trains nothing: it writes ``tune.json`` from the recorded results, each method's search going as far as
they reach; a method whose search wanted a trial not recorded is marked ``"complete": false`` and lists
the trials it did not run (``not_run``), each key it reached at its best recorded value.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ...bench.settings import SettingKey
from ..config import BenchmarkConfig
from ..methods import Method
from ..profiles import JointCandidate, tune_choices
from ..protocol import SeedRun, joint, joint_unit, method_stages, single_task
from ..provenance import provenance
from ..report import lambda_figure, render_tune
from .workspace import Workspace, open_workspace

__all__ = ["BASELINE_LR", "JOINT_LR", "NotRecorded", "TuneProgress", "climb", "tune"]

BASELINE_LR = "baseline.lr"  # the grid key of the baselines' learning rate (searched per task)
JOINT_LR = "joint.lr"  # the grid key of the joint reference's learning rate

Grid = Mapping[str, Sequence[float]]


class NotRecorded(LookupError):
    """A result the tune needs that its progress record lacks, when it may not train (``recorded_only``)."""


class TuneProgress:
    """The tune's results so far, by key (a baseline, a joint candidate, a method's trial), in a JSON
    file written after each new one; a file of another configuration is refused. Tunes of other
    methods may share the file (and the output folder) at once: each write merges the file's results
    under a lock, and a result not yet known is looked for in the file before it is computed. With
    ``train=False`` a result not recorded raises :class:`NotRecorded` instead of being computed."""

    def __init__(self, path: Path, config: dict[str, Any], train: bool = True) -> None:
        self.path, self.config, self.train = path, config, train
        self.results = self._read()

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        saved = json.loads(self.path.read_text())
        if saved.get("config") != self.config:
            old = saved.get("config", {})
            diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
            raise ValueError(
                f"{self.path} records a tune of another configuration (differs in {', '.join(diff)}): "
                "remove it or choose another --out"
            )
        return saved["results"]

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        """The recorded result for ``key`` (here or in the file), else ``compute()``'s, recorded."""
        if key not in self.results:
            self.results.update(self._read())
        if key not in self.results and not self.train:
            raise NotRecorded(key)
        if key not in self.results:
            value = compute()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(self.path.with_name(self.path.name + ".lock")):
                self.results = {**self._read(), **self.results, key: value}
                tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
                tmp.write_text(json.dumps({"config": self.config, "results": self.results}, indent=1))
                os.replace(tmp, self.path)
        return self.results[key]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` while the block runs (where the platform has ``fcntl``)."""
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _settings_key(settings: Mapping[str, float]) -> str:
    return json.dumps(dict(settings), sort_keys=True)


def _best(trials: list[dict[str, Any]]) -> dict[str, Any]:
    return max(trials, key=lambda t: (t["score"], t["mean"]))


Runs = Sequence[SeedRun]  # one per tune seed
Baselines = Mapping[int, Mapping[str, float]]  # seed -> task -> baseline value (val)


def _key(run: SeedRun, name: str) -> str:
    """A result's key in the progress record: the seed's, so tunes on other seeds share the file."""
    return f"seed{run.seed}/{name}"


def _baseline_value(run: SeedRun, i: int, progress: TuneProgress) -> float:
    s = run.stages[i]
    lr = run.lr(s, None)
    return progress.get(_key(run, f"baseline/{s.task}/lr={lr:g}"), lambda: single_task(run, i).evals[s.task].value)


def _with_baseline_lr(run: SeedRun, lr: Mapping[str, float] | float) -> SeedRun:
    pick = (lambda task: lr[task]) if isinstance(lr, Mapping) else (lambda task: lr)
    return replace(run, stages=[replace(s, baseline_lr=pick(s.task)) for s in run.stages])


def _tune_baselines(runs: Runs, lrs: Sequence[float], progress: TuneProgress) -> tuple[list[SeedRun], dict[str, Any]]:
    """Each task's baseline at every learning rate of ``lrs`` on every tune seed (val); per task the
    rate of the best mean over the seeds; the seeds' runs with it."""
    trials: dict[str, list[dict[str, Any]]] = {s.task: [] for s in runs[0].stages}
    for lr in lrs:
        per_seed = [_with_baseline_lr(run, lr) for run in runs]
        for i, s in enumerate(runs[0].stages):
            values = {r.seed: _baseline_value(r, i, progress) for r in per_seed}
            trials[s.task].append({"lr": lr, "value": sum(values.values()) / len(values), "per_seed": values})
    chosen = {task: max(t, key=lambda x: x["value"])["lr"] for task, t in trials.items()}
    return [_with_baseline_lr(run, chosen) for run in runs], {"grid": list(lrs), "trials": trials, "chosen": chosen}


def _scored(values: Mapping[int, Mapping[str, float]], base: Baselines) -> dict[str, Any]:
    """Per seed, final / that seed's baseline per task and its worst task; the score is the worst seed's
    worst task, ``mean`` the mean over seeds and tasks, ``final`` the mean over seeds per task."""
    per_seed = {s: {t: v[t] / max(base[s][t], 1e-9) for t in base[s]} for s, v in values.items()}
    tasks = list(next(iter(per_seed.values())))
    final = {t: sum(r[t] for r in per_seed.values()) / len(per_seed) for t in tasks}
    score = min(min(r.values()) for r in per_seed.values())
    mean = sum(final.values()) / len(final)
    return {"final": final, "score": score, "mean": mean, "per_seed": {str(s): r for s, r in per_seed.items()}}


def _joint_trial(
    runs: Runs, base: Baselines, schedule: str, w: Sequence[float] | None, lr: float | None, progress: TuneProgress
) -> dict[str, Any]:
    values = {}
    for run in runs:
        one = replace(run, joint_schedule=schedule, joint_weights=None if w is None else tuple(w), joint_lr=lr)
        values[run.seed] = progress.get(
            _key(run, f"joint/{joint_unit(schedule, w, lr)}"),
            lambda one=one: {t: r.value for t, r in joint(one).evals.items()},
        )
    trial = {"schedule": schedule, **_scored(values, base)}
    return trial | ({"weights": list(w)} if w is not None else {}) | ({"lr": lr} if lr is not None else {})


def _tune_joint(
    runs: Runs, base: Baselines, candidates: Sequence[JointCandidate], lrs: Sequence[float], progress: TuneProgress
) -> dict[str, Any]:
    """The joint reference under each (schedule, loss weights) candidate (val), on every tune seed,
    scored like a method; then the best candidate at each learning rate of ``lrs`` (the grid's
    ``joint.lr``, if any); the best is chosen."""
    trials = [_joint_trial(runs, base, schedule, w, None, progress) for schedule, w in candidates]
    best = _best(trials)
    for lr in lrs:
        trials.append(_joint_trial(runs, base, best["schedule"], best.get("weights"), float(lr), progress))
    best = _best(trials)
    keep = {k: best[k] for k in ("weights", "lr") if k in best}
    return {"trials": trials, "chosen": best["schedule"], **keep}


def _trial(runs: Runs, method: Method, settings: Mapping[str, float], base: Baselines, progress: TuneProgress) -> dict:
    """One candidate on every tune seed: its final / baseline per task and seed, its score (the worst
    seed's worst task) and the mean (tie-break), with the value of every per-stage setting in each
    stage after the first (what the stages ran with)."""
    one = method.with_settings(settings)
    values = {}
    for run in runs:
        try:
            values[run.seed] = progress.get(
                _key(run, f"{method.name}/{_settings_key(settings)}"),
                lambda run=run: {t: r.value for t, r in method_stages(run, one)[-1].evals.items()},
            )
        except NotRecorded:  # a tune that may not train: below every recorded trial, never chosen
            return {"settings": dict(settings), "recorded": False, "score": -math.inf, "mean": -math.inf}
    stages = runs[0].stages
    effective = {str(i + 1): one.stage_values(i + 1, stages[i].settings) for i in range(1, len(stages))}
    return {"settings": dict(settings), **_scored(values, base), "stage_values": effective}


def _reads(method: Method, key: str) -> bool:
    """Whether ``method`` reads grid key ``key`` (``lr``, or a setting of one of its parts, per stage or not)."""
    return SettingKey.parse(key).part in ("", *method.parts)


def _coordinate_search(
    runs: Runs,
    method: Method,
    start: dict[str, float],
    grid: Grid,
    base: Baselines,
    progress: TuneProgress,
    search: str = "grid",
) -> tuple[dict[str, float], list[dict[str, Any]], list[dict[str, float]]]:
    """Each key of ``grid`` the method reads, in turn, the others held at the best so far: over all its
    values (``search="grid"``) or by :func:`climb` from its current value (``"climb"``); returns the
    chosen settings, every trial and the settings of the trials it wanted but found not recorded (a
    tune that may not train; a key with none recorded keeps its value)."""
    chosen, trials, not_run = dict(start), [], []
    for key in [k for k in grid if _reads(method, k)]:

        def trial(v: float, key: str = key) -> dict[str, Any]:
            return {**_trial(runs, method, {**chosen, key: float(v)}, base, progress), "key": key}

        everything = search != "climb"
        tried = [trial(v) for v in grid[key]] if everything else climb(grid[key], _current(chosen, key), trial)
        ran = [t for t in tried if t.get("recorded", True)]
        not_run += [t["settings"] for t in tried if not t.get("recorded", True)]
        if ran:
            chosen[key] = _best(ran)["settings"][key]
        trials += ran
    return chosen, trials, not_run


def _current(settings: Mapping[str, float], key: str) -> float | None:
    """A key's value before its search: its own, else (for ``name@k``) the setting's for every stage."""
    return settings.get(key, settings.get(str(SettingKey.parse(key).base)))


def climb(values: Sequence[float], start: float | None, trial: Callable[[float], dict[str, Any]]) -> list[dict]:
    """A hill climb along one key's grid: the value nearest ``start`` (on a log scale; the middle when
    there is none) and its two neighbours, then on towards the better neighbour while the score rises;
    each value is tried once. Returns the trials in the grid's order.

    Example:
        >>> peak = lambda v: {"settings": {"x": v}, "score": -abs(v - 8.0), "mean": 0.0}
        >>> [t["settings"]["x"] for t in climb([1, 2, 4, 8, 16, 32], 2.0, peak)]
        [1.0, 2.0, 4.0, 8.0, 16.0]
    """
    vals = sorted(float(v) for v in values)
    i = len(vals) // 2 if start is None else min(range(len(vals)), key=lambda j: _distance(vals[j], start))
    tried: dict[int, dict[str, Any]] = {}

    def at(j: int) -> tuple[float, float]:
        if j not in tried:
            tried[j] = trial(vals[j])
        return tried[j]["score"], tried[j]["mean"]

    for j in (i - 1, i, i + 1):
        if 0 <= j < len(vals):
            at(j)
    best = max(tried, key=at)
    step = (best > i) - (best < i)
    while step and 0 <= best + step < len(vals) and at(best + step) > at(best):
        best += step
    return [tried[j] for j in sorted(tried)]


def _distance(a: float, b: float) -> float:
    return abs(math.log(a) - math.log(b)) if a > 0 and b > 0 else abs(a - b)


def _start(method: Method, done: dict[str, Any], fixed: Mapping[str, float]) -> dict[str, float]:
    """A combination starts from its parts' choices (their learning rates aside); a part from its settings."""
    start = dict(method.relevant_settings())
    if len(method.parts) > 1:
        for part in method.parts:
            picked = done.get(part, {}).get("chosen", {})
            start.update({k: v for k, v in picked.items() if SettingKey.parse(k).part})
    return {**start, **fixed}


def _variants(method: Method, ws: Workspace, done: dict) -> list[dict[str, Any]]:
    """The method's variants; a combination has one, made of its parts' winning variants (their
    fixed settings, and their grids for their own keys over the profile's)."""
    profile = ws.config.profile
    plain = {"fixed": {}, "grid": profile.tune_grid}
    if len(method.parts) == 1:
        return profile.tune_variants.get(method.name, [plain])
    fixed, grid = {}, dict(profile.tune_grid)
    for part in method.parts:
        won = done.get(part, {}).get("variant", plain)
        fixed.update(won["fixed"])
        grid.update({k: v for k, v in won["grid"].items() if SettingKey.parse(k).part == part})
    return [{"fixed": fixed, "grid": grid}]


def _score(result: dict[str, Any]) -> tuple[float, float]:
    """A variant's best trial's (score, mean); below every trial for a variant with none recorded."""
    if not result["trials"]:
        return -math.inf, -math.inf
    best = _best(result["trials"])
    return best["score"], best["mean"]


def _search(runs: Runs, method: Method, ws: Workspace, base: Baselines, done: dict, progress: TuneProgress) -> dict:
    """Every variant of the method (one by default), each by coordinate search; the best one kept."""
    variants = _variants(method, ws, done)
    results = []
    for v in variants:
        grid = {k: g for k, g in v["grid"].items() if k not in (BASELINE_LR, JOINT_LR)}
        start = _start(method, done, v["fixed"])
        search = ws.config.profile.tune_search
        chosen, trials, not_run = _coordinate_search(runs, method, start, grid, base, progress, search)
        result = {"fixed": dict(v["fixed"]), "grid": dict(grid), "chosen": chosen, "trials": trials}
        results.append(result | ({"not_run": not_run} if not_run else {}))
    best = max(results, key=_score)
    trials = [t for r in results for t in r["trials"]]
    variant = {"fixed": best["fixed"], "grid": best["grid"]}
    out = {"chosen": best["chosen"], "variant": variant, "trials": trials, "variants": results}
    not_run = [s for r in results for s in r.get("not_run", [])]
    return out | ({"complete": False, "not_run": not_run} if not_run else {})


def tune(config: BenchmarkConfig) -> dict[str, Any]:
    """``tune.json`` (the seeds, the grids, the baselines' learning rates, every trial and each method's
    choice), ``tune.md`` (its tables), ``tune-choices.json`` (the choices alone) and the EWC
    λ-sensitivity figure, from the tune seeds on the validation split."""
    ws = open_workspace(config)
    config = ws.config
    progress = TuneProgress(config.out / "tune-progress.json", config.comparable(), train=not config.recorded_only)
    try:
        report = _tune_report(config, ws, progress)
    except NotRecorded as err:
        raise ValueError(
            f"--recorded-only: {progress.path} has no result for {err.args[0]}; run the tune without it first"
        ) from None
    report["provenance"] = provenance()
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "tune.json").write_text(json.dumps(report, indent=1))
    (config.out / "tune-choices.json").write_text(json.dumps(tune_choices(report), indent=1))
    (config.out / "tune.md").write_text(render_tune(report))
    lambda_figure(report, config.out)
    ws.log(f"tuning results: {config.out / 'tune.json'}")
    return report


def _tune_report(config: BenchmarkConfig, ws: Workspace, progress: TuneProgress) -> dict[str, Any]:
    """The baselines' learning rates, the joint reference's choice and each method's search."""
    grid = config.profile.tune_grid
    runs = [ws.seed_run(seed) for seed in config.seeds]
    ws.log(f"tune on training seeds {list(config.seeds)} (validation split)")
    if BASELINE_LR in grid:
        runs, baselines = _tune_baselines(runs, grid[BASELINE_LR], progress)
        ws.log(f"tune baselines: learning rate per task {baselines['chosen']}")
    else:
        baselines = {}
    base = {run.seed: {st.task: _baseline_value(run, i, progress) for i, st in enumerate(run.stages)} for run in runs}
    mean_base = {t: sum(b[t] for b in base.values()) / len(base) for t in base[runs[0].seed]}
    report: dict[str, Any] = {
        "seeds": list(config.seeds),
        "grid": grid,
        "baselines": mean_base,
        "baselines_per_seed": {str(s): dict(b) for s, b in base.items()},
        "baseline_lr": baselines,
        "methods": {},
        "split": "val",
        "score": "the worst over the tune seeds of the worst task's final / baseline (ties: the mean)",
    }
    if config.joint:
        report["joint"] = _tune_joint(runs, base, config.profile.tune_joint, grid.get(JOINT_LR, ()), progress)
        ws.log(f"tune joint: {report['joint']['chosen']} schedule")
    searched: dict[str, Any] = {}  # every search, by name: the methods' and the parts a combination starts from
    for name in config.methods:
        method = Method.parse(name, config.settings_for(name))
        for part in [p for p in method.parts if len(method.parts) > 1 and p not in searched]:
            searched[part] = report.setdefault("parts", {})[part] = _logged_search(
                ws, runs, part, base, searched, progress
            )
        searched[name] = report["methods"][name] = _logged_search(ws, runs, name, base, searched, progress)
    return report


def _logged_search(ws: Workspace, runs: Runs, name: str, base: Baselines, done: dict, progress: TuneProgress) -> dict:
    """:func:`_search` of method ``name`` (its settings the configuration's), logged with its choice."""
    method = Method.parse(name, ws.config.settings_for(name))
    found = _search(runs, method, ws, base, done, progress)
    cut = f" (search incomplete: {len(found['not_run'])} trials not recorded)" if "not_run" in found else ""
    ws.log(f"tune {name}: {found['chosen']}{cut}")
    return found
