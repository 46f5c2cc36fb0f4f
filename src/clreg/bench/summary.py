r"""A scenario's report: each method's average accuracy after the last stage with a seed-aware interval,
its accuracy matrix, backward transfer and forgetting.

With :math:`R_{k,j}` task j's metric after stage k (T stages, the run's task order), per seed:

.. math::

    \mathrm{ACC} = \frac1T \sum_{j=1}^{T} R_{T,j}, \qquad
    \mathrm{BWT} = \frac1{T-1} \sum_{j=1}^{T-1} (R_{T,j} - R_{j,j}), \qquad
    \mathrm{F} = \frac1{T-1} \sum_{j=1}^{T-1} \Big(\max_{k<T} R_{k,j} - R_{T,j}\Big)

(Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018), each then averaged over seeds. ACC's 95 % interval is
the hierarchical bootstrap of :mod:`clreg.bench.stats`: seeds resampled, then each task's test samples
within each drawn seed (task j's R resamples seeded by its sample count, so every run of a task reads
the same ones), the average over tasks taken inside each replicate.

Example:
    >>> from clreg.bench.summary import sequence_measures
    >>> sequence_measures([[0.9, 0.1], [0.5, 0.8]])
    {'acc': 0.65, 'bwt': -0.4, 'forgetting': 0.4}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .runner import RunResult
from .stats import RESAMPLES, hierarchical_draws, interval, standard_counts

__all__ = ["average_interval", "sequence_measures", "summarise"]


def sequence_measures(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    """ACC, BWT and forgetting of one run's matrix (see the module); one stage: BWT and F are 0."""
    final, tasks = list(matrix[-1]), len(matrix)
    acc = sum(final) / len(final)
    if tasks < 2:
        return {"acc": acc, "bwt": 0.0, "forgetting": 0.0}
    bwt = sum(final[j] - matrix[j][j] for j in range(tasks - 1)) / (tasks - 1)
    forgetting = sum(max(matrix[k][j] for k in range(tasks - 1)) - final[j] for j in range(tasks - 1)) / (tasks - 1)
    return {"acc": round(acc, 12), "bwt": round(bwt, 12), "forgetting": round(forgetting, 12)}


def average_interval(runs: Sequence[RunResult], resamples: int = RESAMPLES) -> tuple[float, float]:
    """The 95 % hierarchical bootstrap interval of the mean over seeds of ACC (see the module)."""
    boots = []
    for r in runs:
        per_task = [m.scores(standard_counts(m.n, resamples)) for m in r.final]
        boots.append(torch.stack(per_task).mean(0))
    draws = hierarchical_draws(len(runs), resamples, seed=0)
    return interval(draws.mean(torch.stack(boots)))


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


def summarise(results: Mapping[str, Sequence[RunResult]]) -> dict[str, dict[str, Any]]:
    """Per method: ACC (mean, std and interval over seeds, and each seed's), BWT, forgetting, the mean
    accuracy matrix and the effective settings of its first seed."""
    out = {}
    for method, runs in results.items():
        if not runs:
            continue
        measures = [sequence_measures(r.matrix) for r in runs]
        accs = [m["acc"] for m in measures]
        rows, cols = len(runs[0].matrix), len(runs[0].matrix[0])
        matrix = [[_mean([r.matrix[k][j] for r in runs]) for j in range(cols)] for k in range(rows)]
        lo, hi = average_interval(runs)
        out[method] = {
            "acc": _mean(accs),
            "acc_std": _std(accs),
            "acc_interval": [lo, hi],
            "acc_per_seed": {r.seed: a for r, a in zip(runs, accs)},
            "bwt": _mean([m["bwt"] for m in measures]),
            "forgetting": _mean([m["forgetting"] for m in measures]),
            "matrix": matrix,
            "tasks": runs[0].tasks,
            "seeds": [r.seed for r in runs],
            "settings": runs[0].settings,
            "seconds": sum(r.seconds for r in runs),
        }
    return out
