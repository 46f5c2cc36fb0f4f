"""EWC's configurations side by side on the tune's seeds and the validation split.

    python benchmarks/onehead_ewc_study.py --out runs/ewc-study [--first-seed 100 --seeds 2] \\
        --variant "tuned:ewc.lam@2=1e4,ewc.lam@3=1e5" --variant "equal:ewc.lam@2=1e5,ewc.lam@3=1e5"

Takes the benchmark's flags (read as a ``--tune`` reads: its seeds, the validation split; the single
task baselines at the profile's learning rates) and, per ``--variant NAME:KEY=VALUE,…`` (EWC's settings
over the profile's), trains EWC's stages on each seed (a unit already in the output folder is read
back) and prints, per variant, each task's score after stage 2 and at the end, and the final /
baseline per seed with the worst over tasks and seeds. Writes ``ewc_study.json`` into the output
folder. The test split is never read.
"""

from __future__ import annotations

import json
import statistics
import sys

from clreg.onehead.cli import build_parser, validation_config
from clreg.onehead.experiments.workspace import open_workspace
from clreg.onehead.methods import Method
from clreg.onehead.protocol import method_stages, single_task


def _variant(text: str) -> tuple[str, dict[str, float]]:
    name, _, body = text.partition(":")
    settings = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        settings[key.strip()] = float(value)
    return name, settings


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=VALUE,...")
    args = parser.parse_args(argv)
    variants = [_variant(v) for v in args.variant]
    ws = open_workspace(validation_config(args))
    base = {}
    for seed in ws.config.seeds:
        run = ws.seed_run(seed)
        base[seed] = {s.task: single_task(run, i).evals[s.task].value for i, s in enumerate(run.stages)}
    out = {"baselines": {str(k): v for k, v in base.items()}, "variants": {}}
    print(
        "| variant | "
        + " | ".join(f"{t} after 2 / final" for t in ("seg", "det", "cls"))
        + " | final / baseline (per seed) | worst |"
    )
    print("|---|---|---|---|---|---|")
    for name, settings in variants:
        method = Method.parse("ewc", {**ws.config.settings_for("ewc"), **settings})
        rows = {}
        for seed in ws.config.seeds:
            states = method_stages(ws.seed_run(seed), method)
            rows[str(seed)] = {
                "after_stage2": {t: r.value for t, r in states[1].evals.items()},
                "final": {t: r.value for t, r in states[-1].evals.items()},
            }
        ratios = {s: {t: r["final"][t] / base[int(s)][t] for t in r["final"]} for s, r in rows.items()}
        out["variants"][name] = {"settings": settings, "per_seed": rows, "ratios": ratios}
        mean = lambda key, t, rows=rows: statistics.fmean(r[key][t] for r in rows.values())  # noqa: E731
        cells = [f"{mean('after_stage2', t):.3f} / {mean('final', t):.3f}" for t in ("seg", "det", "cls")]
        per = "; ".join(f"{s}: " + ", ".join(f"{v:.2f}" for v in r.values()) for s, r in ratios.items())
        worst = min(min(r.values()) for r in ratios.values())
        print(f"| {name} | " + " | ".join(cells) + f" | {per} | {worst:.3f} |", flush=True)
    ws.config.out.mkdir(parents=True, exist_ok=True)
    (ws.config.out / "ewc_study.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
