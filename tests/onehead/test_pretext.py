"""The synthetic pretext and the shipped backbone: its targets, a deterministic recipe, and a shipped
file that is what the recorded recipe makes."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("timm", reason="the one-head benchmark needs the benchmark extra")
import torch

from clreg.onehead import UnifiedOneHead
from clreg.onehead.pretext import (
    PRETEXT_SEED_OFFSET,
    SHIPPED_BACKBONE,
    SHIPPED_RECIPE,
    Recipe,
    early_fingerprint,
    pretext_batch,
    pretrain,
    state_digest,
)
from clreg.onehead.synthetic import SHAPES, render


@pytest.mark.parametrize(("world", "fill"), [("pattern", "pattern"), ("striped", "random")])
def test_pretext_targets_are_the_shape_kind_of_each_pixel(world, fill):
    x, y = pretext_batch(5, 3, size=64, world=world)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.uint8 and y.shape == (3, 64, 64)
    assert set(y.unique().tolist()) <= set(range(len(SHAPES) + 1)) | {255}
    # recompute image 6 by hand from the generator's mask: kind = (class - 1) // 2 + 1
    rng = random.Random(PRETEXT_SEED_OFFSET + 6)
    kinds = [rng.randrange(len(SHAPES)) for _ in range(rng.randint(1, 4))]
    _, mask, placed = render(rng, 64, kinds, (0.2, 0.55), fill=fill)
    m = torch.tensor([[mask.getpixel((c, r)) for c in range(64)] for r in range(64)])
    want = torch.where((m > 0) & (m < 255), (m - 1) // 2 + 1, m)
    assert torch.equal(y[1].long(), want)
    assert {p.kind + 1 for p in placed} <= set(y[1].unique().tolist())
    assert torch.equal(pretext_batch(5, 3, size=64, world=world)[0], x)  # deterministic


def test_pretrain_is_deterministic_and_records_its_recipe(tmp_path):
    recipe = Recipe(images=8, steps=2, batch_size=4, size=64)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    record = pretrain(a, recipe, log=lambda s: None)
    pretrain(b, recipe, log=lambda s: None)
    state = torch.load(a, weights_only=True)
    assert state_digest(state) == state_digest(torch.load(b, weights_only=True))
    saved = json.loads(a.with_suffix(".json").read_text())
    assert saved["recipe"] == record["recipe"] == {**recipe.__dict__}
    assert saved["state_sha256"] == state_digest(state)
    model = UnifiedOneHead(width=16, backbone_weights=a)
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, state[k])
    with pytest.raises(ValueError, match="world must be one of"):
        Recipe(world="plain")


def test_the_shipped_backbone_is_what_its_recorded_recipe_makes():
    """The shipped file holds the state its recipe recorded (SHA-256), and the recipe run here for its
    first steps lands on the recorded fingerprint (a summary that CPUs' last bits do not move)."""
    record = json.loads(SHIPPED_RECIPE.read_text())
    assert state_digest(torch.load(SHIPPED_BACKBONE, weights_only=True)) == record["state_sha256"]
    recipe = Recipe(**record["recipe"])
    assert recipe.world == "pattern" and recipe == Recipe()  # the shipped file is the default recipe's
    got = early_fingerprint(recipe)
    want = record["fingerprint_after_4_steps"]
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(torch.tensor(got[k]), torch.tensor(want[k]), rtol=1e-3, atol=1e-6)
    model = UnifiedOneHead(width=16, backbone_weights=SHIPPED_BACKBONE)
    saved = torch.load(SHIPPED_BACKBONE, weights_only=True)
    torch.testing.assert_close(model.backbone.state_dict()["conv_stem.weight"], saved["conv_stem.weight"])
