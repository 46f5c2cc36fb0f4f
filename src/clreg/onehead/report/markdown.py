"""``report.md``: the final scores and verdicts, the drops, transfer and forgetting, the accuracy
matrices and the resources of a run, from its JSON-ready results."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["render_markdown"]


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _pm(d: dict[str, float], seeds: int) -> str:
    if d["mean"] is None:
        return "–"
    return f"{d['mean']:.3f} ± {d['std']:.3f}" if seeds > 1 else f"{d['mean']:.3f}"


def _extra_line(s: dict[str, Any], task: str, key: str, label: str) -> str:
    finals = ", ".join(f"{m} {_fmt(r['final'][task].get(key))}" for m, r in s["methods"].items())
    return (
        f"{label} after the last stage (mean over seeds): {finals}; single-task {_fmt(s['baselines'][task].get(key))}."
    )


def _header(results: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    tasks = cfg["tasks"]
    no_test = " (no test split: hyperparameters were fixed beforehand)" if cfg["eval_split"] == "val" else ""
    return [
        f"# Unified one-head three-stage benchmark — profile `{cfg['profile']}`",
        "",
        f"Data: {cfg['data']['description']}; reported on the **{cfg['eval_split']}** split{no_test}.",
        f"Stages: {' → '.join(f'{t} ({n} steps)' for t, n in zip(tasks, cfg['steps']))}; batch {cfg['batch_size']}, "
        f"{cfg['size']} px; seeds {results['seeds']}; BatchNorm statistics: {cfg['bn']}; backbone: "
        f"{cfg['backbone_description']}.",
        f"Method settings: {cfg['settings_provenance']}.",
        *_tune_seeds(results),
        *_chosen_classes(results),
        "",
    ]


def _tune_seeds(results: dict[str, Any]) -> list[str]:
    """The tune's training seeds, and a warning where the report's seeds include any of them."""
    tuned = results["config"].get("tune_seeds")
    if tuned is None:
        return []
    shared = results.get("seeds_shared_with_tune") or []
    line = f"The settings were tuned on training seeds {tuned} (validation split)"
    if not shared:
        return [line + "; none of them is reported here."]
    return [
        line
        + f". **Warning: seeds {shared} are reported too**: their verdicts rest on the trajectories the settings were fitted to."
    ]


def _chosen_classes(results: dict[str, Any]) -> list[str]:
    """A line for each task whose classes the data chose (not a manifest, a checkpoint or a flag)."""
    given = ("given", "the data's manifest")
    return [
        f"Classes of {task}: {c['source']}: {', '.join(c['names'])}."
        for task, c in results.get("classes", {}).items()
        if c["source"] and c["source"] not in given
    ]


def _final_scores(results: dict[str, Any]) -> list[str]:
    """The table of final scores with each task's verdict, under the baselines and the joint reference."""
    s, tasks, n_seeds = results["summary"], results["config"]["tasks"], len(results["seeds"])
    spread = " (mean ± std over seeds)" if n_seeds > 1 else " [95 % bootstrap interval]"
    lines = [
        "## Final scores and the 5 % rule",
        "",
        f"Each final score is the metric after the last stage{spread}; the rule compares it with the single-task "
        "baseline by a 95 % hierarchical bootstrap interval of final / baseline (training seeds resampled, then "
        "test images within each seed; paired within a seed): pass above 0.95, fail below, inconclusive across.",
        "",
        "| method | rules | " + " | ".join(f"{t} {s['baselines'][t]['metric']}" for t in tasks) + " | avg |",
        "|" + "---|" * (len(tasks) + 3),
        "| single-task baseline | | " + " | ".join(_pm(s["baselines"][t], n_seeds) for t in tasks) + " | |",
    ]
    if s.get("joint"):
        lines.append("| joint reference | | " + " | ".join(_pm(s["joint"][t], n_seeds) for t in tasks) + " | |")
    for m, r in s["methods"].items():
        cells = []
        for t in tasks:
            f = r["final"][t]
            one = f"{f['mean']:.3f} [{f['interval'][0]:.3f}, {f['interval'][1]:.3f}]"
            cells.append(f"{_pm(f, n_seeds) if n_seeds > 1 else one} {f['five_percent_rule']['verdict']}")
        rules = "yes" if results["within_rules"][m] else "no (extra)"
        lines.append(f"| {m} | {rules} | " + " | ".join(cells) + f" | {r['measures']['average_final']['mean']:.3f} |")
    return lines


def _joint_budget(results: dict[str, Any]) -> list[str]:
    """The joint reference's budget, and whether it bounds every method's mean score on every task."""
    b, s = results.get("joint_budget"), results["summary"]
    if not b or not s.get("joint"):
        return []
    tasks = list(b["batches"])
    per = ", ".join(f"{t} {b['batches'][t]} (its baseline {b['baseline_steps'][t]})" for t in tasks)
    weights = "equal" if b["weights"] is None else ":".join(f"{b['weights'][t]:g}" for t in tasks)
    above = [
        f"{m} on {t} ({r['final'][t]['mean']:.3f} against {s['joint'][t]['mean']:.3f})"
        for m, r in s["methods"].items()
        for t in tasks
        if r["final"][t]["mean"] is not None and r["final"][t]["mean"] > s["joint"][t]["mean"]
    ]
    bound = (
        "It is a reference, not an upper bound: a method scores above it, " + "; ".join(above)
        if above
        else "Its mean is at least every method's on every task here"
    )
    return [
        "",
        f"The joint reference trains every task from the start: the {b['schedule']} schedule, {b['steps']} optimizer "
        f"steps, batches of each task: {per}; loss weights {weights}; learning rate {b['lr']:g}. {bound}.",
    ]


def _drops(results: dict[str, Any], extra_scores: dict[str, dict[str, str]]) -> list[str]:
    """Absolute and relative drops with the paired ratio's interval, then each task's extra scores."""
    s, tasks = results["summary"], results["config"]["tasks"]
    lines = ["", "## Drops against the single-task baseline", ""]
    lines += [
        "Per task: the absolute and relative drop of the mean, the hierarchical interval of final / baseline, "
        "each seed's ratio, and the interval with the seeds held fixed (test images alone) for comparison.",
        "",
    ]
    lines += [
        "| method | " + " | ".join(f"{t} abs / rel / ratio [interval] (per seed; images only)" for t in tasks) + " |"
    ]
    lines += ["|" + "---|" * (len(tasks) + 1)]
    for m, r in s["methods"].items():
        cells = []
        for t in tasks:
            f = r["final"][t]
            rel = "–" if f["drop_relative"] is None else f"{100 * f['drop_relative']:+.1f} %"
            cells.append(f"{f['drop_absolute']:+.3f} / {rel} / {_ratio_cell(f['five_percent_rule'])}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for t in tasks:
        for key, label in extra_scores.get(t, {}).items():
            lines += ["", _extra_line(s, t, key, label)]
    return lines


def _ratio_cell(j: dict[str, Any]) -> str:
    """The rule's interval, the per-seed ratios and the image-only interval, or the verdict alone."""
    if "ratio_lo" not in j:
        return j["verdict"]
    cell = f"[{j['ratio_lo']:.3f}, {j['ratio_hi']:.3f}]"
    extra = []
    if j.get("per_seed_ratios"):
        extra.append(", ".join(_fmt(x) for x in j["per_seed_ratios"]))
    if j.get("images_only"):
        extra.append(f"images only [{j['images_only'][0]:.3f}, {j['images_only'][1]:.3f}]")
    return cell + (f" ({'; '.join(extra)})" if extra else "")


def _transfer(results: dict[str, Any]) -> list[str]:
    s, n_seeds = results["summary"], len(results["seeds"])
    keys = ["average_final", "backward_transfer", "forgetting", "intransigence", "forgetting_normalised"]
    lines = ["", "## Transfer, forgetting and cost", ""]
    lines += ["| method | " + " | ".join(keys) + " | train s | regularizer MB | peak RSS MB |"]
    lines += ["|" + "---|" * (len(keys) + 4)]
    for m, r in s["methods"].items():
        cells = [_pm(r["measures"][k], n_seeds) if k in r["measures"] else "–" for k in keys]
        lines.append(
            f"| {m} | " + " | ".join(cells) + f" | {r['train_seconds']:.0f} | {r['regularizer_bytes'] / 2**20:.1f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} |"
        )
    return [
        *lines,
        "",
        "Backward transfer (Lopez-Paz & Ranzato 2017) and forgetting (Chaudhry et al. 2018) average over the "
        "tasks before the last; intransigence is baseline − score right after a task's own stage; "
        "the normalised forgetting divides each term by the baseline.",
        "",
    ]


def _matrices(results: dict[str, Any]) -> list[str]:
    tasks = results["config"]["tasks"]
    lines = ["## Accuracy matrices R[stage][task]", ""]
    for m, r in results["summary"]["methods"].items():
        lines += [f"**{m}**", "", "| after | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
        for i, row in enumerate(r["R"]):
            lines.append(f"| stage {i + 1} ({tasks[i]}) | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        lines.append("")
    return lines


def _resources(results: dict[str, Any]) -> list[str]:
    res, prov = results["resources"], results["provenance"]
    lines = [
        "## Resources",
        "",
        f"Parameters {res['parameters']:,} (trainable {res['trainable']:,}); neck layers {res['neck_layers']}, "
        f"head learnable layers {res['head_layers']}.",
    ]
    if res.get("latency_ms"):
        lat = res["latency_ms"]
        lines.append(
            f"CPU latency per 512×512 image: {lat['model']:.1f} ms (head {lat['head']:.1f} ms, "
            f"{100 * lat['head'] / lat['model']:.0f} %) on {prov['cpu']} with {prov['threads']} threads."
        )
    return [*lines, "", "Figures: `accuracy_matrices.png`, `scores_across_stages.png`.", ""]


def render_markdown(results: dict[str, Any], extra_scores: dict[str, dict[str, str]] | None = None) -> str:
    """``report.md`` from the JSON-ready results; ``extra_scores`` names, per task, the scalar extras
    worth a line (record key → label, e.g. ``{"det": {"map_50_95": "mAP@[.5:.95]"}}``)."""
    sections = [
        _header(results),
        _final_scores(results),
        _joint_budget(results),
        _drops(results, extra_scores or {}),
        _transfer(results),
        _matrices(results),
        _resources(results),
    ]
    return "\n".join(line for section in sections for line in section)
