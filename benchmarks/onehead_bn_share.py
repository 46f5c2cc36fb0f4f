"""How much of each method's forgetting BatchNorm's running statistics carry, on a finished run.

    python benchmarks/onehead_bn_share.py --out onehead-results/quick --seeds 5 --methods naive,ewc,lwf

Takes the benchmark's own flags (the same as the run's, so its units are found and read back; nothing
is trained for a finished run) and re-evaluates each method's final model with the BatchNorm
statistics of each earlier task's own stage swapped in (:mod:`clreg.onehead.analysis`). Prints, per
method and earlier task, the scores right after the task's stage, at the end and at the end with those
statistics, and the share of the forgetting they give back (per seed, and its mean); writes
``bn_share.json`` into the run's folder.
"""

from __future__ import annotations

import json
import statistics
import sys

from clreg.onehead.analysis import batchnorm_share
from clreg.onehead.cli import build_parser, request_from_args, validation_config
from clreg.onehead.config import resolve


def _rows(shares: dict) -> list[str]:
    lines = ["| method | task | own stage | final | final, own stage's statistics | share (per seed) | mean |"]
    lines.append("|---|---|---|---|---|---|---|")
    for method, by_seed in shares.items():
        tasks = next(iter(by_seed.values()))
        for task in tasks:
            cells = [by_seed[s][task] for s in by_seed]
            mean = lambda key, cells=cells: statistics.fmean(c[key] for c in cells)  # noqa: E731
            per = [c["share"] for c in cells]
            known = [x for x in per if x is not None]
            shown = ", ".join("–" if x is None else f"{x:.2f}" for x in per)
            avg = f"{statistics.fmean(known):.2f}" if known else "–"
            lines.append(
                f"| {method} | {task} | {mean('own_stage'):.3f} | {mean('final'):.3f} | "
                f"{mean('with_own_statistics'):.3f} | {shown} | {avg} |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    parser.add_argument(
        "--on-validation",
        action="store_true",
        help="read the run as a --tune reads it (the validation split, the tune seeds): for a study's folder",
    )
    args = parser.parse_args(argv)
    config = validation_config(args) if args.on_validation else resolve(request_from_args(args))
    shares = batchnorm_share(config)
    (config.out / "bn_share.json").write_text(json.dumps(shares, indent=1))
    print("\n".join(_rows(shares)))


if __name__ == "__main__":
    main(sys.argv[1:])
