"""The synthetic generator: deterministic, cached by its key, each kind's pattern, colour carrying no class."""

from __future__ import annotations

import json
import math
import random

import pytest

pytest.importorskip("pycocotools", reason="the one-head data needs the benchmark extra")
pytest.importorskip("timm", reason="the one-head data needs the benchmark extra")
import numpy as np
import torch

from clreg.onehead.data import (
    ClassificationData,
    SegmentationData,
)
from clreg.onehead.synthetic import STRIPED_WORLD, SyntheticConfig, generate


def test_generator_is_deterministic_and_cached(tmp_path) -> None:
    cfg = SyntheticConfig(train=3, val=2, test=2, size=64, cls_train=10)
    a = generate(cfg, cache_dir=tmp_path / "a")
    b = generate(cfg, cache_dir=tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    stamp = (a / "manifest.json").stat().st_mtime_ns
    assert generate(cfg, cache_dir=tmp_path / "a") == a and (a / "manifest.json").stat().st_mtime_ns == stamp
    assert generate(SyntheticConfig(train=4, val=2, test=2, size=64), cache_dir=tmp_path / "a") != a
    # disjoint seeds: no image repeats across splits
    tr = {p.read_bytes() for p in (a / "mini_voc_seg" / "train").glob("*.jpg")}
    te = {p.read_bytes() for p in (a / "mini_voc_seg" / "test").glob("*.jpg")}
    assert not tr & te


def test_worlds_keep_their_keys() -> None:
    """The default (pattern) world and the striped one keep the keys their reported runs were made with."""
    assert SyntheticConfig().key() == "v3-6ac595463621"
    assert STRIPED_WORLD.key() == "v3-0b918565b0ed"
    assert SyntheticConfig(fill="random").key() != STRIPED_WORLD.key()
    with pytest.raises(ValueError, match="fill must be"):
        SyntheticConfig(fill="plaid")


@pytest.mark.parametrize(
    ("family", "share"),
    [
        ("stripes", 0.5),
        ("checker", 0.5),
        ("dots", math.pi * 0.3**2),
        ("xhatch", 1 - 0.8**2),
        ("grid", 1 - 0.8**2),
        ("diamonds", 0.5),
        ("zigzag", 0.3),
        ("bricks", 0.2 + 0.8 * 0.1),
        ("speckle", 0.5),
        ("hstripes", 0.5),
    ],
)
def test_pattern_share_of_the_second_colour(family, share) -> None:
    """Each pattern covers its closed-form share of the area (over whole periods, random phase)."""
    from clreg.onehead.synthetic import pattern_mask

    got = [pattern_mask(random.Random(seed), 400, family, 20.0).mean() for seed in range(4)]
    assert sum(got) / len(got) == pytest.approx(share, abs=0.03 if family == "speckle" else 0.01)


def test_pattern_world_fills_each_kind_with_its_pattern(tmp_path) -> None:
    from clreg.onehead.synthetic import PATTERN_FILLS, render

    root = generate(SyntheticConfig(train=3, val=2, test=2, size=64, cls_train=10, fill="pattern"), cache_dir=tmp_path)
    names = json.loads((root / "manifest.json").read_text())["class_names"]["seg"]
    assert names[1:3] == [f"circle_{f}" for f in PATTERN_FILLS] and len(names) == 21
    # one large triangle: its pixels hold exactly two colours, the second on π·0.3² of them (dots)
    img, mask, placed = render(random.Random(3), 200, [2], (0.9, 0.9), fill="pattern")
    assert [p.kind for p in placed] == [2]
    labels = torch.from_numpy(np.array(mask)).reshape(-1)
    label = int(labels[(labels > 0) & (labels < 255)].unique().item())
    assert label in (1 + 2 * 2, 1 + 2 * 2 + 1)  # fine or coarse triangle
    pixels = torch.from_numpy(np.array(img)).reshape(-1, 3)[labels == label]
    colours, counts = pixels.unique(dim=0, return_counts=True)
    assert len(colours) == 2
    assert counts.min().item() / counts.sum().item() == pytest.approx(math.pi * 0.3**2, abs=0.05)


def _histograms(ds) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for i in range(len(ds)):
        x, y = ds[i]
        q = ((x - x.amin()) / (x.amax() - x.amin() + 1e-6) * 3.999).long()  # 4 levels per channel
        idx = q[0] * 16 + q[1] * 4 + q[2]
        feats.append(torch.bincount(idx.flatten(), minlength=64).float() / idx.numel())
        labels.append(int(y))
    return torch.stack(feats), torch.tensor(labels)


def _fit_softmax(x, y, classes, steps=300):
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(((x - mu) / sd) @ w + b, y).backward()
        opt.step()
    return lambda z: (((z - mu) / sd) @ w + b).argmax(1)


def test_colour_alone_predicts_near_chance(tmp_path) -> None:
    """A classifier on per-image colour histograms (classification) and on per-pixel colour
    (segmentation) scores near chance: colour carries no class information."""
    root = generate(SyntheticConfig(train=200, val=2, test=200, size=64, cls_train=400), cache_dir=tmp_path)
    tr = ClassificationData(root / "imagenette_160", "train", size=64)
    te = ClassificationData(root / "imagenette_160", "test", size=64, classes=tr.classes)
    xtr, ytr = _histograms(tr)
    xte, yte = _histograms(te)
    acc = (_fit_softmax(xtr, ytr, 10)(xte) == yte).float().mean().item()
    print(f"colour-histogram Top-1 {acc:.3f}")
    assert acc < 0.2, acc  # chance is 0.1
    from clreg.onehead.metrics import SegmentationMetric

    seg_tr = SegmentationData(root / "mini_voc_seg", "train", size=64)
    seg_te = SegmentationData(root / "mini_voc_seg", "test", size=64)

    def pixels(ds, n):
        xs, ys = zip(*(ds[i] for i in range(n)))
        x = torch.stack(xs).permute(0, 2, 3, 1).reshape(-1, 3)
        y = torch.stack(ys).reshape(-1)
        keep = y != 255
        return torch.cat([x, x**2], 1)[keep], y[keep]

    xp, yp = pixels(seg_tr, 100)
    fg = yp > 0  # only object pixels: which of the 20 shape classes is this colour?
    predict = _fit_softmax(xp[fg], yp[fg] - 1, 20, steps=200)
    xq, yq = pixels(seg_te, 100)
    m = SegmentationMetric(num_classes=21)
    fgq = yq > 0
    m.update((predict(xq[fgq]) + 1)[None, None], yq[fgq][None, None])
    print(f"per-pixel colour mIoU over the object classes {m.value():.3f}")
    assert m.value() < 0.12, m.value()  # chance among 20 classes: about 0.03–0.05
