"""mIoU, COCO mAP and Top-1 against hand-computed cases, and their bootstrap resamples."""

from __future__ import annotations

import contextlib
import io

import pytest

pytest.importorskip("pycocotools", reason="the one-head metrics need the benchmark extra")
pytest.importorskip("torchmetrics", reason="the one-head metrics need the benchmark extra")
import torch
from pycocotools.coco import COCO

from clreg.onehead.metrics import (
    ClassificationMetric,
    DetectionMetric,
    SegmentationMetric,
    bootstrap,
    paired_ratio,
    resample_counts,
)


def coco(images, anns, cats=(1, 2)) -> COCO:
    c = COCO()
    c.dataset = {
        "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in images],
        "annotations": [
            {"id": k + 1, "image_id": im, "category_id": cat, "bbox": list(b), "area": b[2] * b[3], "iscrowd": crowd}
            for k, (im, cat, b, crowd) in enumerate(anns)
        ],
        "categories": [{"id": i, "name": f"c{i}"} for i in cats],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        c.createIndex()
    return c


def xyxy(b):
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def test_perfect_detections_score_one() -> None:
    anns = [(1, 1, (10, 10, 30, 40), 0), (1, 2, (50, 50, 20, 20), 0), (2, 1, (5, 5, 60, 60), 0)]
    m = DetectionMetric(coco([1, 2], anns))
    for img in (1, 2):
        mine = [a for a in anns if a[0] == img]
        m.update(
            img,
            torch.tensor([xyxy(a[2]) for a in mine], dtype=torch.float64),
            torch.ones(len(mine)),
            [a[1] for a in mine],
        )
    assert m.value() == pytest.approx(1.0) and m.map_50_95() == pytest.approx(1.0)
    assert float(m.scores(torch.ones(1, 2, dtype=torch.float64))) == pytest.approx(1.0)


def test_a_box_shifted_to_a_known_iou() -> None:
    # gt 40×40 at (0, 0); prediction shifted right by 10: IoU = 30·40 / (50·40) = 0.6 → shift 9: 31/49 ≈ 0.633
    m = DetectionMetric(coco([1], [(1, 1, (0, 0, 40, 40), 0)], cats=(1,)))
    m.update(1, torch.tensor([[9.0, 0.0, 49.0, 40.0]]), torch.tensor([0.9]), [1])
    assert m.value() == pytest.approx(1.0)  # matched at IoU 0.5
    assert m.map_50_95() == pytest.approx(0.3)  # thresholds 0.5, 0.55, 0.6 of ten
    ones = torch.ones(1, 1, dtype=torch.float64)
    assert float(m.scores(ones, iou="0.5:0.95")) == pytest.approx(0.3)


def test_crowd_boxes_do_not_count() -> None:
    anns = [(1, 1, (0, 0, 40, 40), 0), (1, 1, (50, 50, 40, 40), 1)]  # the second is a crowd region
    m = DetectionMetric(coco([1], anns, cats=(1,)))
    # a detection on the crowd region is ignored (neither TP nor FP); the real object is found
    m.update(1, torch.tensor([[0.0, 0.0, 40.0, 40.0], [50.0, 50.0, 90.0, 90.0]]), torch.tensor([0.5, 0.9]), [1, 1])
    assert m.value() == pytest.approx(1.0)
    missed = DetectionMetric(coco([1], anns, cats=(1,)))
    missed.update(1, torch.tensor([[50.0, 50.0, 90.0, 90.0]]), torch.tensor([0.9]), [1])
    assert missed.value() == pytest.approx(0.0)  # the crowd box is no object to find


def test_resampled_ap_agrees_with_cocoeval_on_the_full_set() -> None:
    g = torch.Generator().manual_seed(0)
    images = list(range(1, 13))
    anns = []
    for im in images:
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            x, y = torch.randint(0, 60, (2,), generator=g).tolist()
            w, h = torch.randint(10, 40, (2,), generator=g).tolist()
            anns.append((im, int(torch.randint(1, 3, (1,), generator=g)), (x, y, w, h), 0))
    m = DetectionMetric(coco(images, anns))
    for im in images:
        mine = [a for a in anns if a[0] == im]
        boxes = torch.tensor([xyxy(a[2]) for a in mine], dtype=torch.float64)
        boxes += torch.randn(boxes.shape, generator=g, dtype=torch.float64) * 4
        extra = torch.tensor([[0.0, 0.0, 20.0, 20.0]], dtype=torch.float64)  # a false positive
        m.update(im, torch.cat([boxes, extra]), torch.rand(len(mine) + 1, generator=g), [a[1] for a in mine] + [1])
    ones = torch.ones(1, len(images), dtype=torch.float64)
    assert 0.2 < m.value() < 1.0
    assert float(m.scores(ones)) == pytest.approx(m.value(), abs=1e-9)
    assert float(m.scores(ones, iou="0.5:0.95")) == pytest.approx(m.map_50_95(), abs=1e-9)
    ci = bootstrap(m, resamples=300)
    assert ci["lo"] < m.value() < ci["hi"]
    per = m.per_class_ap()
    assert set(per) == {1, 2}


def test_segmentation_known_confusion_and_torchmetrics_agree() -> None:
    target = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 2, 2]]])
    pred = torch.tensor([[[0, 0, 1, 0], [0, 1, 1, 1], [2, 2, 0, 1], [2, 2, 2, 0]]])
    m = SegmentationMetric(num_classes=4)
    m.update(pred, target)
    # class 0: TP 3, FP 2 (one in class 1's area, one in class 2's), FN 1 → 3/6
    # class 1: TP 3, FP 1, FN 1 → 3/5 ; class 2: TP 5, FP 0, FN 1 → 5/6 ; class 3 absent
    iou = m.per_class_iou()
    assert iou[:3] == pytest.approx([0.5, 0.6, 5 / 6]) and iou[3] != iou[3]
    assert m.value() == pytest.approx((0.5 + 0.6 + 5 / 6) / 3)
    assert float(m.scores(torch.ones(1, 1, dtype=torch.float64))) == pytest.approx(m.value())
    perfect = SegmentationMetric(num_classes=4)
    perfect.update(target.clamp(max=3), target)
    assert perfect.value() == pytest.approx(1.0)
    logits = torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    from_logits = SegmentationMetric(num_classes=4)
    from_logits.update(logits, target)
    assert from_logits.per_class_iou()[:3] == pytest.approx([0.5, 0.6, 5 / 6])
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 4\).*found \[0, 7\]"):
        SegmentationMetric(num_classes=4).update(pred, target.masked_fill(target == 2, 7))
    with pytest.raises(ValueError, match="prediction labels must lie"):
        SegmentationMetric(num_classes=4).update(pred - 1, target)


def test_top1_paired_ratio_and_counts() -> None:
    a, b = ClassificationMetric(3), ClassificationMetric(3)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    logits = torch.nn.functional.one_hot(y, 3).float()
    a.update(logits, y)  # all right
    wrong = logits.clone()
    wrong[:2] = wrong[:2].roll(1, dims=1)
    b.update(wrong, y)  # 6 of 8
    assert a.value() == 1.0 and b.value() == 0.75
    r = paired_ratio(b, a, resamples=500)
    assert r["value"] == 0.75 and r["lo"] <= 0.75 <= r["hi"] <= 1.0
    counts = resample_counts(5, 7, seed=1)
    assert counts.shape == (7, 5) and (counts.sum(1) == 5).all()
    with pytest.raises(ValueError, match="same images"):
        c = ClassificationMetric(3)
        c.update(logits[:4], y[:4])
        paired_ratio(c, a)
