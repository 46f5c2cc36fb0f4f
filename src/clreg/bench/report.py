"""A scenario report on disk: ``report.json`` (every number) and ``report.md`` (the tables).

The markdown holds one table of every method (ACC's mean, standard deviation over seeds and
hierarchical 95 % interval, each seed's ACC, BWT, forgetting), each method's mean accuracy matrix, and
a line saying whether the scenario saturates: naive fine-tuning within two points of the joint
reference leaves nothing for a remedy to show.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["SATURATION", "markdown", "saturated", "write_report"]

SATURATION = 0.02
"""Naive ACC within this of joint's: the scenario separates nothing."""


def saturated(summary: Mapping[str, Mapping[str, Any]]) -> bool | None:
    """Whether naive's ACC is within :data:`SATURATION` of joint's (``None`` without both)."""
    if "naive" not in summary or "joint" not in summary:
        return None
    return summary["joint"]["acc"] - summary["naive"]["acc"] <= SATURATION


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def markdown(summary: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """The report's tables (see the module)."""
    lines = [f"# {meta.get('title', 'Report')}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "title"]
    flag = saturated(summary)
    if flag is not None:
        gap = summary["joint"]["acc"] - summary["naive"]["acc"]
        verdict = "**saturates**: naive is within two points of joint" if flag else "separates the methods"
        lines.append(f"- joint − naive ACC = {gap:.3f}: this setting {verdict}")
    lines += [
        "",
        "| method | ACC | ± std | 95 % interval (seeds × samples) | per seed | BWT | forgetting |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, s in summary.items():
        lo, hi = s["acc_interval"]
        seeds = " ".join(_fmt(v) for v in s["acc_per_seed"].values())
        lines.append(
            f"| {method} | {_fmt(s['acc'])} | {_fmt(s['acc_std'])} | [{_fmt(lo)}, {_fmt(hi)}] | {seeds} | "
            f"{_fmt(s['bwt'])} | {_fmt(s['forgetting'])} |"
        )
    for method, s in summary.items():
        lines += ["", f"## {method}: accuracy after each stage (rows) on each task (columns)", ""]
        lines += ["| after | " + " | ".join(s["tasks"]) + " |", "|---" * (len(s["tasks"]) + 1) + "|"]
        labels = s["tasks"] if len(s["matrix"]) == len(s["tasks"]) else ["all"]
        for label, row in zip(labels, s["matrix"]):
            lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in row) + " |")
        lines += ["", "settings: `" + json.dumps(s["settings"], sort_keys=True) + "`"]
    return "\n".join(lines) + "\n"


def write_report(folder: str | Path, summary: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> Path:
    """Write ``report.json`` and ``report.md`` in ``folder``; the markdown's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(
        json.dumps({"meta": meta, "methods": summary}, indent=1, sort_keys=False) + "\n"
    )
    path = folder / "report.md"
    path.write_text(markdown(summary, meta))
    return path
