"""The one-head tasks as a clreg.bench scenario: any stage order, the methods the benchmark's own
protocol does not run (DER, A-GEM, RWalk, L2-SP), a run store that keeps mIoU and mAP, and clear
refusals for the label-reading methods."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("pycocotools")

from clreg.bench import make_scenario, run
from clreg.bench.experiment import run_all
from clreg.bench.stats import StoredMetric, standard_counts
from clreg.bench.store import RunStore
from clreg.bench.summary import summarise
from clreg.onehead.tasks import make_tasks


@pytest.fixture(scope="module")
def scenario(cache_env):
    return make_scenario("onehead", profile="tiny")


def _short(scenario, order=None, steps=2):
    return [dataclasses.replace(s, steps=steps) for s in scenario.stages(order)]


def test_the_stages_follow_the_profile_and_any_order(scenario):
    stages = scenario.stages()
    assert [(s.task, s.steps) for s in stages] == [("seg", 3), ("det", 3), ("cls", 3)]
    reordered = scenario.stages(["cls", "seg", "det"])
    assert [s.task for s in reordered] == ["cls", "seg", "det"]
    model = scenario.make_model(scenario.task_list(reordered))
    assert sorted(model.tasks) == ["cls", "det", "seg"]
    assert scenario.record(scenario.task_list(reordered)) == {
        "scenario": "onehead",
        "tasks": ["cls", "seg", "det"],
        "options": {"profile": "tiny", "data_root": None},
    }


def test_the_tasks_are_the_benchmarks_own_on_each_split(scenario):
    own = make_tasks(scenario.root, eval_split="test", size=scenario.profile.size, seed=0)
    for name, task in scenario.tasks.items():
        assert len(task.data("train")) == len(own[name].train_data)
        assert len(task.data("test")) == len(own[name].eval_data)
        assert task.spec().outputs == own[name].spec.outputs
    x, y = scenario.tasks["seg"].data("train")[0]
    model = scenario.make_model(scenario.task_list(scenario.stages()))
    out = model(x[None])
    per_sample = own["seg"].loss(out, y[None])
    torch.testing.assert_close(scenario.tasks["seg"].loss(out, y[None]), per_sample.float().mean())
    with pytest.raises(ValueError, match="val or test"):
        scenario.tasks["cls"].evaluate(model, "train")


def test_the_methods_the_benchmarks_protocol_does_not_run(scenario):
    stages = _short(scenario, ["det", "seg", "cls"])
    for method in ("der", "agem", "rwalk", "l2sp"):
        result = run(scenario, method, stages, seed=0, split="val", settings=scenario.defaults)
        assert result.tasks == ["det", "seg", "cls"]
        assert len(result.matrix) == 3 and all(len(row) == 3 for row in result.matrix)
        assert all(0.0 <= v <= 1.0 for row in result.matrix for v in row)
    assert "der" in scenario.methods and "agem" in scenario.methods
    assert not {"derpp", "er_ace"} & set(scenario.methods)
    for method in ("derpp", "er_ace"):
        with pytest.raises(ValueError, match="several outputs"):
            run(scenario, method, stages, seed=0, split="val", settings=scenario.defaults)


def test_a_stored_run_reads_back_its_miou_and_map(scenario, tmp_path):
    stages = _short(scenario, steps=1)
    store = RunStore(tmp_path)
    first = run_all(scenario, ["naive"], [0], split="val", stages=stages, store=store, progress=None)
    again = run_all(scenario, ["naive"], [0], split="val", stages=stages, store=store, progress=None)
    trained, stored = first["naive"][0], again["naive"][0]
    assert stored.matrix == trained.matrix
    for live, back in zip(trained.final, stored.final, strict=True):
        assert isinstance(back, StoredMetric) and back.n == live.n and back.image_ids() == live.image_ids()
        counts = standard_counts(live.n)
        torch.testing.assert_close(back.scores(counts), live.scores(counts).to(torch.float64))
    assert summarise(first) == summarise(again)
