r"""Analyses of a run's saved units: how much of each method's forgetting its BatchNorm running
statistics carry, and on what scale each task's Fisher lies, parameter group by group.

BatchNorm share: the final model of a method is re-evaluated with the running statistics (each
BatchNorm's ``running_mean``, ``running_var`` and ``num_batches_tracked``) of the model at the end of
task k's own stage swapped in, every parameter kept. With :math:`R_{k,k}` the score right after task
k's stage, :math:`R_{T,k}` the final one and :math:`S_k` the final model's score with stage k's
statistics,

.. math:: \text{share}_k = \frac{S_k - R_{T,k}}{R_{k,k} - R_{T,k}},

the part of task k's forgetting that the statistics alone give back (1: all of it; 0: none; only
where the forgetting :math:`R_{k,k} - R_{T,k}` exceeds 0.01).

BatchNorm recalibrated: a model's running statistics estimated afresh, as the cumulative average over
``steps`` forward passes in training mode (no gradient) of one batch of every task concatenated, the
way the joint reference's ``equal`` schedule feeds them; the rest of the model untouched. A schedule
that changes the tasks' mixture from step to step (``balanced``) leaves statistics of a mixture that
no evaluation sees; recalibrated ones measure what that costs.

Fisher scales: the Fisher EWC consolidates for each earlier task (segmentation's on the stage-1
model, detection's on the method's stage-2 model), summarised per parameter group — the backbone, the
neck, the head's hidden layer and each task's rows of the head's output layer — by its mean, median
and 99th percentile; detection's also on the validation images and from its likelihood (``mc``: the
heatmap's Bernoullis and the boxes' unit Gaussian weighted by objectness) instead of the empirical
Fisher of its loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..functional import fisher_diagonal
from .config import BenchmarkConfig
from .experiments.workspace import Workspace, open_workspace
from .methods import Method
from .protocol import SeedRun, method_stages

__all__ = [
    "batchnorm_share",
    "batchnorm_statistics",
    "fisher_groups",
    "fisher_scales",
    "recalibrated_batchnorm",
    "scale_summary",
    "with_statistics",
]

_MIN_FORGETTING = 0.01


def batchnorm_statistics(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The entries of a model's ``state_dict`` that are BatchNorm running statistics."""
    keys = {
        f"{name}.{b}" if name else b
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b, _ in m.named_buffers(recurse=False)
    }
    return {k: v for k, v in state.items() if k in keys}


def with_statistics(final: dict[str, Any], source: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``final``'s state with ``source``'s BatchNorm running statistics."""
    return {**final, **batchnorm_statistics(source, model)}


def _seed_shares(ws: Workspace, run: SeedRun, method: Method) -> dict[str, Any]:
    states = method_stages(run, method)  # every unit is read back: a finished run trains nothing here
    tasks = [s.task for s in run.stages]
    out: dict[str, Any] = {}
    model = ws.make_model()
    for k, task in enumerate(tasks[:-1]):
        own, final = states[k].evals[task].value, states[-1].evals[task].value
        model.load_state_dict(with_statistics(states[-1].model, states[k].model, model))
        swapped = run.evaluate(model.to(run.run.device), [task])[task].value
        forgot = own - final
        share = (swapped - final) / forgot if forgot > _MIN_FORGETTING else None
        out[task] = {"own_stage": own, "final": final, "with_own_statistics": swapped, "share": share}
    return out


def batchnorm_share(config: BenchmarkConfig, methods: Sequence[str] | None = None) -> dict[str, Any]:
    """Per method, seed and earlier task: the scores right after the task's stage, at the end, and at
    the end with that stage's BatchNorm statistics, and the share of the forgetting they give back
    (see the module). ``config`` names a finished run (the same flags); its units are read back."""
    ws = open_workspace(config)
    out: dict[str, Any] = {}
    for name in methods or ws.config.methods:
        method = Method.parse(name, ws.config.settings_for(name))
        out[name] = {str(seed): _seed_shares(ws, ws.seed_run(seed), method) for seed in ws.config.seeds}
    return out


def fisher_groups(fisher: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A one-head model's Fisher entries by parameter group: ``backbone``, ``neck``, ``head hidden``
    and ``head output (<task>)`` (each task's rows of the head's last layer)."""
    last = f"head.{len(model.head) - 1}."
    groups: dict[str, list[Tensor]] = {"backbone": [], "neck": [], "head hidden": []}
    for name, f in fisher.items():
        if name.startswith(last):
            for task, rows in model._spans().items():
                groups.setdefault(f"head output ({task})", []).append(f[rows].flatten())
        elif name.startswith("head."):
            groups["head hidden"].append(f.flatten())
        else:
            groups["neck" if name.startswith("neck.") else "backbone"].append(f.flatten())
    return {g: torch.cat(v).double() for g, v in groups.items() if v}


def scale_summary(values: Tensor) -> dict[str, float]:
    """Mean, median and 99th percentile of a group's Fisher entries."""
    q = torch.quantile(values, torch.tensor([0.5, 0.99], dtype=values.dtype))
    return {"mean": float(values.mean()), "median": float(q[0]), "p99": float(q[1])}


def _fisher_summary(model: nn.Module, data: Any, spec: Any, estimator: str | None, seed: int) -> dict[str, Any]:
    fisher = fisher_diagonal(model, data, spec=spec, estimator=estimator, seed=seed)
    return {g: scale_summary(v) for g, v in fisher_groups(fisher, model).items()}


def fisher_scales(config: BenchmarkConfig, seed: int, method: str = "ewc") -> dict[str, Any]:
    """Per Fisher variant, each parameter group's scale (see the module) for ``method``'s run of
    ``seed`` (its missing units are trained, as a run would). ``config`` should read the validation
    split (``mode="tune"``), whose images the validation variant uses."""
    ws = open_workspace(config)
    run = ws.seed_run(seed)
    states = method_stages(run, Method.parse(method, ws.config.settings_for(method)))
    seg, det = (run.tasks[s.task] for s in run.stages[:2])
    model = ws.make_model()
    model.load_state_dict(states[0].model)
    run.tasks[run.stages[1].task].prepare(model)
    out = {"segmentation (mc)": _fisher_summary(model, seg.fit_data, seg.spec, None, seed)}
    model.load_state_dict(states[1].model)
    run.tasks[run.stages[2].task].prepare(model)
    likelihood = replace(det.spec, per_sample_loss=None)
    out["detection (empirical, training images)"] = _fisher_summary(model, det.fit_data, det.spec, None, seed + 1)
    out["detection (empirical, validation images)"] = _fisher_summary(model, det.eval_data, det.spec, None, seed + 1)
    out["detection (mc likelihood, training images)"] = _fisher_summary(model, det.fit_data, likelihood, "mc", seed + 1)
    return out


def recalibrated_batchnorm(model: nn.Module, tasks: Sequence[Any], batch_size: int, steps: int, seed: int = 0) -> None:
    """Re-estimate ``model``'s BatchNorm running statistics in place: reset, then the cumulative
    average over ``steps`` training-mode forward passes (no gradient) of one batch of every task in
    ``tasks`` concatenated (their ``train_data``); the model is left in eval mode."""
    from .training import batches

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    device = next(model.parameters()).device
    streams = [batches(t.train_data, batch_size, seed + k) for k, t in enumerate(tasks)]
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.cat([next(s)[0] for s in streams]).to(device))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()
