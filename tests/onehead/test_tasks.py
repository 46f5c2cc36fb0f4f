"""The task protocol on generated data: each task trains, evaluates against a hand count, reports
its extras and names; a fourth task is one new class (and its output in the model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("pycocotools", reason="the one-head data needs the benchmark extra")
pytest.importorskip("timm", reason="the one-head data needs the benchmark extra")
import torch

from clreg.onehead.methods import Method
from clreg.onehead.model import UnifiedOneHead, classification_output
from clreg.onehead.protocol import SeedRun, Stage, method_stages
from clreg.onehead.store import UnitStore
from clreg.onehead.synthetic import SHAPES, SyntheticConfig, generate
from clreg.onehead.tasks import ClassificationTask, evaluate, make_tasks
from clreg.onehead.tasks import detection as detection_module
from clreg.onehead.training import RunSettings, train_task


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return generate(
        SyntheticConfig(train=6, val=3, test=3, size=64, cls_train=10), cache_dir=tmp_path_factory.mktemp("cache")
    )


def test_tasks_train_and_evaluate_end_to_end(syn) -> None:
    tasks = make_tasks(syn, "test", size=64)
    assert [t.metric_name for t in tasks.values()] == ["mIoU", "mAP@0.5", "Top-1"]
    torch.manual_seed(0)
    model = UnifiedOneHead(det_classes=10, seg_classes=21, cls_classes=10, width=16)
    for task in tasks.values():
        stats = train_task(model, task, 2, run=RunSettings(batch_size=2, progress=False))
        assert stats["steps"] == 2
        metric = evaluate(model, task)
        assert metric.n == 3 and 0.0 <= metric.value() <= 1.0


def test_each_task_names_its_classes_extras_and_categories(syn) -> None:
    tasks = make_tasks(syn, "test", size=64)
    seg, det, cls = tasks["seg"], tasks["det"], tasks["cls"]
    assert seg.num_classes == 21 and det.class_names == list(SHAPES) and cls.chance == pytest.approx(0.1)
    assert [o.select for o in det.spec.outputs] == ["det.heatmap", "det.box"] and det.spec.per_sample_loss
    assert det.category_map() == {n: i + 1 for i, n in enumerate(SHAPES)}  # the COCO ids of labels.json
    model = UnifiedOneHead(width=16).eval()
    assert set(det.extras(det.evaluate(model))) == {"map_50_95", "per_class_ap"}
    assert set(seg.extras(seg.evaluate(model))["per_class_iou"]) == set(seg.class_names)
    assert det.extra_scores == {"map_50_95": "mAP@[.5:.95]"} and seg.extra_scores == {}


def test_evaluate_scores_top1_as_a_hand_count(syn) -> None:
    task = make_tasks(syn, "test", size=64)["cls"]
    torch.manual_seed(1)
    model = UnifiedOneHead(width=16).eval()
    with torch.no_grad():
        hits = [int(model(x[None])["cls"].argmax(1)) == int(y) for x, y in task.eval_data]
    assert task.evaluate(model).value() == pytest.approx(sum(hits) / len(hits))


class SceneAgainTask(ClassificationTask):
    """A fourth task: the scene again, through an output of its own."""

    name = "scene"


def test_a_fourth_task_is_one_class_and_its_output(syn, tmp_path) -> None:
    """A new task class with a :class:`HeadOutput` of its own runs through the protocol after the
    classification task: its own rows of the head, its own loss, spec, metric and stage."""
    tasks = make_tasks(syn, "test", size=64)
    base = tasks["cls"]
    tasks["scene"] = SceneAgainTask(base.train_data, base.eval_data, base.fit_data, base.class_names)

    def make_model() -> UnifiedOneHead:
        m = UnifiedOneHead(width=16)
        return UnifiedOneHead(width=16, outputs=(*m.default_outputs(), classification_output(10, task="scene")))

    model = make_model()
    assert model.out_channels == 10 + 4 + 21 + 10 + 10 and model(torch.randn(1, 3, 64, 64))["scene"].shape == (1, 10)
    with pytest.raises(ValueError, match="custom outputs"):
        model.config()
    stages = [Stage("cls", 2, 1e-3), Stage("scene", 2, 1e-3)]
    run = SeedRun(make_model, {k: tasks[k] for k in ("cls", "scene")}, stages,
                  RunSettings(batch_size=2, resamples=20, progress=False), UnitStore(tmp_path, 0, lambda s: None))  # fmt: skip
    states = method_stages(run, Method.parse("ewc+lwf"))
    assert set(states[-1].evals) == {"cls", "scene"} and 0.0 <= states[-1].evals["scene"].value <= 1.0
    assert states[-1].reg is not None


def _export_without_manifest(syn: Path, tmp_path: Path, edit_val=None) -> Path:
    """The generated data as a user's export: no manifest, so the data names its own categories."""
    root = tmp_path / "export"
    shutil.copytree(syn, root, ignore=shutil.ignore_patterns("manifest.json"))
    if edit_val is not None:
        labels = root / "mini_coco_det" / "val" / "labels.json"
        labels.write_text(json.dumps(edit_val(json.loads(labels.read_text()))))
    return root


def test_an_export_of_ten_other_categories_uses_its_own_and_says_so(syn, tmp_path) -> None:
    root = _export_without_manifest(syn, tmp_path)
    det = make_tasks(root, "val", size=64)["det"]
    assert det.class_names == list(SHAPES)  # labels.json's ten, in the order of their ids
    assert det.class_source.startswith("the data's own 10 categories") and "'person'" in det.class_source
    named = make_tasks(root, "val", size=64, categories=["star", "ring"])["det"]
    assert named.class_names == ["star", "ring"] and named.class_source == "named by --categories"
    assert make_tasks(syn, "val", size=64)["det"].class_source == "the data's manifest"


def test_a_detection_of_a_category_the_split_lacks_scores_as_nothing(syn, tmp_path, monkeypatch) -> None:
    """A label whose category is absent from the evaluation split (its images have none) matches no
    box: the metric equals that of the other detections alone, where it used to raise KeyError."""

    def drop_star(raw):
        star = next(c["id"] for c in raw["categories"] if c["name"] == "star")
        raw["categories"] = [c for c in raw["categories"] if c["id"] != star]
        raw["annotations"] = [a for a in raw["annotations"] if a["category_id"] != star]
        return raw

    det = make_tasks(_export_without_manifest(syn, tmp_path, drop_star), "val", size=64, categories=SHAPES)["det"]
    assert det.eval_data.category_id(SHAPES.index("star")) is None and "star" not in det.category_map()
    boxes = det.eval_data.boxes

    def decode(heatmap, box, stride):
        """Each image's true boxes at score 0.9, and a 'star' box on top of the first at 0.95."""
        out = []
        for i in range(heatmap.shape[0]):
            true = boxes[det.eval_data.images[decode.first + i]["id"]]
            b = torch.tensor([x for x, _ in true]).reshape(-1, 4) * 64 / 64
            labels = torch.tensor([c for _, c in true])
            star = torch.tensor([SHAPES.index("star")])
            out.append({"boxes": torch.cat([b[:1], b]), "scores": torch.tensor([0.95] + [0.9] * len(b)),
                        "labels": torch.cat([star, labels])})  # fmt: skip
        decode.first += heatmap.shape[0]
        return out

    decode.first = 0
    monkeypatch.setattr(detection_module, "decode_detections", decode)
    metric = det.evaluate(UnifiedOneHead(width=16).eval())
    assert metric.value() == pytest.approx(1.0)  # the true boxes alone; the 'star' one was dropped
    assert "star" not in det.extras(metric)["per_class_ap"]
