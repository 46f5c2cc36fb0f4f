"""``tune.md``: a ``--tune``'s report in plain tables (the baselines' learning rates, the joint
reference's candidates, each method's choice and its val scores as final / baseline)."""

from __future__ import annotations

from typing import Any

__all__ = ["render_tune"]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _settings(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(values.items())) or "—"


def _baselines(report: dict[str, Any]) -> list[str]:
    lr = report.get("baseline_lr") or {}
    tasks = list(report["baselines"])
    if not lr:
        return _table(["task", "val score"], [[t, f"{report['baselines'][t]:.3f}"] for t in tasks])
    header = ["learning rate", *tasks]
    rows = [[f"{g:g}", *(f"{lr['trials'][t][i]['value']:.3f}" for t in tasks)] for i, g in enumerate(lr["grid"])]
    return [*_table(header, rows), "", "chosen: " + ", ".join(f"{t} {lr['chosen'][t]:g}" for t in tasks)]


def _joint(report: dict[str, Any]) -> list[str]:
    tasks = list(report["baselines"])
    rows = [
        [t["schedule"], ", ".join(f"{w:g}" for w in t.get("weights", [])) or "1 each"]
        + [f"{t['lr']:g}" if "lr" in t else "the first baseline's"]
        + [f"{t['final'][k]:.3f}" for k in tasks]
        + [f"{t['score']:.3f}"]
        for t in report["joint"]["trials"]
    ]
    return _table(["schedule", "loss weights", "learning rate", *tasks, "worst"], rows)


def _methods(report: dict[str, Any]) -> list[str]:
    """Each method's choice and its trial's scores; a search a tune did not finish is marked, and a
    choice no trial scored shows dashes."""
    tasks = list(report["baselines"])
    rows = []
    for name, m in report["methods"].items():
        best = next((t for t in m["trials"] if t["settings"] == m["chosen"]), None)  # the chosen settings' trial
        finals = [f"{best['final'][t]:.3f}" if best else "–" for t in tasks]
        label = name if m.get("complete", True) else f"{name} (search incomplete)"
        score = f"{best['score']:.3f}" if best else "–"
        rows.append([label, _settings(m["chosen"]), *finals, score, str(len(m["trials"]))])
    return _table(["method", "chosen", *tasks, "worst", "trials"], rows)


def render_tune(report: dict[str, Any]) -> str:
    """Markdown of a ``tune.json`` report: scores are each task's final / its single-task baseline on
    the tune's split, a candidate's score the worst of them."""
    split = report.get("split", "val")
    seeds = ", ".join(str(s) for s in report.get("seeds", [0]))
    lines = [f"# Tune ({split} split, training seeds {seeds})", ""]
    if "score" in report:
        lines += [f"A candidate's score: {report['score']}; per task, the mean over the seeds.", ""]
    lines += ["## Single-task baselines (mean over the seeds)", "", *_baselines(report)]
    if "joint" in report:
        lines += ["", "## Joint reference (final / baseline)", "", *_joint(report)]
    lines += ["", "## Methods (final / baseline of the chosen settings)", "", *_methods(report)]
    return "\n".join(lines) + "\n"
