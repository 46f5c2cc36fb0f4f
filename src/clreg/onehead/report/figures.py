"""The figures of a run (accuracy matrices, scores across stages) and of a tune (EWC's λ curve)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .summary import MARGIN

__all__ = ["lambda_figure", "report_figures"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def report_figures(results: dict[str, Any], out: Path) -> list[str]:
    """``accuracy_matrices.png`` and ``scores_across_stages.png``; returns their names."""
    try:
        plt = _pyplot()
    except ImportError:  # pragma: no cover - matplotlib is in the benchmark extra
        return []
    s, tasks = results["summary"], results["config"]["tasks"]
    methods = list(s["methods"])
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, m in zip(axes.flat, methods):
        R = s["methods"][m]["R"]
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(R):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks])
        ax.set_title(m, fontsize=9)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "accuracy_matrices.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for j, (ax, t) in enumerate(zip(axes.flat, tasks)):
        for m in methods:
            ax.plot(range(1, len(tasks) + 1), [row[j] for row in s["methods"][m]["R"]], marker="o", label=m)
        ax.axhline(s["baselines"][t]["mean"], color="k", ls="--", lw=1, label="single-task")
        ax.axhline(MARGIN * s["baselines"][t]["mean"], color="k", ls=":", lw=1, label="0.95 × single-task")
        if s.get("joint"):
            ax.scatter([len(tasks)], [s["joint"][t]["mean"]], marker="*", s=120, color="k", label="joint", zorder=5)
        ax.set_xticks(range(1, len(tasks) + 1), [f"after {x}" for x in tasks])
        ax.set_title(f"{t} ({s['baselines'][t]['metric']})")
        ax.set_ylim(0, 1)
    axes.flat[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "scores_across_stages.png", dpi=110)
    plt.close(fig)
    return ["accuracy_matrices.png", "scores_across_stages.png"]


def _lambda_sweeps(report: dict[str, Any]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(key, variant label, trials) for every sweep of an EWC λ in a tune's trials."""
    ewc = report["methods"].get("ewc", {})
    variants = ewc.get("variants") or [{"fixed": {}, "trials": ewc.get("trials", [])}]
    sweeps = []
    for v in variants:
        label = ", ".join(f"{k}={x:g}" for k, x in v["fixed"].items()) or "plain"
        keys = dict.fromkeys(t.get("key", "ewc.lam") for t in v["trials"])
        for key in (k for k in keys if k.startswith("ewc.lam")):
            trials = [t for t in v["trials"] if t.get("key", "ewc.lam") == key and key in t["settings"]]
            sweeps.append((key, label, trials))
    return sweeps


def lambda_figure(report: dict[str, Any], out: Path) -> None:
    """``ewc_lambda_sensitivity.png``: each task's final / baseline against each EWC λ a tune swept
    (one panel per λ, one line style per variant), from the tune's trials on the validation split."""
    sweeps = [s for s in _lambda_sweeps(report) if s[2]]
    if not sweeps:
        return
    plt = _pyplot()
    keys = list(dict.fromkeys(k for k, _, _ in sweeps))
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.4), squeeze=False)
    styles = ["-", "--", ":", "-."]
    labels = list(dict.fromkeys(label for _, label, _ in sweeps))
    for ax, key in zip(axes.flat, keys):
        for _, label, trials in (s for s in sweeps if s[0] == key):
            lams = [t["settings"][key] for t in trials]
            for task in report["baselines"]:
                ax.plot(lams, [t["final"][task] for t in trials], marker="o", ls=styles[labels.index(label) % 4],
                        label=f"{task} ({label})")  # fmt: skip
        ax.set_xscale("log")
        ax.axhline(MARGIN, color="k", ls=":", lw=1)
        ax.set_xlabel(f"EWC {key.replace('ewc.lam', 'λ')}")
        ax.set_ylabel("final / single-task baseline (val)")
        ax.set_title("EWC stability–plasticity")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "ewc_lambda_sensitivity.png", dpi=110)
    plt.close(fig)
