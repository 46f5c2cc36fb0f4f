"""The BatchNorm share of forgetting: the statistics swapped exactly, and the share from re-evaluated
final models of a finished run (which trains nothing more)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("timm")

from clreg.onehead.analysis import batchnorm_share, batchnorm_statistics, with_statistics
from clreg.onehead.config import RunRequest, resolve
from clreg.onehead.experiments.workspace import open_workspace
from clreg.onehead.methods import Method
from clreg.onehead.protocol import method_stages


def test_only_the_batchnorm_statistics_are_swapped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm1d(4)))
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: v + 1 for k, v in a.items()}
    swapped = with_statistics(a, b, model)
    stats = {"1.running_mean", "1.running_var", "1.num_batches_tracked", "2.0.running_mean", "2.0.running_var",
             "2.0.num_batches_tracked"}  # fmt: skip
    assert set(batchnorm_statistics(b, model)) == stats
    for k in a:
        assert torch.equal(swapped[k], b[k] if k in stats else a[k]), k


def test_the_share_is_what_the_swapped_statistics_give_back(tiny_run):
    config = resolve(RunRequest(profile="tiny", out=str(tiny_run), quiet=True))
    before = {p.name: p.stat().st_mtime_ns for p in (tiny_run / "state").rglob("*.pt")}
    shares = batchnorm_share(config, ["ewc"])
    assert {p.name: p.stat().st_mtime_ns for p in (tiny_run / "state").rglob("*.pt")} == before  # nothing trained
    ws = open_workspace(config)
    run = ws.seed_run(0)
    states = method_stages(run, Method.parse("ewc", ws.config.settings_for("ewc")))
    for k, task in enumerate(["seg", "det"]):
        got = shares["ewc"]["0"][task]
        assert got["own_stage"] == states[k].evals[task].value and got["final"] == states[-1].evals[task].value
        model = ws.make_model()
        state = dict(states[-1].model)
        for name, m in model.named_modules():  # the statistics of task k's own stage, written out here
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for b in ("running_mean", "running_var", "num_batches_tracked"):
                    state[f"{name}.{b}"] = states[k].model[f"{name}.{b}"]
        model.load_state_dict(state)
        assert got["with_own_statistics"] == pytest.approx(run.evaluate(model, [task])[task].value)
        forgot = got["own_stage"] - got["final"]
        expected = (got["with_own_statistics"] - got["final"]) / forgot if forgot > 0.01 else None
        assert got["share"] == (pytest.approx(expected) if expected is not None else None)


def test_fisher_groups_split_every_entry_once_and_the_output_rows_by_task():
    from clreg.onehead.analysis import fisher_groups, scale_summary
    from clreg.onehead.model import UnifiedOneHead

    model = UnifiedOneHead(width=8)
    fisher = {n: torch.full_like(p, float(i)) for i, (n, p) in enumerate(model.named_parameters())}
    groups = fisher_groups(fisher, model)
    assert sum(v.numel() for v in groups.values()) == sum(p.numel() for p in model.parameters())
    last = model.head[-1]
    for task, rows in model._spans().items():
        n = rows.stop - rows.start
        assert groups[f"head output ({task})"].numel() == n * last.weight[0].numel() + n
    assert groups["neck"].numel() == sum(p.numel() for p in model.neck.parameters())
    assert groups["head hidden"].numel() == sum(p.numel() for p in model.head[0].parameters())
    s = scale_summary(torch.arange(101, dtype=torch.float64))
    assert s == {"mean": 50.0, "median": 50.0, "p99": 99.0}


def test_fisher_scales_read_each_tasks_fisher_where_ewc_consolidates_it(cache_env, tmp_path):
    """Detection's Fisher on the validation images is taken from EWC's stage-2 model with the
    cls rows reset as stage 3 starts; segmentation's from the stage-1 model."""
    from clreg.functional import fisher_diagonal
    from clreg.onehead.analysis import fisher_groups, fisher_scales, scale_summary

    config = resolve(RunRequest(profile="tiny", methods="ewc", out=str(tmp_path / "study"), mode="tune", quiet=True))
    scales = fisher_scales(config, seed=100)
    assert set(scales) == {
        "segmentation (mc)",
        "detection (empirical, training images)",
        "detection (empirical, validation images)",
        "detection (mc likelihood, training images)",
    }
    ws = open_workspace(config)
    run = ws.seed_run(100)
    states = method_stages(run, Method.parse("ewc", ws.config.settings_for("ewc")))
    model = ws.make_model()
    model.load_state_dict(states[1].model)
    ws.tasks["cls"].prepare(model)
    det = ws.tasks["det"]
    fisher = fisher_diagonal(model, det.eval_data, spec=det.spec, seed=101)
    expected = {g: scale_summary(v) for g, v in fisher_groups(fisher, model).items()}
    got = scales["detection (empirical, validation images)"]
    assert set(got) == set(expected)
    for group, summary in expected.items():
        assert got[group] == pytest.approx(summary), group
    assert scales["detection (mc likelihood, training images)"] != scales["detection (empirical, training images)"]


def test_recalibrated_statistics_are_the_mixtures_average():
    """Two tasks whose inputs are constants 1 and 5 per channel: the recalibrated running mean is the
    concatenated batches' mean, 3, whatever the statistics were; the variance that of the mixture."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from clreg.onehead.analysis import recalibrated_batchnorm

    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[1].running_mean.fill_(-7.0)
    tasks = [
        SimpleNamespace(train_data=TensorDataset(torch.full((8, 2), value), torch.zeros(8))) for value in (1.0, 5.0)
    ]
    recalibrated_batchnorm(model, tasks, batch_size=4, steps=3)
    torch.testing.assert_close(model[1].running_mean, torch.full((2,), 3.0))
    torch.testing.assert_close(model[1].running_var, torch.full((2,), 4.0 * 8 / 7))  # unbiased, n = 8
    assert not model.training and model[1].momentum == 0.1
