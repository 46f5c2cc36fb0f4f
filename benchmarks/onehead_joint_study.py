"""The joint reference under each schedule, as trained and with its BatchNorm statistics recalibrated.

    python benchmarks/onehead_joint_study.py --out runs/joint-study [--first-seed 100 --seeds 2] \\
        [--schedules equal,balanced,full] [--recalibration-steps 50] [--loss-weights 1,1,1]

Takes the benchmark's flags (read as a ``--tune`` reads: its seeds, the validation split), trains the
joint reference of each schedule at the profile's loss weights (or ``--loss-weights``) and learning rate (a unit already in
the output folder is read back), and prints each task's score as trained and after the model's
BatchNorm statistics are re-estimated on one batch of every task per step
(:func:`clreg.onehead.analysis.recalibrated_batchnorm`). Writes ``joint_study.json`` into the output
folder. The test split is never read.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from clreg.onehead.analysis import recalibrated_batchnorm
from clreg.onehead.cli import build_parser, validation_config
from clreg.onehead.experiments.workspace import open_workspace
from clreg.onehead.protocol import joint


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    parser.add_argument("--schedules", default="equal,balanced,full")
    parser.add_argument("--recalibration-steps", type=int, default=50)
    parser.add_argument(
        "--loss-weights", default=None, help="the tasks' loss weights, e.g. 1,1,1 (default: the profile's)"
    )
    args = parser.parse_args(argv)
    ws = open_workspace(validation_config(args, methods="naive"))
    out: dict = {}
    print("| schedule | seed | " + " | ".join(f"{t} trained / recalibrated" for t in ws.tasks) + " |")
    print("|---|---|" + "---|" * len(ws.tasks))
    for schedule in args.schedules.split(","):
        for seed in ws.config.seeds:
            run = replace(ws.seed_run(seed), joint_schedule=schedule)
            if args.loss_weights:
                run = replace(run, joint_weights=tuple(float(w) for w in args.loss_weights.split(",")))
            state = joint(run)
            model = ws.make_model()
            model.load_state_dict(state.model)
            tasks = [run.tasks[s.task] for s in run.stages]
            recalibrated_batchnorm(model, tasks, ws.config.profile.batch_size, args.recalibration_steps, seed)
            again = run.evaluate(model)
            row = {t: {"trained": state.evals[t].value, "recalibrated": again[t].value} for t in state.evals}
            out.setdefault(schedule, {})[str(seed)] = row
            cells = [f"{r['trained']:.3f} / {r['recalibrated']:.3f}" for r in row.values()]
            print(f"| {schedule} | {seed} | " + " | ".join(cells) + " |", flush=True)
    (ws.config.out / "joint_study.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
