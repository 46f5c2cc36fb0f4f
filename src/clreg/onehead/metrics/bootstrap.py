"""Bootstrap intervals over image resamples: the metric protocol, resample counts, an interval, a
paired ratio."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["Metric", "bootstrap", "interval", "paired_ratio", "resample_counts"]


class Metric(Protocol):
    n: int

    def value(self) -> float: ...

    def scores(self, counts: Tensor) -> Tensor: ...

    def image_ids(self) -> list: ...


def resample_counts(n: int, resamples: int, seed: int = 0) -> Tensor:
    """(R, n) counts of each image in R bootstrap resamples of n images (seeded)."""
    if n < 1:
        raise ValueError("cannot resample an empty set of images")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(resamples, n, dtype=torch.float64)
    )


def interval(values: Tensor) -> tuple[float, float]:
    v = values[torch.isfinite(values)]
    if v.numel() == 0:
        return float("nan"), float("nan")
    q = torch.quantile(v, torch.tensor([0.025, 0.975], dtype=v.dtype))
    return float(q[0]), float(q[1])


def bootstrap(metric: Metric, resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """The full-set value and a 95 % percentile interval over image resamples."""
    lo, hi = interval(metric.scores(resample_counts(metric.n, resamples, seed)))
    return {"value": metric.value(), "lo": lo, "hi": hi, "resamples": resamples}


def paired_ratio(final: Metric, baseline: Metric, resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """final / baseline on the same images, with a 95 % interval from the same resamples."""
    if final.image_ids() != baseline.image_ids():
        raise ValueError("a paired interval needs both metrics on the same images, in the same order")
    counts = resample_counts(final.n, resamples, seed)
    a, b = final.scores(counts), baseline.scores(counts)
    lo, hi = interval(a / b)
    base = baseline.value()
    return {"value": final.value() / base if base else float("nan"), "lo": lo, "hi": hi, "resamples": resamples}
