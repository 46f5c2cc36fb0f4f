"""Dense detection targets and their decoding."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("timm", reason="the one-head benchmark needs the benchmark extra")
import torch
from torchvision.ops import box_iou

from clreg.onehead import (
    DetectionEncoder,
    decode_detections,
)


def test_encode_decode_round_trip_recovers_boxes() -> None:
    enc = DetectionEncoder(num_classes=4, size=128, stride=8)
    boxes = torch.tensor([[10.0, 12.0, 60.0, 50.0], [70.0, 64.0, 120.0, 126.0], [30.0, 80.0, 46.0, 96.0]])
    labels = torch.tensor([0, 3, 1])
    t = enc.encode(boxes, labels)
    assert int(t["num_objects"]) == 3 and t["box_weight"].sum() >= 3
    logits = torch.logit(t["heatmap"].clamp(1e-4, 1 - 1e-4))[None]
    det = decode_detections(logits, t["box"][None], stride=8)[0]
    ious = box_iou(det["boxes"], boxes)
    best = ious.max(0)
    assert (best.values > 0.999).all()
    assert det["labels"][best.indices].tolist() == labels.tolist()
    with pytest.raises(ValueError, match="labels must be in"):
        enc.encode(boxes, torch.tensor([0, 4, 1]))


def test_encoder_targets_by_hand() -> None:
    """Stride 8 on 32 px (a 4×4 grid, cell centres 4, 12, 20, 28): a big box of class 0 and a small
    box of class 1 that share cells; the smaller box owns the shared cells, the heatmap keeps the
    maximum, and a degenerate box counts as an object but writes nothing."""
    enc = DetectionEncoder(num_classes=2, size=32, stride=8)
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 24.0, 24.0], [5.0, 5.0, 5.0, 9.0]])
    t = enc.encode(boxes, torch.tensor([0, 1, 1]))
    assert int(t["num_objects"]) == 3
    # big box: centre (16, 16) → cell (2, 2); σ = max(0.5, 32 / 48) = 2/3 cell; peak 1 at its cell
    sigma = 2 / 3
    expected = math.exp(-((0 - 1.5) ** 2 + (0 - 1.5) ** 2) / (2 * sigma**2))
    assert t["heatmap"][0, 0, 0].item() == pytest.approx(expected, rel=1e-6)
    assert t["heatmap"][0, 2, 2] == 1.0 and t["heatmap"][1, 2, 2] == 1.0
    # small box (area 256) claims the cells whose centres lie inside it: (1..2, 1..2); the big box
    # (area 1024) keeps the rest of its 3×3 neighbourhood around (2, 2)
    small_cells = {(1, 1), (1, 2), (2, 1), (2, 2)}
    big_cells = {(i, j) for i in (1, 2, 3) for j in (1, 2, 3)} - small_cells
    assert {tuple(ij) for ij in t["box_weight"].nonzero().tolist()} == small_cells | big_cells
    for i, j in small_cells:
        cx, cy = 8 * j + 4, 8 * i + 4
        d = torch.tensor([cx - 8.0, cy - 8.0, 24.0 - cx, 24.0 - cy])
        torch.testing.assert_close(t["box"][:, i, j], torch.log(d / 8))
    for i, j in big_cells:
        cx, cy = 8 * j + 4, 8 * i + 4
        d = torch.tensor([cx - 0.0, cy - 0.0, 32.0 - cx, 32.0 - cy])
        torch.testing.assert_close(t["box"][:, i, j], torch.log(d / 8))
    # two boxes of equal area: the first one listed keeps the shared cell
    t = enc.encode(torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 24.0, 24.0]]), torch.tensor([0, 1]))
    torch.testing.assert_close(t["box"][:, 1, 1], torch.log(torch.tensor([12.0, 12.0, 4.0, 4.0]) / 8))
