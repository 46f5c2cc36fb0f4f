r"""Summaries of a harness run: the 5 % judgement, transfer and forgetting measures, results.json,
report.md and figures.

With R[i][k] the score on task k after stage i (T stages, task k trained in stage k), b_k the
single-task baseline and mean over the tasks a stage has not yet reached excluded:

* final score R[T][k]; drop b_k − R[T][k] (absolute) and 1 − R[T][k]/b_k (relative);
* the 5 % rule: the paired bootstrap interval of R[T][k] / b_k over the same test images (the same
  resamples for both; with several seeds, the ratio of the seed means per resample): **pass** when it
  lies above 0.95, **fail** when below, **inconclusive** otherwise; **not judged** when b_k is near
  chance (b_k < chance + 0.1);
* backward transfer (Lopez-Paz & Ranzato 2017): :math:`\frac{1}{T-1}\sum_{k<T} (R_{T,k} - R_{k,k})`;
* forgetting (Chaudhry et al. 2018): :math:`\frac{1}{T-1}\sum_{k<T} \max_{l<T} R_{l,k} - R_{T,k}`;
* intransigence against the single-task baseline: :math:`\frac{1}{T}\sum_k (b_k - R_{k,k})`;
* baseline-normalised variants: the same with every term divided by b_k.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from .metrics import _interval

__all__ = ["SCHEMA_VERSION", "judge", "sequence_measures", "write_report"]

SCHEMA_VERSION = 1
MARGIN = 0.95


def judge(final_boot: list[torch.Tensor], base_boot: list[torch.Tensor], base_value: float, chance: float) -> dict:
    """The paired 5 % judgement from per-seed resampled scores (same resamples for final and base)."""
    if base_value < chance + 0.1:
        return {"verdict": "not judged", "reason": f"baseline {base_value:.3f} is near chance ({chance:.3f})"}
    lo, hi = _interval(_seed_mean(final_boot) / _seed_mean(base_boot))
    verdict = "pass" if lo > MARGIN else "fail" if hi < MARGIN else "inconclusive"
    return {"verdict": verdict, "ratio_lo": lo, "ratio_hi": hi}


def sequence_measures(R: list[list[float]], base: list[float]) -> dict[str, float]:
    """Backward transfer, forgetting, intransigence and their baseline-normalised variants; ``R`` is
    (stages × tasks) with task k trained in stage k, ``base`` the single-task baselines."""
    T = len(R)
    last = R[-1]

    def div(a: float, b: float) -> float:
        return a / b if b else math.nan

    out: dict[str, float] = {"average_final": sum(last) / T}
    if T > 1:
        out["backward_transfer"] = sum(last[k] - R[k][k] for k in range(T - 1)) / (T - 1)
        out["forgetting"] = sum(max(R[i][k] for i in range(T - 1)) - last[k] for k in range(T - 1)) / (T - 1)
        out["backward_transfer_normalised"] = sum(div(last[k] - R[k][k], base[k]) for k in range(T - 1)) / (T - 1)
        out["forgetting_normalised"] = sum(
            div(max(R[i][k] for i in range(T - 1)) - last[k], base[k]) for k in range(T - 1)
        ) / (T - 1)
    out["intransigence"] = sum(base[k] - R[k][k] for k in range(T)) / T
    out["intransigence_normalised"] = sum(div(base[k] - R[k][k], base[k]) for k in range(T)) / T
    out["average_final_normalised"] = sum(div(last[k], base[k]) for k in range(T)) / T
    return out


def _seed_mean(boots: list[torch.Tensor]) -> torch.Tensor:
    """Per resample (the same images for every seed), the mean over seeds of the resampled scores."""
    return torch.stack(boots).mean(0)


def _mean_interval(records: list[dict[str, Any]]) -> list[float]:
    """The 95 % bootstrap interval of the mean over seeds; with one seed it is that seed's interval."""
    return list(_interval(_seed_mean([r["boot"] for r in records])))


def mean_std(xs: list[float]) -> dict[str, float]:
    """The mean and the sample standard deviation (0 for one value) of ``xs``."""
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarise(
    seeds: list[dict[str, Any]], tasks: list[str], chance: dict[str, float], metric_names: dict[str, str]
) -> dict[str, Any]:
    """Per-method results from the runners' states: ``seeds`` holds, per seed, ``{"single": {task:
    state}, "joint": state, "methods": {name: [stage states]}}``."""
    methods = list(seeds[0]["methods"])
    base_val = {k: [s["single"][k]["evals"][k]["value"] for s in seeds] for k in tasks}
    base_boot = {k: [s["single"][k]["evals"][k]["boot"] for s in seeds] for k in tasks}
    out: dict[str, Any] = {
        "baselines": {
            k: {
                "metric": metric_names[k],
                **mean_std(base_val[k]),
                "per_seed": base_val[k],
                "interval": _mean_interval([s["single"][k]["evals"][k] for s in seeds]),
                **_extras([s["single"][k]["evals"][k] for s in seeds]),
            }
            for k in tasks
        },
        "joint": {
            k: {
                **mean_std([s["joint"]["evals"][k]["value"] for s in seeds]),
                "interval": _mean_interval([s["joint"]["evals"][k] for s in seeds]),
                **_extras([s["joint"]["evals"][k] for s in seeds]),
            }
            for k in tasks
        }
        if all("joint" in s for s in seeds)
        else None,
        "methods": {},
    }
    for m in methods:
        per_seed_R = [[[st["evals"][k]["value"] for k in tasks] for st in s["methods"][m]] for s in seeds]
        R_mean = [[statistics.fmean(r[i][k] for r in per_seed_R) for k in range(len(tasks))] for i in range(len(tasks))]
        base_mean = [statistics.fmean(base_val[k]) for k in tasks]
        finals = {}
        for j, k in enumerate(tasks):
            vals = [r[-1][j] for r in per_seed_R]
            verdict = judge(
                [s["methods"][m][-1]["evals"][k]["boot"] for s in seeds], base_boot[k], base_mean[j], chance[k]
            )
            finals[k] = {
                "metric": metric_names[k],
                **mean_std(vals),
                "per_seed": vals,
                "interval": _mean_interval([s["methods"][m][-1]["evals"][k] for s in seeds]),
                "drop_absolute": base_mean[j] - statistics.fmean(vals),
                "drop_relative": 1 - statistics.fmean(vals) / base_mean[j] if base_mean[j] else math.nan,
                "five_percent_rule": verdict,
                **_extras([s["methods"][m][-1]["evals"][k] for s in seeds]),
            }
        measures = [sequence_measures(r, [base_val[k][i] for k in tasks]) for i, r in enumerate(per_seed_R)]
        states = [st for s in seeds for st in s["methods"][m][1:]]
        out["methods"][m] = {
            "R": R_mean,
            "R_per_seed": per_seed_R,
            "final": finals,
            "measures": {key: mean_std([x[key] for x in measures]) for key in measures[0]},
            "train_seconds": statistics.fmean(
                sum(st["train"]["seconds"] + st["train"].get("consolidate_seconds", 0.0) for st in s["methods"][m][1:])
                for s in seeds
            ),
            "regularizer_bytes": max((int(st.get("regularizer_bytes", 0)) for st in states), default=0),
            "peak_rss_bytes": max((int(st.get("peak_rss", 0)) for st in states), default=0),
        }
    return out


def _mean_or_none(values: list[Any]) -> Any:
    if any(v is None or not isinstance(v, (int, float)) for v in values):
        return None if any(v is None for v in values) else values[0]
    return statistics.fmean(values)


def _extras(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """The records' further figures (mAP@[.5:.95], per-class scores), each the mean over seeds."""
    out: dict[str, Any] = {}
    for k, v in recs[0].items():
        if k in ("value", "lo", "hi", "boot", "n"):
            continue
        if isinstance(v, dict):
            out[k] = {c: _mean_or_none([r[k].get(c) for r in recs]) for c in v}
        else:
            out[k] = _mean_or_none([r[k] for r in recs])
    return out


# -- writing -----------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _pm(d: dict[str, float], seeds: int) -> str:
    if d["mean"] is None:
        return "–"
    return f"{d['mean']:.3f} ± {d['std']:.3f}" if seeds > 1 else f"{d['mean']:.3f}"


def render_markdown(results: dict[str, Any]) -> str:
    s = results["summary"]
    cfg = results["config"]
    tasks = cfg["tasks"]
    n_seeds = len(results["seeds"])
    within = results["within_rules"]
    lines = [f"# Unified one-head three-stage benchmark — profile `{cfg['profile']}`", ""]
    lines += [
        f"Data: {cfg['data']['description']}; reported on the **{cfg['eval_split']}** split"
        + (" (no test split: hyperparameters were fixed beforehand)" if cfg["eval_split"] == "val" else "")
        + ".",
        f"Stages: {' → '.join(f'{t} ({n} steps)' for t, n in zip(tasks, cfg['steps']))}; batch {cfg['batch_size']}, "
        f"{cfg['size']} px; seeds {results['seeds']}; BatchNorm statistics: {cfg['bn']}; backbone: "
        f"{cfg['backbone_description']}.",
        f"Method settings: {cfg['settings_provenance']}.",
        "",
        "## Final scores and the 5 % rule",
        "",
        "Each final score is the metric after the last stage"
        + (" (mean ± std over seeds)" if n_seeds > 1 else " [95 % bootstrap interval]")
        + "; the rule compares it with the single-task baseline by a paired bootstrap interval of "
        "final / baseline (pass above 0.95, fail below, inconclusive across).",
        "",
    ]
    head = "| method | rules | " + " | ".join(f"{t} {s['baselines'][t]['metric']}" for t in tasks) + " | avg |"
    lines += [head, "|" + "---|" * (len(tasks) + 3)]
    base_row = "| single-task baseline | | " + " | ".join(_pm(s["baselines"][t], n_seeds) for t in tasks) + " | |"
    lines.append(base_row)
    if s.get("joint"):
        lines.append("| joint reference | | " + " | ".join(_pm(s["joint"][t], n_seeds) for t in tasks) + " | |")
    for m, r in s["methods"].items():
        cells = []
        for t in tasks:
            f = r["final"][t]
            v = f["five_percent_rule"]["verdict"]
            score = (
                _pm(f, n_seeds) if n_seeds > 1 else f"{f['mean']:.3f} [{f['interval'][0]:.3f}, {f['interval'][1]:.3f}]"
            )
            cells.append(f"{score} {v}")
        avg = r["measures"]["average_final"]["mean"]
        lines.append(f"| {m} | {'yes' if within[m] else 'no (extra)'} | " + " | ".join(cells) + f" | {avg:.3f} |")
    lines += ["", "## Drops against the single-task baseline", ""]
    lines += ["| method | " + " | ".join(f"{t} abs / rel / paired ratio" for t in tasks) + " |"]
    lines += ["|" + "---|" * (len(tasks) + 1)]
    for m, r in s["methods"].items():
        cells = []
        for t in tasks:
            f = r["final"][t]
            j = f["five_percent_rule"]
            ratio = f"[{j['ratio_lo']:.3f}, {j['ratio_hi']:.3f}]" if "ratio_lo" in j else j["verdict"]
            rel = "–" if f["drop_relative"] is None else f"{100 * f['drop_relative']:+.1f} %"
            cells.append(f"{f['drop_absolute']:+.3f} / {rel} / {ratio}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if "det" in tasks:
        lines += ["", "mAP@[.5:.95] after the last stage (mean over seeds): " + ", ".join(
            f"{m} {_fmt(r['final']['det'].get('map_50_95'))}" for m, r in s["methods"].items()
        ) + f"; single-task {_fmt(s['baselines']['det'].get('map_50_95'))}."]  # fmt: skip
    lines += ["", "## Transfer, forgetting and cost", ""]
    keys = ["average_final", "backward_transfer", "forgetting", "intransigence", "forgetting_normalised"]
    lines += ["| method | " + " | ".join(keys) + " | train s | regularizer MB | peak RSS MB |"]
    lines += ["|" + "---|" * (len(keys) + 4)]
    for m, r in s["methods"].items():
        cells = [_pm(r["measures"][k], n_seeds) if k in r["measures"] else "–" for k in keys]
        lines.append(
            f"| {m} | " + " | ".join(cells) + f" | {r['train_seconds']:.0f} | {r['regularizer_bytes'] / 2**20:.1f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} |"
        )
    lines += [
        "",
        "Backward transfer (Lopez-Paz & Ranzato 2017) and forgetting (Chaudhry et al. 2018) average over the "
        "tasks before the last; intransigence is baseline − score right after a task's own stage; "
        "the normalised forgetting divides each term by the baseline.",
        "",
        "## Accuracy matrices R[stage][task]",
        "",
    ]
    for m, r in s["methods"].items():
        lines += [f"**{m}**", "", "| after | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
        for i, row in enumerate(r["R"]):
            lines.append(f"| stage {i + 1} ({tasks[i]}) | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        lines.append("")
    res = results["resources"]
    lines += [
        "## Resources",
        "",
        f"Parameters {res['parameters']:,} (trainable {res['trainable']:,}); neck layers {res['neck_layers']}, "
        f"head learnable layers {res['head_layers']}.",
    ]
    if res.get("latency_ms"):
        lat = res["latency_ms"]
        lines.append(
            f"CPU latency per 512×512 image: {lat['model']:.1f} ms (head {lat['head']:.1f} ms, "
            f"{100 * lat['head'] / lat['model']:.0f} %) on {results['provenance']['cpu']} "
            f"with {results['provenance']['threads']} threads."
        )
    lines += ["", "Figures: `accuracy_matrices.png`, `scores_across_stages.png`.", ""]
    return "\n".join(lines)


def _figures(results: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
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


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_report(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write results.json, report.md and the figures; returns the JSON-ready results."""
    out.mkdir(parents=True, exist_ok=True)
    results = _jsonable({"schema_version": SCHEMA_VERSION, **results})
    results["figures"] = _figures(results, out)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False))
    tmp.replace(out / "results.json")
    (out / "report.md").write_text(render_markdown(results))
    return results
