r"""The summary of a run: the 5 % judgement, transfer and forgetting measures, means over seeds.

With R[i][k] the score on task k after stage i (T stages, task k trained in stage k) and b_k the
single-task baseline:

* final score R[T][k]; drop b_k − R[T][k] (absolute) and 1 − R[T][k]/b_k (relative);
* the 5 % rule: the hierarchical bootstrap interval (:mod:`clreg.bench.stats`: seeds
  resampled, then test images within each resampled seed) of the ratio of seed means
  :math:`\sum_s R^{(s)}_{T,k} / \sum_s b^{(s)}_k`, paired (the same seeds and image resamples for the
  final score and the baseline of the same seed): **pass** when it lies above 0.95, **fail** when
  below, **inconclusive** otherwise; **not judged** when b_k is near chance (b_k < chance + 0.1). The
  per-seed ratios :math:`R^{(s)}_{T,k} / b^{(s)}_k` stand beside it, and the image-only interval (the
  seeds' mean per image resample, the seeds held fixed) is kept for comparison;
* every score's interval: the same hierarchical bootstrap of the mean over seeds;
* backward transfer (Lopez-Paz & Ranzato 2017): :math:`\frac{1}{T-1}\sum_{k<T} (R_{T,k} - R_{k,k})`;
* forgetting (Chaudhry et al. 2018): :math:`\frac{1}{T-1}\sum_{k<T} \max_{l<T} R_{l,k} - R_{T,k}`;
* intransigence against the single-task baseline: :math:`\frac{1}{T}\sum_k (b_k - R_{k,k})`;
* baseline-normalised variants: the same with every term divided by b_k.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from ..metrics import HierarchicalDraws, hierarchical_draws, interval
from ..protocol import SeedResult
from ..store import EvalRecord, UnitState

__all__ = ["MARGIN", "judge", "mean_std", "sequence_measures", "summarise"]

MARGIN = 0.95


def judge(
    final_boot: list[torch.Tensor],
    base_boot: list[torch.Tensor],
    base_value: float,
    chance: float,
    final_values: list[float] | None = None,
    base_values: list[float] | None = None,
) -> dict:
    """The paired 5 % judgement from per-seed resampled scores (the same image resamples for every
    record): the hierarchical interval of final / baseline, the image-only one beside it, and the
    per-seed ratios of ``final_values`` / ``base_values`` where given."""
    if base_value < chance + 0.1:
        return {"verdict": "not judged", "reason": f"baseline {base_value:.3f} is near chance ({chance:.3f})"}
    final, base = torch.stack(final_boot), torch.stack(base_boot)
    draws = _draws(final)
    lo, hi = interval(draws.mean(final) / draws.mean(base))
    verdict = "pass" if lo > MARGIN else "fail" if hi < MARGIN else "inconclusive"
    images_lo, images_hi = interval(final.mean(0) / base.mean(0))
    out = {"verdict": verdict, "ratio_lo": lo, "ratio_hi": hi, "images_only": [images_lo, images_hi]}
    if final_values is not None and base_values is not None:
        out["per_seed_ratios"] = [f / b if b else math.nan for f, b in zip(final_values, base_values)]
    return out


def _draws(boots: torch.Tensor) -> HierarchicalDraws:
    """The hierarchical draws for (S, R) resampled scores: the same for every statistic of a run with
    S seeds and R resamples, so intervals of different methods share them."""
    return hierarchical_draws(boots.shape[0], boots.shape[1], seed=0)


def sequence_measures(R: list[list[float]], base: list[float]) -> dict[str, float]:
    """Backward transfer, forgetting, intransigence and their baseline-normalised variants; ``R`` is
    (stages × tasks) with task k trained in stage k, ``base`` the single-task baselines."""
    T = len(R)
    last = R[-1]

    def div(a: float, b: float) -> float:
        return a / b if b else math.nan

    out: dict[str, float] = {"average_final": sum(last) / T}
    if T > 1:
        best = [max(R[i][k] for i in range(T - 1)) for k in range(T - 1)]
        out["backward_transfer"] = sum(last[k] - R[k][k] for k in range(T - 1)) / (T - 1)
        out["forgetting"] = sum(best[k] - last[k] for k in range(T - 1)) / (T - 1)
        out["backward_transfer_normalised"] = sum(div(last[k] - R[k][k], base[k]) for k in range(T - 1)) / (T - 1)
        out["forgetting_normalised"] = sum(div(best[k] - last[k], base[k]) for k in range(T - 1)) / (T - 1)
    out["intransigence"] = sum(base[k] - R[k][k] for k in range(T)) / T
    out["intransigence_normalised"] = sum(div(base[k] - R[k][k], base[k]) for k in range(T)) / T
    out["average_final_normalised"] = sum(div(last[k], base[k]) for k in range(T)) / T
    return out


def _mean_interval(records: list[EvalRecord]) -> list[float]:
    """The 95 % hierarchical bootstrap interval of the mean over seeds; with one seed it is that seed's
    image interval."""
    boots = torch.stack([r.boot for r in records])
    return list(interval(_draws(boots).mean(boots)))


def mean_std(xs: list[float]) -> dict[str, float]:
    """The mean and the sample standard deviation (0 for one value) of ``xs``; NaN for both where a
    value is NaN (a measure normalised by a zero baseline).

    Example:
        >>> mean_std([1.0, 3.0]), mean_std([1.0, float("nan")])
        ({'mean': 2.0, 'std': 1.4142135623730951}, {'mean': nan, 'std': nan})
    """
    if any(math.isnan(x) for x in xs):
        return {"mean": math.nan, "std": math.nan}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def _mean_or_none(values: list[Any]) -> Any:
    if any(v is None or not isinstance(v, (int, float)) for v in values):
        return None if any(v is None for v in values) else values[0]
    return statistics.fmean(values)


def _extras(recs: list[EvalRecord]) -> dict[str, Any]:
    """The records' further figures (mAP@[.5:.95], per-class scores), each the mean over seeds."""
    out: dict[str, Any] = {}
    for k, v in recs[0].extras.items():
        if isinstance(v, dict):
            out[k] = {c: _mean_or_none([r.extras[k].get(c) for r in recs]) for c in v}
        else:
            out[k] = _mean_or_none([r.extras[k] for r in recs])
    return out


def _scores(recs: list[EvalRecord], metric: str | None = None) -> dict[str, Any]:
    """Mean ± std over seeds, the seed-mean interval and the extras of one task's records."""
    head = {"metric": metric} if metric is not None else {}
    values = [r.value for r in recs]
    return {**head, **mean_std(values), "per_seed": values, "interval": _mean_interval(recs), **_extras(recs)}


def _final(recs: list[EvalRecord], base: list[EvalRecord], metric: str, chance: float) -> dict[str, Any]:
    """One task's final scores over seeds against its baselines: drops and the 5 % rule."""
    base_mean = statistics.fmean(r.value for r in base)
    mean = statistics.fmean(r.value for r in recs)
    verdict = judge(
        [r.boot for r in recs],
        [r.boot for r in base],
        base_mean,
        chance,
        [r.value for r in recs],
        [r.value for r in base],
    )
    out = _scores(recs, metric)
    extras = {k: out.pop(k) for k in list(out) if k not in ("metric", "mean", "std", "per_seed", "interval")}
    out |= {
        "drop_absolute": base_mean - mean,
        "drop_relative": 1 - mean / base_mean if base_mean else math.nan,
        "five_percent_rule": verdict,
    }
    return out | extras


def _method(seeds: list[SeedResult], m: str, tasks: list[str], chance: dict[str, float], metric_names) -> dict:
    per_seed_R = [[[st.evals[k].value for k in tasks] for st in s.methods[m]] for s in seeds]
    R_mean = [[statistics.fmean(r[i][k] for r in per_seed_R) for k in range(len(tasks))] for i in range(len(tasks))]
    finals = {
        k: _final([s.methods[m][-1].evals[k] for s in seeds], [s.single[k].evals[k] for s in seeds],
                  metric_names[k], chance[k])
        for k in tasks
    }  # fmt: skip
    measures = [sequence_measures(r, [s.single[k].evals[k].value for k in tasks]) for s, r in zip(seeds, per_seed_R)]
    later: list[UnitState] = [st for s in seeds for st in s.methods[m][1:]]
    return {
        "R": R_mean,
        "R_per_seed": per_seed_R,
        "final": finals,
        "measures": {key: mean_std([x[key] for x in measures]) for key in measures[0]},
        "train_seconds": statistics.fmean(
            sum(st.train["seconds"] + st.train.get("consolidate_seconds", 0.0) for st in s.methods[m][1:])
            for s in seeds
        ),
        "regularizer_bytes": max((int(st.regularizer_bytes) for st in later), default=0),
        "peak_rss_bytes": max((int(st.peak_rss) for st in later), default=0),
    }


def summarise(
    seeds: list[SeedResult], tasks: list[str], chance: dict[str, float], metric_names: dict[str, str]
) -> dict[str, Any]:
    """Per-method results, the baselines and the joint reference from every seed's unit states."""
    baselines = {k: _scores([s.single[k].evals[k] for s in seeds], metric_names[k]) for k in tasks}
    joint = None
    if all(s.joint is not None for s in seeds):
        joint = {k: _scores([s.joint.evals[k] for s in seeds]) for k in tasks}
    methods = {m: _method(seeds, m, tasks, chance, metric_names) for m in seeds[0].methods}
    return {"baselines": baselines, "joint": joint, "methods": methods}
