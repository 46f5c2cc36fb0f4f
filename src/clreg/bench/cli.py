"""``clreg-bench``: any registered scenario's report (and its tune) from the command line.

Examples (shell)::

    clreg-bench --scenario digits --setting class --out runs/digits-class
    clreg-bench --scenario digits --setting task --methods naive,ewc,lwf --seeds 0-2 --stages 89,67,45,23,01
    clreg-bench --scenario digits --setting domain --tune --out runs/digits-domain-tune
    clreg-bench --scenario onehead --option profile=tiny --methods der,agem --seeds 0

Without ``--tune`` each method runs with the scenario's shipped choices (tuned on seeds the report does
not use); ``--set NAME=VALUE`` overrides a setting for every method that reads it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import evaluate_model
from .experiment import run_all
from .method import check_method_name
from .registry import make_scenario, scenario_names
from .report import write_report
from .runner import REFERENCES
from .settings import parse_assignment
from .store import RunStore
from .summary import summarise
from .tune import TUNE_SEEDS, tune

__all__ = ["main", "parse_seeds"]


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` → [0, 1, 2, 3, 4]; ``"0,2,7"`` → [0, 2, 7]."""
    seeds: list[int] = []
    try:
        for chunk in text.split(","):
            lo, dash, hi = chunk.strip().partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    except ValueError:
        raise ValueError(f"seeds are a list such as '0-4' or '0,2,7', got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {text!r}")
    return seeds


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clreg-bench",
        description=f"Run a continual-learning scenario's report. Scenarios: {', '.join(scenario_names())}.",
    )
    p.add_argument("--scenario", choices=scenario_names(), help="which scenario (required unless --evaluate)")
    p.add_argument("--setting", help="the scenario's setting (digits: task, domain or class; onehead has none)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another scenario option (JSON value), e.g. onehead's profile=tiny or data_root=DIR",
    )
    p.add_argument("--methods", default="all", help="methods joined by ',' ('all': the scenario's list)")
    p.add_argument("--seeds", default="0-4", help="report seeds (default 0-4)")
    p.add_argument("--stages", help="the task order, e.g. 89,67,45,23,01 (default: the scenario's)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a method setting for every method")
    p.add_argument("--tune", action="store_true", help="tune each method on --tune-seeds (validation split) first")
    p.add_argument("--tune-seeds", default=",".join(map(str, TUNE_SEEDS)), help="the tune's training seeds")
    p.add_argument("--workers", type=int, default=2, help="worker processes (one thread each)")
    p.add_argument("--out", default="runs/bench", help="the report's folder (runs are resumed from it)")
    p.add_argument("--save-models", action="store_true", help="keep each trained model in OUT/models")
    p.add_argument("--evaluate", metavar="MODEL", help="score a saved model's tasks (on --split) and stop")
    p.add_argument("--split", default="test", choices=("val", "test"), help="the split --evaluate scores")
    return p


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.setting is not None:
        options["setting"] = args.setting
    for text in args.option:
        key, eq, value = text.partition("=")
        if not eq:
            raise ValueError(f"--option is KEY=VALUE, got {text!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _methods(text: str, scenario: Any) -> list[str]:
    names = scenario.methods if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    return [m if m in REFERENCES else "+".join(check_method_name(m)) for m in names]


def _check_seeds(seeds: Sequence[int], tune_seeds: Sequence[int]) -> None:
    overlap = sorted(set(seeds) & set(tune_seeds))
    if overlap:
        warnings.warn(
            f"report seeds {overlap} were also tune seeds: the report is not independent of the tune", stacklevel=2
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.evaluate is None and args.scenario is None:
        parser.error("--scenario is required (or --evaluate MODEL)")
    try:
        return _evaluate(args) if args.evaluate is not None else _main(args)
    except ValueError as e:
        print(f"clreg-bench: error: {e}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace) -> int:
    scores = evaluate_model(args.evaluate, args.split)
    for task, value in scores.items():
        print(f"{task}: {value:.4f}")
    print(f"average: {sum(scores.values()) / len(scores):.4f}")
    return 0


def _main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    scenario = make_scenario(args.scenario, **_options(args))
    stages = scenario.stages(args.stages.split(",") if args.stages else None)
    methods, seeds = _methods(args.methods, scenario), parse_seeds(args.seeds)
    overrides = dict(parse_assignment(t) for t in args.set)
    out = Path(args.out)
    store = RunStore(out)
    if args.tune:
        tune_seeds = parse_seeds(args.tune_seeds)
        base = {m: dict(scenario.defaults) for m in methods}
        tuned = tune(scenario, methods, scenario.tune_grid, tune_seeds, base, store=store, workers=args.workers)
        (out / "tune.json").write_text(json.dumps({"seeds": tune_seeds, "methods": tuned}, indent=1) + "\n")
        choices = {m: t["settings"] for m, t in tuned.items()}
    else:
        shipped = scenario.tuned()
        tune_seeds, choices = shipped.get("seeds", []), shipped.get("methods", {})
    _check_seeds(seeds, tune_seeds)
    given = {str(k): v for k, v in overrides.items()}
    settings = {m: {**scenario.defaults, **choices.get(m, {}), **given} for m in methods}
    results = run_all(
        scenario,
        methods,
        seeds,
        "test",
        settings,
        stages,
        store=store,
        workers=args.workers,
        save_models=args.save_models,
    )
    summary = summarise(results)
    meta = {
        "title": f"{args.scenario} {json.dumps(scenario.options, sort_keys=True)}",
        "stages": " → ".join(f"{s.task} ({s.steps} steps, lr {s.lr:g})" for s in stages),
        "report seeds": seeds,
        "tune seeds": tune_seeds,
        "wall time (s)": round(time.perf_counter() - start, 1),
    }
    path = write_report(out, summary, meta)
    print(path.read_text())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
