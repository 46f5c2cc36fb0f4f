"""The three-stage one-head benchmark (segmentation → detection → classification) and its CLI.

``python -m clreg.onehead`` / ``clreg-onehead`` / ``python benchmarks/unified_onehead.py``::

    clreg-onehead [run] [--profile quick|scratch|tiny|original] [--methods naive,ewc,ewc+lwf+replay]
                  [--data-root DIR] [--backbone-weights FILE | --pretrained | --random-init]
                  [--device cpu] [--amp] [--out DIR] [--seeds N] [--steps N] [--bn train|freeze]
                  [--set name=value ...] [--tune] [--quiet]
    clreg-onehead evaluate --checkpoint FILE --data-root DIR [--tasks seg,det,cls] [--split val]

With no arguments: the quick profile on the synthetic default data (generated and cached on first
use), every method, one seed, the report in ``onehead-results/quick``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..distributed import rank_and_world
from .data import DataFormatError
from .harness import HarnessTask, Runner, RunSettings, Stage
from .methods import DEFAULT_SETTINGS, Method, parse_methods
from .model import UnifiedOneHead, cpu_latency, load_checkpoint, save_checkpoint
from .pretext import shipped_backbone
from .profiles import PROFILES, QUICK_SETTINGS_PROVENANCE, Profile, get_profile
from .report import mean_std, summarise, write_report
from .synthetic import generate
from .tasks import FOLDERS, METRIC_NAMES, TASK_NAMES, Task, evaluate, make_tasks

__all__ = ["build_parser", "main", "run_benchmark"]

SEQUENCE = ("seg", "det", "cls")
# not compared when resuming: where it runs, how many seeds (each seed's units are separate), which
# methods and their settings (a method's units are keyed by its name and settings; the baselines'
# learning rate is compared as "baseline_lr") and whether the joint reference is run
IGNORED_ON_RESUME = ("device", "seeds", "methods", "within_rules", "joint", "settings", "settings_provenance")


class UsageError(ValueError):
    """A bad flag or input: reported as a message and a non-zero exit."""


# -- configuration -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clreg-onehead",
        description="The unified one-head three-stage continual-learning benchmark "
        "(segmentation → detection → classification). `clreg-onehead evaluate -h` for the evaluate command.",
    )
    p.add_argument(
        "--profile", default="quick", choices=sorted(PROFILES), help="quick (default), scratch, tiny or original"
    )
    p.add_argument("--methods", help="comma-separated methods, '+' joins a combination (default: the profile's)")
    p.add_argument(
        "--data-root", help="a folder with mini_voc_seg, mini_coco_det and imagenette_160 (default: synthetic)"
    )
    wg = p.add_mutually_exclusive_group()
    wg.add_argument("--backbone-weights", help="a local timm mobilenetv3_small_100 checkpoint for the backbone")
    wg.add_argument("--pretrained", action="store_true", help="ImageNet weights from timm's hub (needs the network)")
    wg.add_argument("--random-init", action="store_true", help="a randomly initialised backbone")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast where the device supports it")
    p.add_argument("--out", help="output folder (default: onehead-results/<profile>)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (2+: mean ± std, judged on the mean)")
    p.add_argument("--steps", type=int, help="optimizer steps per stage (default: the profile's)")
    p.add_argument("--bn", choices=("train", "freeze"), default="train", help="BatchNorm statistics after stage 1")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a method setting")
    p.add_argument("--no-joint", action="store_true", help="skip the joint-training reference")
    p.add_argument("--tune", action="store_true", help="search the profile's grid on the validation split")
    p.add_argument("--baselines-only", action="store_true", help="train and evaluate the single-task baselines only")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def build_evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clreg-onehead evaluate", description="Evaluate a saved one-head model as the challenge's grader does."
    )
    p.add_argument("--checkpoint", required=True, help="a model saved by clreg.onehead.save_checkpoint")
    p.add_argument("--data-root", required=True)
    p.add_argument("--tasks", default="seg,det,cls")
    p.add_argument("--split", default="val")
    p.add_argument("--device", default="cpu")
    return p


def _parse_sets(items: list[str]) -> dict[str, float]:
    out = {}
    for it in items:
        if "=" not in it:
            raise UsageError(f"--set expects NAME=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        k = k.strip()
        if k not in DEFAULT_SETTINGS:
            raise UsageError(f"--set: unknown setting {k!r}; known: {', '.join(sorted(DEFAULT_SETTINGS))}")
        try:
            out[k] = float(v)
        except ValueError:
            raise UsageError(f"--set {k}: {v!r} is not a number") from None
    return out


def _has_split(root: Path, split: str) -> bool:
    return all(
        (root / f / split).is_dir() or (root / f / "annotations" / f"instances_{split}2017.json").is_file()
        for f in FOLDERS.values()
    )


def _data_hash(root: Path) -> str:
    h = hashlib.sha256()
    for folder in sorted(FOLDERS.values()):
        for dirpath, dirs, files in sorted(os.walk(root / folder)):
            dirs.sort()
            for f in sorted(files):
                p = Path(dirpath) / f
                h.update(f"{p.relative_to(root)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _provenance() -> dict[str, Any]:
    versions = {}
    for pkg in ("torch", "torchvision", "timm", "torchmetrics", "pycocotools", "numpy", "pillow"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    versions["clreg"] = __version__
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "versions": versions,
        "python": platform.python_version(),
        "git_commit": commit,
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _to_harness(task: Task, device: str) -> HarnessTask:
    def extras(metric: Any) -> dict[str, Any]:
        if task.name == "seg":
            return {"per_class_iou": dict(zip(task.class_names, metric.per_class_iou()))}
        if task.name == "det":
            ap = metric.per_class_ap()
            names = {task.eval_data.category_id(i): n for i, n in enumerate(task.class_names)}
            return {"map_50_95": metric.map_50_95(), "per_class_ap": {names.get(k, str(k)): v for k, v in ap.items()}}
        return {}

    return HarnessTask(
        name=task.name,
        train_data=task.train_data,
        loss=task.loss,
        spec=task.spec,
        evaluate=lambda model: evaluate(model, task, device=device),
        metric_name=task.metric_name,
        fit_data=task.fit_data,
        chance=task.chance,
        extras=extras,
        prepare=lambda model: model.reset_task_outputs(task.name),
    )


# -- the run -----------------------------------------------------------------------------------------


def _resolve(args: argparse.Namespace) -> tuple[Profile, dict[str, Any]]:
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    prof = get_profile(args.profile)
    if args.steps is not None:
        prof = replace(prof, steps=(args.steps,) * len(SEQUENCE))
    try:
        methods = parse_methods(args.methods or prof.methods)
    except ValueError as err:
        raise UsageError(f"--methods: {err}") from None
    settings = {**DEFAULT_SETTINGS, **prof.settings, **_parse_sets(args.set)}
    if args.backbone_weights:
        if not Path(args.backbone_weights).is_file():
            raise UsageError(f"--backbone-weights: no such file {args.backbone_weights}")
        backbone = {"kind": "file", "path": str(Path(args.backbone_weights).resolve())}
        desc = f"local weights {args.backbone_weights}"
    elif args.pretrained:
        backbone, desc = {"kind": "pretrained"}, "ImageNet weights from timm's hub"
    elif args.random_init or prof.backbone == "random":
        backbone, desc = {"kind": "random"}, "random initialisation"
    else:
        backbone = {"kind": "file", "path": str(shipped_backbone())}
        desc = (
            "the shipped synthetic-pretext backbone (clreg.onehead.pretext: a dense map of which of the 10 shape "
            "kinds is where, on 15 000 images from seeds disjoint from the tasks'; the kinds overlap the tasks' vocabulary)"
        )
    if args.data_root:
        root = Path(args.data_root)
        if not root.is_dir():
            raise UsageError(f"--data-root: no such folder {root}")
        missing = [f for f in FOLDERS.values() if not (root / f).is_dir()]
        if missing:
            raise UsageError(f"--data-root {root} lacks {missing}; expected {sorted(FOLDERS.values())}")
        data = {"kind": "folder", "root": str(root.resolve()), "description": f"data root {root}"}
    else:
        data = {
            "kind": "synthetic",
            "synthetic": prof.synthetic.__dict__ | {"key": prof.synthetic.key()},
            "description": f"synthetic default (generator {prof.synthetic.key()})",
        }
    provenance = (QUICK_SETTINGS_PROVENANCE if prof.name == "quick" else f"the {prof.name} profile's fixed values") + (
        f"; overridden by --set {', '.join(args.set)}" if args.set else ""
    )
    config = {
        "profile": prof.name,
        "tasks": list(SEQUENCE),
        "methods": methods,
        "within_rules": {m: Method.parse(m).within_rules for m in methods},
        "settings": settings,
        "baseline_lr": settings["lr"],
        "settings_provenance": provenance,
        "stage_settings": [dict(s) for s in prof.stage_settings],
        "stage_lr": list(prof.stage_lr),
        "stage_warmup": list(prof.stage_warmup),
        "steps": list(prof.steps),
        "batch_size": prof.batch_size,
        "size": prof.size,
        "width": prof.width,
        "bn": args.bn,
        "seeds": list(range(args.seeds)),
        "backbone": backbone,
        "backbone_description": desc,
        "data": data,
        "device": args.device,
        "amp": bool(args.amp),
        "channels_last": True,
        "joint": not args.no_joint,
        "resamples": prof.resamples,
        "tune": bool(args.tune),
    }
    return prof, config


def _logger(quiet: bool):
    def log_line(msg: str) -> None:
        if not quiet and rank_and_world()[0] == 0:
            print(msg, flush=True)

    return log_line


def _load_data(prof: Profile, config: dict[str, Any], log_line, quiet: bool) -> tuple[Path, str]:
    if config["data"]["kind"] == "synthetic":
        t0 = time.perf_counter()
        root = generate(prof.synthetic, progress=not quiet)
        log_line(f"synthetic data: {root} ({time.perf_counter() - t0:.0f} s)")
    else:
        root = Path(config["data"]["root"])
    if config["tune"]:
        return root, "val"
    return root, "test" if _has_split(root, "test") else "val"


def _check_config(out: Path, config: dict[str, Any]) -> None:
    saved = out / "config.json"
    # the JSON round trip makes tuples lists, as they are in the saved file
    comparable = json.loads(json.dumps({k: v for k, v in config.items() if k not in IGNORED_ON_RESUME}))
    if saved.is_file():
        old = {k: v for k, v in json.loads(saved.read_text()).items() if k not in IGNORED_ON_RESUME}
        if comparable != old:
            diff = sorted(k for k in set(old) | set(comparable) if old.get(k) != comparable.get(k))
            raise UsageError(
                f"{out} holds a run with another configuration (differs in {diff}); choose another --out or remove it"
            )
    elif rank_and_world()[0] == 0:
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(comparable, indent=1))


def run_benchmark(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run (or resume) the benchmark the parsed ``args`` describe; returns the results (rank 0)."""
    prof, config = _resolve(args)
    log_line = _logger(args.quiet)
    out = Path(args.out or Path("onehead-results") / (prof.name + ("-tune" if args.tune else "")))
    try:
        torch.device(config["device"])
    except RuntimeError:
        raise UsageError(f"--device {config['device']!r} is not a device torch knows") from None
    if config["device"].startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    root, eval_split = _load_data(prof, config, log_line, args.quiet)
    config["eval_split"] = eval_split
    config["data"]["hash"] = _data_hash(root)
    _check_config(out, config)
    tasks = make_tasks(root, eval_split=eval_split, size=prof.size, seed=0)
    htasks = {k: _to_harness(t, config["device"]) for k, t in tasks.items()}
    backbone = config["backbone"]

    def make_model() -> UnifiedOneHead:
        return UnifiedOneHead(
            det_classes=tasks["det"].num_classes,
            seg_classes=tasks["seg"].num_classes,
            cls_classes=tasks["cls"].num_classes,
            width=prof.width,
            backbone_weights=backbone.get("path"),
            pretrained=backbone["kind"] == "pretrained",
        )

    stages = [
        Stage(t, n, lr, dict(s), warmup_steps=w)
        for t, n, lr, s, w in zip(
            SEQUENCE, config["steps"], config["stage_lr"], config["stage_settings"], config["stage_warmup"]
        )
    ]
    run = RunSettings(
        batch_size=prof.batch_size,
        bn=config["bn"],
        resamples=prof.resamples,
        device=config["device"],
        amp=config["amp"],
        channels_last=config["channels_last"],
        progress=not args.quiet and rank_and_world()[0] == 0,
    )
    wrap = _ddp_wrap if rank_and_world()[1] > 1 else None
    if args.tune:
        return _tune(prof, config, make_model, htasks, stages, run, out, wrap, log_line)
    if args.baselines_only:
        return _baselines_only(config, make_model, htasks, stages, run, out, wrap, log_line)
    settings_lr = config["baseline_lr"]
    seeds = []
    for seed in config["seeds"]:
        runner = Runner(make_model, htasks, stages, run, out, seed=seed, wrap=wrap, log_line=log_line, lr=settings_lr)
        entry: dict[str, Any] = {"single": {}, "methods": {}}
        for i, st in enumerate(stages):
            entry["single"][st.task] = runner.single(i)
        if config["joint"]:
            entry["joint"] = runner.joint()
        for name in config["methods"]:
            entry["methods"][name] = runner.method(Method.parse(name, config["settings"]))
        seeds.append(entry)
    if rank_and_world()[0] != 0:
        return None
    model = make_model()
    arch = model.architecture_report()
    resources = {
        "parameters": arch["parameters"],
        "trainable": arch["trainable_parameters"],
        "neck_layers": arch["neck_layers"],
        "head_layers": arch["head_layers"],
    }
    if prof.latency:
        lat = cpu_latency(model, size=512, repeats=10)
        resources["latency_ms"] = {"model": lat["model_ms"], "head": lat["head_ms"]}
    summary = summarise(
        seeds, list(SEQUENCE), {k: t.chance for k, t in tasks.items()}, {k: METRIC_NAMES[k] for k in SEQUENCE}
    )
    _save_models(seeds[0], make_model, tasks, prof, out)
    results = {
        "config": config,
        "seeds": config["seeds"],
        "within_rules": config["within_rules"],
        "summary": summary,
        "resources": resources,
        "provenance": _provenance(),
    }
    results = write_report(results, out)
    log_line(f"report: {out / 'report.md'}")
    return results


def _baselines_only(config, make_model, htasks, stages, run, out, wrap, log_line) -> dict[str, Any]:
    """Only the single-task baselines (each task alone, its stage's budget): ``baselines.json`` with
    each seed's score, interval and training time, and the mean and standard deviation over seeds."""
    res: dict[str, Any] = {"steps": config["steps"], "split": config["eval_split"], "seeds": {}}
    for seed in config["seeds"]:
        runner = Runner(
            make_model, htasks, stages, run, out, seed=seed, wrap=wrap, log_line=log_line, lr=config["baseline_lr"]
        )
        res["seeds"][seed] = {}
        for i, st in enumerate(stages):
            state = runner.single(i)
            rec = state["evals"][st.task]
            res["seeds"][seed][st.task] = {
                "value": rec["value"],
                "interval": [rec["lo"], rec["hi"]],
                "train_seconds": state["train"]["seconds"],
                **({"map_50_95": rec["map_50_95"]} if "map_50_95" in rec else {}),
            }
    res["mean"] = {
        st.task: mean_std([res["seeds"][seed][st.task]["value"] for seed in config["seeds"]]) for st in stages
    }
    for task, m in res["mean"].items():
        log_line(f"baseline {task}: {m['mean']:.3f} ± {m['std']:.3f} over {len(config['seeds'])} seed(s)")
    if rank_and_world()[0] == 0:
        (out / "baselines.json").write_text(json.dumps(res, indent=1))
        log_line(f"baselines: {out / 'baselines.json'}")
    return res


def _save_models(seed0: dict[str, Any], make_model, tasks: dict[str, Task], prof: Profile, out: Path) -> None:
    """Each method's final model (seed 0) in the one-head checkpoint format, for ``evaluate``."""
    names = {k: t.class_names for k, t in tasks.items()}
    cmap = {n: tasks["det"].eval_data.category_id(i) for i, n in enumerate(tasks["det"].class_names)}
    for name, states in seed0["methods"].items():
        path = out / "models" / f"{name}.pt"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        model = make_model()
        model.load_state_dict(states[-1]["model"])
        save_checkpoint(model, path, class_names=names, category_map=cmap, input_size=prof.size)


def _ddp_wrap(model: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)


# -- tuning ------------------------------------------------------------------------------------------


def _tune(prof, config, make_model, htasks, stages, run, out, wrap, log_line) -> dict[str, Any]:
    """Coordinate search over the profile's grid, on the validation split, one setting at a time per
    method (naive fine-tuning's learning rate included); a candidate scores as the challenge judges:
    by its worst task's final / single-task baseline (the mean over tasks breaks ties). A ``+``
    combination is not searched: it runs once with the values its parts chose."""
    runner = Runner(
        make_model, htasks, stages, run, out, seed=0, wrap=wrap, log_line=log_line, lr=config["baseline_lr"]
    )
    base = {st.task: runner.single(i)["evals"][st.task]["value"] for i, st in enumerate(stages)}
    report: dict[str, Any] = {"grid": prof.tune_grid, "baselines": base, "methods": {}, "split": "val"}

    def trial(method: Method, settings: dict[str, float]) -> dict[str, Any]:
        states = runner.method(Method(method.name, method.parts, {**method.settings, **settings}))
        finals = {t: states[-1]["evals"][t]["value"] / max(b, 1e-9) for t, b in base.items()}
        score, mean = min(finals.values()), sum(finals.values()) / len(finals)
        return {"settings": dict(settings), "score": score, "mean": mean, "final": finals}

    for name in config["methods"]:
        method = Method.parse(name, config["settings"])
        chosen = dict(method.relevant_settings())
        if len(method.parts) > 1:
            for part in method.parts:
                picked = report["methods"].get(part, {}).get("chosen", {})
                chosen.update({k: v for k, v in picked.items() if k != "lr"})
            trials = [trial(method, chosen)]
        else:
            trials = []
            for key in [k for k in prof.tune_grid if k in chosen and (k != "lr" or name == "naive")]:
                tried = [trial(method, {**chosen, key: value}) for value in prof.tune_grid[key]]
                chosen[key] = max(tried, key=lambda t: (t["score"], t["mean"]))["settings"][key]
                trials += tried
        report["methods"][name] = {"chosen": chosen, "trials": trials}
        log_line(f"tune {name}: {chosen}")
    report["provenance"] = _provenance()
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(report, indent=1))
    _lambda_figure(report, out)
    log_line(f"tuning results: {out / 'tune.json'}")
    return report


def _lambda_figure(report: dict[str, Any], out: Path) -> None:
    trials = [t for t in report["methods"].get("ewc", {}).get("trials", []) if "ewc.lam" in t["settings"]]
    if not trials:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = [t["settings"]["ewc.lam"] for t in trials]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for task in report["baselines"]:
        ax.plot(lams, [t["final"][task] for t in trials], marker="o", label=f"{task} final / baseline")
    ax.set_xscale("log")
    ax.axhline(0.95, color="k", ls=":", lw=1)
    ax.set_xlabel("EWC λ")
    ax.set_ylabel("final / single-task baseline (val)")
    ax.set_title("EWC stability–plasticity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ewc_lambda_sensitivity.png", dpi=110)
    plt.close(fig)


# -- evaluate ----------------------------------------------------------------------------------------


def run_evaluate(args: argparse.Namespace) -> dict[str, float]:
    model, meta = load_checkpoint(args.checkpoint, map_location="cpu")
    model.to(args.device)
    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in wanted if t not in TASK_NAMES]
    if bad or not wanted:
        raise UsageError(f"--tasks: unknown {bad}; choose from {', '.join(TASK_NAMES)}")
    root = Path(args.data_root)
    if not root.is_dir():
        raise UsageError(f"--data-root: no such folder {root}")
    names = meta["class_names"]
    tasks = make_tasks(root, eval_split=args.split, size=int(meta["input_size"]), class_names=names)
    scores = {}
    for t in wanted:
        metric = evaluate(model, tasks[t], device=args.device)
        scores[METRIC_NAMES[t]] = metric.value()
        if t == "det":
            scores["mAP@[.5:.95]"] = metric.map_50_95()
    print("  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return scores


# -- entry point -------------------------------------------------------------------------------------


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if argv and argv[0] == "evaluate":
            run_evaluate(build_evaluate_parser().parse_args(argv[1:]))
            return 0
        if argv and argv[0] == "run":
            argv = argv[1:]
        args = build_parser().parse_args(argv)
        if args.quiet:
            logging.getLogger("clreg").setLevel(logging.ERROR)
            warnings.simplefilter("ignore")
        _init_distributed()
        run_benchmark(args)
        return 0
    except (UsageError, DataFormatError, FileNotFoundError, ValueError) as err:
        print(f"clreg-onehead: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clreg-onehead: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            gc.collect()  # a cycle from torch.func can hold the group's threads until shutdown, where they abort
