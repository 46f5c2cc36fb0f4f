"""Runs on disk: one JSON record per (method, seed, split) in a folder, so an interrupted report resumes
where it stopped and a finished one is read back without training.

A record holds the run's matrix, its last row's metrics (a per-sample mean's per-sample scores, what
the bootstrap resamples; any other metric as a :class:`~clreg.bench.stats.StoredMetric`: its value, its
images' ids and its scores on the standard resamples), the effective settings and the scenario's
record; a record whose settings or scenario differ from the run asked for is not reused.

Example:
    >>> import tempfile, torch
    >>> from clreg.bench.runner import RunResult
    >>> from clreg.bench.stats import MeanMetric
    >>> from clreg.bench.store import RunStore
    >>> store = RunStore(tempfile.mkdtemp())
    >>> r = RunResult("naive", 0, "test", ["a"], [[0.5]], [MeanMetric(torch.tensor([1.0, 0.0]))], {"lr": [1e-3]})
    >>> store.save(r, {"scenario": "toy"})
    >>> store.load("naive", 0, "test", {"lr": [1e-3]}, {"scenario": "toy"}).matrix
    [[0.5]]
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .runner import RunResult
from .stats import MeanMetric, Metric, StoredMetric

__all__ = ["RunStore"]


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _metric_record(metric: Metric) -> Any:
    """A per-sample mean as its per-sample scores (ids kept where they are not the positions); any
    other metric as its value, ids and standard resamples' scores."""
    if isinstance(metric, MeanMetric):
        ids = metric.image_ids()
        scores = metric.per_sample.tolist()
        return scores if ids == list(range(len(ids))) else {"per_sample": scores, "ids": _plain(ids)}
    if not isinstance(metric, Metric):
        raise TypeError(f"a run's final metrics follow clreg.bench.stats.Metric, got {type(metric).__name__}")
    stored = metric if isinstance(metric, StoredMetric) else StoredMetric.of(metric)
    return {"value": stored.value(), "ids": _plain(stored.image_ids()), "resampled": stored.resampled.tolist()}


def _metric_from(record: Any) -> Metric:
    if isinstance(record, list):
        return MeanMetric(torch.tensor(record, dtype=torch.float64))
    if "per_sample" in record:
        return MeanMetric(torch.tensor(record["per_sample"], dtype=torch.float64), record["ids"])
    return StoredMetric(record["value"], record["ids"], torch.tensor(record["resampled"], dtype=torch.float64))


class RunStore:
    """A folder of run records (see the module)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, method: str, seed: int, split: str) -> Path:
        return self.folder / "runs" / f"{method}-seed{seed}-{split}.json"

    def save(self, result: RunResult, scenario: dict[str, Any]) -> None:
        """Write ``result`` atomically (a temporary file renamed), so a crash never leaves half a record."""
        record = {
            "method": result.method, "seed": result.seed, "split": result.split, "tasks": result.tasks,
            "matrix": result.matrix, "final": [_metric_record(m) for m in result.final],
            "settings": _plain(result.settings), "seconds": result.seconds, "scenario": _plain(scenario),
        }  # fmt: skip
        path = self.path(result.method, result.seed, result.split)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)

    def load(
        self, method: str, seed: int, split: str, settings: dict[str, Any], scenario: dict[str, Any]
    ) -> RunResult | None:
        """The stored run, or ``None`` when there is none or it was made with other settings or another
        scenario."""
        path = self.path(method, seed, split)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if record["settings"] != _plain(settings) or record["scenario"] != _plain(scenario):
            return None
        final = [_metric_from(v) for v in record["final"]]
        return RunResult(
            record["method"], record["seed"], record["split"], record["tasks"], record["matrix"], final,
            record["settings"], record["seconds"],
        )  # fmt: skip
