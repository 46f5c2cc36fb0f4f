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


def lambda_figure(report: dict[str, Any], out: Path) -> None:
    """``ewc_lambda_sensitivity.png``: each task's final / baseline against EWC's λ, from a tune's trials."""
    trials = [t for t in report["methods"].get("ewc", {}).get("trials", []) if "ewc.lam" in t["settings"]]
    if not trials:
        return
    plt = _pyplot()
    lams = [t["settings"]["ewc.lam"] for t in trials]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for task in report["baselines"]:
        ax.plot(lams, [t["final"][task] for t in trials], marker="o", label=f"{task} final / baseline")
    ax.set_xscale("log")
    ax.axhline(MARGIN, color="k", ls=":", lw=1)
    ax.set_xlabel("EWC λ")
    ax.set_ylabel("final / single-task baseline (val)")
    ax.set_title("EWC stability–plasticity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ewc_lambda_sensitivity.png", dpi=110)
    plt.close(fig)
