r"""Bootstrap intervals, shared by every scenario of the harness: over image resamples (the metric protocol, resample counts, an interval, a
paired ratio) and over seeds and images at once (the hierarchical bootstrap).

The hierarchical bootstrap resamples the S training seeds with replacement, then the test images
within each resampled seed. Every record of a run holds the same R image resamples (the counts are
seeded by the number of images), so replicate b of a statistic over seeds reads, for its j-th drawn
seed :math:`s_{b,j}`, that seed's stored resample :math:`\pi_j(b)` (:math:`\pi_j` a random
permutation of the R resamples, one per position j):

.. math:: \bar x_b = \frac1S \sum_{j=1}^{S} x_{s_{b,j}}[\pi_j(b)],

and a paired ratio uses the same draws for both sides, :math:`\bar f_b / \bar g_b`. With one seed the
replicates are the image resamples themselves, in another order: the interval is the image
bootstrap's."""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "RESAMPLES",
    "HierarchicalDraws",
    "MeanMetric",
    "Metric",
    "StoredMetric",
    "bootstrap",
    "hierarchical_draws",
    "interval",
    "paired_ratio",
    "resample_counts",
    "standard_counts",
]

RESAMPLES = 1000
"""The image resamples of a report's intervals (and of a stored metric's scores)."""


@runtime_checkable
class Metric(Protocol):
    n: int

    def value(self) -> float: ...

    def scores(self, counts: Tensor) -> Tensor: ...

    def image_ids(self) -> list: ...


class MeanMetric:
    """A metric that is the mean of a per-sample score (accuracy: 1 for a sample right, 0 wrong), as the
    bootstrap's :class:`Metric` protocol reads it.

    Example:
        >>> import torch
        >>> m = MeanMetric(torch.tensor([1.0, 0.0, 1.0, 1.0]))
        >>> m.value(), m.scores(torch.tensor([[1.0, 1.0, 0.0, 0.0]])).tolist()
        (0.75, [0.5])
    """

    def __init__(self, per_sample: Tensor, ids: list | None = None) -> None:
        per_sample = torch.as_tensor(per_sample, dtype=torch.float64).flatten()
        if per_sample.numel() == 0:
            raise ValueError("a metric needs at least one sample")
        if ids is not None and len(ids) != per_sample.numel():
            raise ValueError(f"{len(ids)} ids for {per_sample.numel()} samples")
        self.per_sample = per_sample
        self._ids = list(ids) if ids is not None else list(range(per_sample.numel()))

    @property
    def n(self) -> int:
        return self.per_sample.numel()

    def value(self) -> float:
        return float(self.per_sample.mean())

    def scores(self, counts: Tensor) -> Tensor:
        return counts.to(torch.float64) @ self.per_sample / counts.sum(1)

    def image_ids(self) -> list:
        return list(self._ids)


def resample_counts(n: int, resamples: int, seed: int = 0) -> Tensor:
    """(R, n) counts of each image in R bootstrap resamples of n images (seeded)."""
    if n < 1:
        raise ValueError("cannot resample an empty set of images")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(resamples, n, dtype=torch.float64)
    )


def standard_counts(n: int, resamples: int = RESAMPLES) -> Tensor:
    """The harness's resamples of n images: :func:`resample_counts` seeded by ``n``, so every run of a
    task reads the same ones."""
    return resample_counts(n, resamples, seed=n)


class StoredMetric:
    """A metric as a run record keeps it when it is not a per-sample mean (mIoU, mAP): its value, its
    images' ids and its scores on the :func:`standard_counts` of ``R`` resamples, all a report reads.

    ``scores(counts)`` gives those scores for the standard counts, the value where every count is one,
    and a ValueError for any other resampling (the images behind the value are not kept).

    Example:
        >>> import torch
        >>> m = MeanMetric(torch.tensor([1.0, 0.0, 1.0]))
        >>> stored = StoredMetric.of(m, resamples=5)
        >>> bool(torch.equal(stored.scores(standard_counts(3, 5)), m.scores(standard_counts(3, 5))))
        True
    """

    def __init__(self, value: float, ids: list, resampled: Tensor) -> None:
        resampled = torch.as_tensor(resampled, dtype=torch.float64).flatten()
        if not ids:
            raise ValueError("a metric needs at least one sample")
        if resampled.numel() == 0:
            raise ValueError("a stored metric needs its scores on at least one resample")
        self._value, self._ids, self.resampled = float(value), list(ids), resampled

    @classmethod
    def of(cls, metric: Metric, resamples: int = RESAMPLES) -> StoredMetric:
        """``metric`` reduced to what a record keeps: its value, ids and standard resamples' scores."""
        return cls(metric.value(), metric.image_ids(), metric.scores(standard_counts(metric.n, resamples)))

    @property
    def n(self) -> int:
        return len(self._ids)

    def value(self) -> float:
        return self._value

    def image_ids(self) -> list:
        return list(self._ids)

    def scores(self, counts: Tensor) -> Tensor:
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.dim() != 2 or counts.shape[1] != self.n:
            raise ValueError(f"counts are (R, {self.n}) for {self.n} images, got {tuple(counts.shape)}")
        if bool((counts == 1).all()):
            return torch.full((counts.shape[0],), self._value, dtype=torch.float64)
        r = self.resampled.numel()
        if counts.shape[0] == r and torch.equal(counts, standard_counts(self.n, r)):
            return self.resampled.clone()
        raise ValueError(
            f"a stored metric scores its {r} standard resamples (standard_counts({self.n}, {r})) only, "
            "not other counts: its per-image records are not kept"
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


class HierarchicalDraws(NamedTuple):
    """Replicate b's j-th seed ``seeds[b, j]`` and the image resample it reads, ``images[b, j]``."""

    seeds: Tensor
    images: Tensor

    def mean(self, boots: Tensor) -> Tensor:
        """(B,) replicates of the mean over seeds, from each seed's (S, R) resampled scores."""
        if boots.dim() != 2 or boots.shape[0] != self.seeds.shape[1]:
            raise ValueError(f"expected ({self.seeds.shape[1]}, R) resampled scores, got {tuple(boots.shape)}")
        return boots[self.seeds, self.images].mean(1)


def hierarchical_draws(n_seeds: int, resamples: int, seed: int = 0) -> HierarchicalDraws:
    """Seeds drawn with replacement and, per position, a permutation of the stored image resamples
    (see the module): ``resamples`` replicates of ``n_seeds`` draws each.

    Example:
        >>> d = hierarchical_draws(3, 4, seed=0)
        >>> d.seeds.shape, sorted(d.images[:, 0].tolist())
        (torch.Size([4, 3]), [0, 1, 2, 3])
    """
    if n_seeds < 1 or resamples < 1:
        raise ValueError(f"need at least one seed and one resample, got {n_seeds} and {resamples}")
    g = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, n_seeds, (resamples, n_seeds), generator=g)
    images = torch.stack([torch.randperm(resamples, generator=g) for _ in range(n_seeds)], 1)
    return HierarchicalDraws(seeds, images)
