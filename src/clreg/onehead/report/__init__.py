"""Reports of a run: the summary (:mod:`~clreg.onehead.report.summary`: the 5 % judgement and the
sequence measures), ``report.md`` (:mod:`~clreg.onehead.report.markdown`), the figures
(:mod:`~clreg.onehead.report.figures`) and :func:`write_report`, which writes them with
``results.json``; a tune's ``tune.md`` (:mod:`~clreg.onehead.report.tune_table`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .figures import lambda_figure, report_figures
from .markdown import render_markdown
from .summary import MARGIN, judge, mean_std, sequence_measures, summarise
from .tune_table import render_tune

__all__ = [
    "MARGIN",
    "SCHEMA_VERSION",
    "jsonable",
    "judge",
    "lambda_figure",
    "mean_std",
    "render_markdown",
    "render_tune",
    "report_figures",
    "sequence_measures",
    "summarise",
    "write_report",
]

SCHEMA_VERSION = 1


def jsonable(x: Any) -> Any:
    """``x`` with tensors as lists, keys as strings and non-finite floats as ``None``."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_report(
    results: dict[str, Any], out: Path, extra_scores: dict[str, dict[str, str]] | None = None
) -> dict[str, Any]:
    """Write results.json, report.md and the figures; returns the JSON-ready results."""
    out.mkdir(parents=True, exist_ok=True)
    results = jsonable({"schema_version": SCHEMA_VERSION, **results})
    results["figures"] = report_figures(results, out)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False))
    tmp.replace(out / "results.json")
    (out / "report.md").write_text(render_markdown(results, extra_scores))
    return results
