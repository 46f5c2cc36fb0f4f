"""Any stage order: ``--stages`` reorders (or picks) the tasks; each task keeps its own budget and
learning rates, the model carries the outputs of the run's tasks, and its checkpoint records them so
``evaluate`` reads a model of any order."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("timm")
pytest.importorskip("pycocotools")

from clreg.onehead import UnifiedOneHead
from clreg.onehead.cli import main
from clreg.onehead.config import RunRequest, resolve
from clreg.onehead.model import load_checkpoint


def test_a_task_keeps_its_budget_and_learning_rates_in_any_order():
    """The scratch profile's per-task values (seg 1100 steps at 1e-2 with 100 warmup, det 1600 at
    1.2e-2 with 100, cls 1700 at 8e-3 with 300) follow their tasks."""
    cfg = resolve(RunRequest(profile="scratch", stages=("cls", "seg")))
    assert cfg.tasks == ("cls", "seg") and cfg.steps == (1700, 1100)
    record = cfg.record()
    assert record["tasks"] == ["cls", "seg"] and record["steps"] == [1700, 1100]
    assert record["stage_lr"] == [8e-3, 1e-2] and record["stage_warmup"] == [300, 100]
    assert resolve(RunRequest(profile="scratch")).tasks == ("seg", "det", "cls")


@pytest.mark.parametrize("bad", [("seg", "seg"), ("seg", "depth"), ()])
def test_a_bad_order_is_refused(bad):
    with pytest.raises(ValueError, match="--stages names each of seg, det, cls at most once"):
        resolve(RunRequest(profile="tiny", stages=bad))


def test_the_model_carries_the_runs_tasks_in_one_head_order():
    both = UnifiedOneHead(width=8, tasks=("cls", "det"))
    assert both.tasks == ("det", "cls") and both.out_channels == 10 + 4 + 10
    assert both.config()["tasks"] == ["det", "cls"] and "tasks" not in UnifiedOneHead(width=8).config()
    assert UnifiedOneHead(width=8, tasks=("cls", "seg", "det")).out_channels == UnifiedOneHead(width=8).out_channels
    with pytest.raises(ValueError, match="at most once"):
        UnifiedOneHead(width=8, tasks=("det", "depth"))
    with pytest.raises(TypeError, match="sequence of task names"):
        UnifiedOneHead(width=8, tasks="det")


def _data_root(out: Path) -> Path:
    key = json.loads((out / "results.json").read_text())["config"]["data"]["synthetic"]["key"]
    return Path(os.environ["XDG_CACHE_HOME"]) / "clreg" / "synthetic" / key


def _scores(capsys) -> dict[str, float]:
    words = capsys.readouterr().out.split()
    return dict(zip(words[::2], map(float, words[1::2])))


@pytest.mark.parametrize("order", [("det", "seg", "cls"), ("cls", "det")])
def test_the_tiny_profile_runs_in_another_order_and_its_models_evaluate(order, cache_env, tmp_path, capsys):
    out = tmp_path / "-".join(order)
    assert main(["--profile", "tiny", "--stages", ",".join(order), "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["tasks"] == list(order)
    methods = res["summary"]["methods"]
    for m in ("naive", "ewc"):
        assert len(methods[m]["R"]) == len(order) and all(len(row) == len(order) for row in methods[m]["R"])
    # stage 1 is the first task's baseline and is shared by every method
    first = order[0]
    assert methods["naive"]["R"][0] == methods["ewc"]["R"][0]
    assert methods["naive"]["R"][0][0] == pytest.approx(res["summary"]["baselines"][first]["per_seed"][0])
    model, meta = load_checkpoint(out / "models" / "ewc.pt")
    assert set(model.tasks) == set(order) and meta["extra"]["stages"] == list(order)
    assert main(["evaluate", "--checkpoint", str(out / "models" / "ewc.pt"), "--data-root", str(_data_root(out)),
                 "--split", "test"]) == 0  # fmt: skip
    got = _scores(capsys)
    final = methods["ewc"]["final"]
    names = {"seg": "mIoU", "det": "mAP@0.5", "cls": "Top-1"}
    assert {names[t] for t in order} <= set(got)
    for t in order:
        assert got[names[t]] == pytest.approx(final[t]["mean"], abs=1e-4)
    if "seg" not in order:
        code = main(["evaluate", "--checkpoint", str(out / "models" / "ewc.pt"), "--data-root",
                     str(_data_root(out)), "--tasks", "seg"])  # fmt: skip
        assert code == 2 and "has no output for ['seg']" in capsys.readouterr().err
