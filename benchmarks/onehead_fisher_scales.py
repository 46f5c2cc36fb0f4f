"""On what scale each task's Fisher lies, per parameter group, where EWC consolidates it.

    python benchmarks/onehead_fisher_scales.py --seeds 2 --first-seed 100 --out runs/ewc-study

Takes the benchmark's flags (read on the validation split, as a ``--tune`` reads; the units of EWC's
run of each seed are trained where missing) and prints, per seed, the mean, median and 99th
percentile of segmentation's Fisher (``mc``, on the stage-1 model) and of detection's (on EWC's
stage-2 model: the empirical Fisher of its loss on the training and on the validation images, and the
``mc`` Fisher of its likelihood) for the backbone, the neck, the head's hidden layer and each task's
rows of the head's output layer (:mod:`clreg.onehead.analysis`); writes ``fisher_scales.json`` into the
output folder.
"""

from __future__ import annotations

import json
import sys

from clreg.onehead.analysis import fisher_scales
from clreg.onehead.cli import build_parser, validation_config


def _rows(scales: dict) -> list[str]:
    groups = list(next(iter(scales.values())))
    lines = ["| Fisher | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for variant, by_group in scales.items():
        cells = [f"{by_group[g]['mean']:.2e} / {by_group[g]['median']:.2e} / {by_group[g]['p99']:.2e}" for g in groups]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = validation_config(args, methods="ewc")
    out = {str(seed): fisher_scales(config, seed) for seed in config.seeds}
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "fisher_scales.json").write_text(json.dumps(out, indent=1))
    for seed, scales in out.items():
        print(f"seed {seed} (mean / median / 99th percentile per group)")
        print("\n".join(_rows(scales)))


if __name__ == "__main__":
    main(sys.argv[1:])
