"""The synthetic pretext and the shipped backbone."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("timm", reason="the one-head benchmark needs the benchmark extra")
import torch

from clreg.onehead import UnifiedOneHead
from clreg.onehead.pretext import PRETEXT_SEED_OFFSET, SHIPPED_BACKBONE, pretext_batch, pretrain
from clreg.onehead.synthetic import SHAPES, render


def test_pretext_targets_are_the_shape_kind_of_each_pixel():
    x, y = pretext_batch(5, 3, size=64)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.uint8 and y.shape == (3, 64, 64)
    assert set(y.unique().tolist()) <= set(range(len(SHAPES) + 1)) | {255}
    # recompute image 6 by hand from the generator's mask: kind = (class - 1) // 2 + 1
    rng = random.Random(PRETEXT_SEED_OFFSET + 6)
    kinds = [rng.randrange(len(SHAPES)) for _ in range(rng.randint(1, 4))]
    _, mask, placed = render(rng, 64, kinds, (0.2, 0.55))
    m = torch.tensor([[mask.getpixel((c, r)) for c in range(64)] for r in range(64)])
    want = torch.where((m > 0) & (m < 255), (m - 1) // 2 + 1, m)
    assert torch.equal(y[1].long(), want)
    assert {p.kind + 1 for p in placed} <= set(y[1].unique().tolist())
    assert torch.equal(pretext_batch(5, 3, size=64)[0], x)  # deterministic


def test_pretrain_writes_a_backbone_the_model_loads(tmp_path):
    out = tmp_path / "backbone.pt"
    pretrain(out, images=8, steps=2, batch_size=4, size=64, log=lambda s: None)
    model = UnifiedOneHead(width=16, backbone_weights=out)
    saved = torch.load(out, weights_only=True)
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, saved[k])


def test_the_shipped_backbone_loads():
    assert SHIPPED_BACKBONE.is_file()
    model = UnifiedOneHead(width=16, backbone_weights=SHIPPED_BACKBONE)
    saved = torch.load(SHIPPED_BACKBONE, weights_only=True)
    torch.testing.assert_close(model.backbone.state_dict()["conv_stem.weight"], saved["conv_stem.weight"])
