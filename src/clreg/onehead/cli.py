"""The command line of the three-stage one-head benchmark: parse arguments into a request, resolve it
into a configuration and hand it to the experiment layer; report errors as one line and an exit code.

``python -m clreg.onehead`` / ``clreg-onehead`` / ``python benchmarks/unified_onehead.py``::

    clreg-onehead [run] [--profile quick|scratch|tiny|original] [--methods naive,ewc,ewc+lwf+replay]
                  [--data-root DIR] [--backbone-weights FILE | --pretrained | --random-init]
                  [--device cpu] [--amp] [--out DIR] [--seeds N] [--first-seed K] [--workers N] [--steps N]
                  [--bn train|freeze] [--stages seg,det,cls]
                  [--categories a,b,...] [--set name=value ...] [--settings-from TUNE_JSON]
                  [--tune [--recorded-only] | --baselines-only] [--no-joint]
                  [--quiet]
    clreg-onehead evaluate --checkpoint FILE --data-root DIR [--tasks seg,det,cls] [--split val]

With no arguments: the quick profile on the synthetic default data (generated and cached on first
use), the profile's methods on its seeds (quick: seven methods, seeds 0-4, two worker processes), the
report in ``onehead-results/quick``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import warnings
from dataclasses import replace

import torch

from .config import BenchmarkConfig, RunRequest, resolve
from .data import DataFormatError
from .experiments import EvaluateRequest, evaluate_checkpoint, run_experiment
from .profiles import PROFILES

__all__ = ["build_evaluate_parser", "build_parser", "main", "request_from_args"]


class UsageError(ValueError):
    """A bad flag: reported as a message and a non-zero exit."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clreg-onehead",
        description="The unified one-head three-stage continual-learning benchmark "
        "(segmentation → detection → classification). `clreg-onehead evaluate -h` for the evaluate command.",
    )
    p.add_argument(
        "--profile", default="quick", choices=sorted(PROFILES), help="quick (default), scratch, tiny or original"
    )
    p.add_argument(
        "--methods",
        help="comma-separated methods, '+' joins a combination (default: the profile's); 'all': the challenge's "
        "remedies, their combinations and the extras (Online EWC, SI, MAS, K-FAC EWC)",
    )
    p.add_argument(
        "--data-root", help="a folder with mini_voc_seg, mini_coco_det and imagenette_160 (default: synthetic)"
    )
    p.add_argument(
        "--categories",
        metavar="NAME,NAME,...",
        help="the detection categories by name (default: the data's manifest, the default ten, or the data's own ten)",
    )
    wg = p.add_mutually_exclusive_group()
    wg.add_argument("--backbone-weights", help="a local timm mobilenetv3_small_100 checkpoint for the backbone")
    wg.add_argument("--pretrained", action="store_true", help="ImageNet weights from timm's hub (needs the network)")
    wg.add_argument("--random-init", action="store_true", help="a randomly initialised backbone")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast where the device supports it")
    p.add_argument("--out", help="output folder (default: onehead-results/<profile>)")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="number of training seeds (default: the profile's; 2+: mean ± std, judged over seeds and images)",
    )
    p.add_argument(
        "--first-seed",
        type=int,
        default=None,
        help="start at this seed (processes running other seeds on one --out at once; then --seeds N reads them "
        "all); without --seeds or --first-seed a --tune trains on the profile's tune seeds, which no report uses",
    )
    p.add_argument("--steps", type=int, help="optimizer steps per stage (default: the profile's)")
    p.add_argument(
        "--stages",
        metavar="TASK,TASK,...",
        help="the tasks in stage order, each at most once (default seg,det,cls); a task keeps its steps and "
        "learning rates, a stage's own settings (NAME@K) stay with its place",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that train a run's units at once, each with its share of the threads (default: the "
        "profile's, at most one per thread torch may use: quick 2, others 1; a --tune uses 1)",
    )
    p.add_argument("--bn", choices=("train", "freeze"), default="train", help="BatchNorm statistics after stage 1")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a method setting")
    p.add_argument(
        "--settings-from",
        metavar="TUNE_JSON",
        default=None,
        help="take what a --tune chose (its tune.json): the baselines' learning rates, the joint reference, "
        "each tuned method's values (--set still overrides)",
    )
    p.add_argument("--no-joint", action="store_true", help="skip the joint-training reference")
    p.add_argument("--tune", action="store_true", help="search the profile's grid on the validation split")
    p.add_argument(
        "--recorded-only",
        action="store_true",
        help="with --tune: train nothing, write tune.json from OUT/tune-progress.json (a method whose search "
        "needs an unrecorded trial is marked incomplete, each key it reached at its best recorded value)",
    )
    p.add_argument("--baselines-only", action="store_true", help="train and evaluate the single-task baselines only")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def build_evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clreg-onehead evaluate", description="Evaluate a saved one-head model as the challenge's grader does."
    )
    p.add_argument("--checkpoint", required=True, help="a model saved by clreg.onehead.save_checkpoint")
    p.add_argument("--data-root", required=True)
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: every task the model has)")
    p.add_argument("--split", default="val")
    p.add_argument("--device", default="cpu")
    return p


def _parse_sets(items: list[str]) -> dict[str, float]:
    out = {}
    for it in items:
        if "=" not in it:
            raise UsageError(f"--set expects NAME=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise UsageError(f"--set {k.strip()}: {v!r} is not a number") from None
    return out


def request_from_args(args: argparse.Namespace) -> RunRequest:
    """The :class:`RunRequest` a parsed command line asks for."""
    if args.tune and args.baselines_only:
        raise UsageError("--tune and --baselines-only exclude each other")
    mode = "tune" if args.tune else "baselines" if args.baselines_only else "run"
    return RunRequest(
        profile=args.profile,
        methods=args.methods,
        data_root=args.data_root,
        backbone_weights=args.backbone_weights,
        pretrained=args.pretrained,
        random_init=args.random_init,
        device=args.device,
        amp=args.amp,
        out=args.out,
        seeds=args.seeds,
        first_seed=args.first_seed,
        workers=args.workers,
        steps=args.steps,
        stages=tuple(args.stages.split(",")) if args.stages else None,
        bn=args.bn,
        sets=_parse_sets(args.set),
        joint=not args.no_joint,
        mode=mode,
        quiet=args.quiet,
        categories=tuple(args.categories.split(",")) if args.categories else None,
        settings_from=args.settings_from,
        recorded_only=args.recorded_only,
    )


def validation_config(args: argparse.Namespace, methods: str | None = None) -> BenchmarkConfig:
    """The configuration of a command line, read as a ``--tune`` reads (the validation split; the
    profile's tune seeds unless ``--seeds``/``--first-seed`` say otherwise) with the profile's own
    settings (a tuned profile's choices kept): for studies that must not read the test split."""
    request = request_from_args(args)
    config = resolve(request if methods is None else replace(request, methods=methods))
    if args.seeds is None and args.first_seed is None:
        config = replace(config, seeds=tuple(config.profile.tune_seeds))
    return replace(config, mode="tune")


def _evaluate(argv: list[str]) -> None:
    a = build_evaluate_parser().parse_args(argv)
    scores = evaluate_checkpoint(EvaluateRequest(a.checkpoint, a.data_root, a.tasks, a.split, a.device))
    print("  ".join(f"{k} {v:.4f}" for k, v in scores.items()))


def _run(argv: list[str]) -> None:
    args = build_parser().parse_args(argv[1:] if argv and argv[0] == "run" else argv)
    request = request_from_args(args)
    if request.quiet:
        logging.getLogger("clreg").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    run_experiment(resolve(request))


def main(argv: list[str] | None = None) -> int:
    """The command line's entry point; returns the exit code (2 for bad input, 130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if argv and argv[0] == "evaluate":
            _evaluate(argv[1:])
        else:
            _run(argv)
        return 0
    except (DataFormatError, FileNotFoundError, ValueError) as err:
        print(f"clreg-onehead: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clreg-onehead: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            gc.collect()  # a cycle from torch.func can hold the group's threads until shutdown, where they abort
