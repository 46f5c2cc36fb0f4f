"""Loaders for every accepted layout, on generated and real data; bad data; augmentation; the generator."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("pycocotools", reason="the one-head data needs the benchmark extra")
pytest.importorskip("timm", reason="the one-head data needs the benchmark extra")

import numpy as np
import torch
from PIL import Image

from clreg.onehead.data import (
    ClassificationData,
    Crop,
    DataFormatError,
    DetectionData,
    SegmentationData,
    check_split_overlap,
)
from clreg.onehead.synthetic import SHAPES, STRIPED_WORLD, SyntheticConfig, generate

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
real_data = pytest.mark.skipif(
    not REAL.is_dir() and not os.environ.get("CI"), reason=f"real sample data not found at {REAL}"
)


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return generate(
        SyntheticConfig(train=6, val=3, test=3, size=64, cls_train=10), cache_dir=tmp_path_factory.mktemp("cache")
    )


# -- layouts ---------------------------------------------------------------------------------------


def test_voc_layouts(syn, tmp_path) -> None:
    side = SegmentationData(syn / "mini_voc_seg", "train", size=64)
    pairs = side.pairs
    # layout 2: {split}/JPEGImages + {split}/SegmentationClass
    for img, mask in pairs:
        for sub, f in (("JPEGImages", img), ("SegmentationClass", mask)):
            (tmp_path / "l2" / "train" / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, tmp_path / "l2" / "train" / sub / f.name)
    # layout 3: a VOC root with ImageSets
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp_path / "l3" / sub).mkdir(parents=True, exist_ok=True)
    for img, mask in pairs:
        shutil.copy(img, tmp_path / "l3" / "JPEGImages" / img.name)
        shutil.copy(mask, tmp_path / "l3" / "SegmentationClass" / mask.name)
    (tmp_path / "l3" / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(i.stem for i, _ in pairs))
    for root in (tmp_path / "l2", tmp_path / "l3"):
        ds = SegmentationData(root, "train", size=64)
        assert len(ds) == len(side)
        for k in range(len(ds)):
            assert torch.equal(ds[k][1], side[k][1]) and torch.equal(ds[k][0], side[k][0])


def test_coco_layouts(syn, tmp_path) -> None:
    export = DetectionData(syn / "mini_coco_det", "train", size=64, categories=SHAPES)
    (tmp_path / "annotations").mkdir()
    shutil.copy(syn / "mini_coco_det" / "train" / "labels.json", tmp_path / "annotations" / "instances_train2017.json")
    shutil.copytree(syn / "mini_coco_det" / "train" / "data", tmp_path / "train2017")
    coco = DetectionData(tmp_path, "train", size=64, categories=SHAPES)
    assert len(coco) == len(export) and coco.summary.boxes == export.summary.boxes > 0
    for k in range(len(coco)):
        for key in ("heatmap", "box", "box_weight"):
            assert torch.equal(coco[k][1][key], export[k][1][key])


def test_class_folders_and_manifest(syn) -> None:
    manifest = json.loads((syn / "manifest.json").read_text())
    ds = ClassificationData(syn / "imagenette_160", "train", size=64, classes=manifest["class_names"]["cls"])
    assert len(ds) == 10 and ds.classes == [f"scene_{s}" for s in SHAPES]
    x, y = ds[3]
    assert x.shape == (3, 64, 64) and ds.classes[int(y)] == ds.samples[3][0].parent.name
    assert manifest["class_names"]["seg"][0] == "background" and len(manifest["class_names"]["seg"]) == 21


# -- real data --------------------------------------------------------------------------------------


@real_data
def test_real_data_loads_as_it_is() -> None:
    seg = SegmentationData(REAL / "mini_voc_seg", "train", size=160)
    assert len(seg) == 240
    x, y = seg[0]
    assert x.shape == (3, 160, 160) and set(y.unique().tolist()) <= set(range(21)) | {255}
    det = DetectionData(REAL / "mini_coco_det", "train", size=160)
    # person 718 … bird 42 annotations in train, 22 of them crowd (ignored); other categories ignored
    assert len(det) == 240 and det.summary.boxes + det.summary.crowd_ignored == 1316
    assert det.summary.other_categories_ignored > 0
    grey = next(i for i, im in enumerate(det.images) if im["file_name"] == "000000559665.jpg")
    assert det[grey][0].shape == (3, 160, 160)  # greyscale read as RGB
    val = DetectionData(REAL / "mini_coco_det", "val", size=160)
    raw_val = json.loads((REAL / "mini_coco_det" / "val" / "labels.json").read_text())
    assert val.category_id(0) == next(c["id"] for c in raw_val["categories"] if c["name"] == "person")
    assert det.cat_ids != val.cat_ids  # categories mapped by name: ids are renumbered per split
    with pytest.warns(UserWarning, match="5 detection images appear in both splits"):
        check_split_overlap([i["file_name"] for i in det.images], [i["file_name"] for i in val.images], "detection")
    cls = ClassificationData(REAL / "imagenette_160", "train", size=160)
    assert len(cls) == 240 and len(cls.classes) == 10


# -- bad data ---------------------------------------------------------------------------------------


def test_missing_folder_lists_the_layouts(tmp_path) -> None:
    with pytest.raises(DataFormatError, match=r"accepted layouts:(.|\n)*JPEGImages(.|\n)*does not exist"):
        SegmentationData(tmp_path / "nowhere", "train")
    (tmp_path / "det" / "train").mkdir(parents=True)
    (tmp_path / "det" / "train" / "x.txt").write_text("")
    with pytest.raises(DataFormatError, match=r"labels\.json(.|\n)*found: \['train/'\]"):
        DetectionData(tmp_path / "det", "train")
    with pytest.raises(DataFormatError, match="no classification data"):
        ClassificationData(tmp_path / "empty", "train")


def test_bad_files_are_named(syn, tmp_path) -> None:
    root = tmp_path / "seg"
    shutil.copytree(syn / "mini_voc_seg", root)
    victim = sorted((root / "train").glob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(DataFormatError, match=f"cannot read image .*{victim.name}"):
        SegmentationData(root, "train", size=64)
    root2 = tmp_path / "seg2"
    shutil.copytree(syn / "mini_voc_seg", root2)
    mask = sorted((root2 / "train").glob("*.png"))[0]
    Image.open(mask).resize((32, 32)).save(mask)
    with pytest.raises(DataFormatError, match=f"mask .*{mask.name} is \\(32, 32\\)"):
        SegmentationData(root2, "train", size=64)
    cls = tmp_path / "cls"
    shutil.copytree(syn / "imagenette_160", cls)
    for f in (cls / "train" / "scene_star").iterdir():
        f.unlink()
    with pytest.raises(DataFormatError, match="scene_star holds no images"):
        ClassificationData(cls, "train", size=64)


def _coco_with(tmp_path, syn, edit) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(syn / "mini_coco_det", root)
    f = root / "train" / "labels.json"
    data = json.loads(f.read_text())
    edit(data)
    f.write_text(json.dumps(data))
    return root


def test_coco_bad_annotations(syn, tmp_path) -> None:
    root = _coco_with(
        tmp_path, syn, lambda d: d["images"].append({"id": 999, "file_name": "gone.jpg", "width": 64, "height": 64})
    )
    with pytest.raises(DataFormatError, match=r"names image gone\.jpg"):
        DetectionData(root, "train", size=64, categories=SHAPES)
    shutil.rmtree(root)
    root = _coco_with(
        tmp_path,
        syn,
        lambda d: d["annotations"].append(
            {"id": 9999, "image_id": 777, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0}
        ),
    )
    with pytest.raises(DataFormatError, match="missing image id 777"):
        DetectionData(root, "train", size=64, categories=SHAPES)
    shutil.rmtree(root)

    def degenerate(d):
        d["annotations"].append({"id": 9001, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10], "iscrowd": 0})
        d["annotations"].append({"id": 9002, "image_id": 1, "category_id": 1, "bbox": [200, 200, 10, 10], "iscrowd": 0})
        d["annotations"].append({"id": 9003, "image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 40], "iscrowd": 0})

    root = _coco_with(tmp_path, syn, degenerate)
    with pytest.warns(UserWarning, match="degenerate box"):
        ds = DetectionData(root, "train", size=64, categories=SHAPES)
    assert ds.summary.boxes_degenerate == 2 and ds.summary.boxes_clipped >= 1
    with pytest.raises(DataFormatError, match="degenerate box"):
        DetectionData(root, "train", size=64, categories=SHAPES, strict=True)
    with pytest.raises(DataFormatError, match="none of the categories"):
        DetectionData(root, "train", size=64, categories=["zebra"])


# -- augmentation -----------------------------------------------------------------------------------


def test_crop_and_flip_keep_masks_and_boxes_aligned() -> None:
    img = Image.new("L", (120, 90), 0)
    img.paste(255, (30, 20, 70, 60))  # a box x1=30, y1=20, x2=70, y2=60
    box = torch.tensor([[30.0, 20.0, 70.0, 60.0]])
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(40):
        crop = Crop.random(120, 90, g)
        out = crop.image(img, 64, resample=Image.NEAREST)
        boxes, keep = crop.boxes(box, 64)
        bb = out.getbbox()
        if keep.any() and bb is not None:
            torch.testing.assert_close(boxes[0], torch.tensor(bb, dtype=torch.float32), atol=1.5, rtol=0)
            checked += 1
    assert checked > 10


# -- the generator ----------------------------------------------------------------------------------


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
    from clreg.onehead.synthetic import _pattern

    got = [_pattern(random.Random(seed), 400, family, 20.0).mean() for seed in range(4)]
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


def test_tasks_train_and_evaluate_end_to_end(syn) -> None:
    from clreg.onehead.model import UnifiedOneHead
    from clreg.onehead.tasks import evaluate, make_tasks, train_task

    tasks = make_tasks(syn, "test", size=64)
    assert [t.metric_name for t in tasks.values()] == ["mIoU", "mAP@0.5", "Top-1"]
    torch.manual_seed(0)
    model = UnifiedOneHead(det_classes=10, seg_classes=21, cls_classes=10, width=16)
    for task in tasks.values():
        stats = train_task(model, task, steps=2, batch_size=2)
        assert stats["steps"] == 2
        metric = evaluate(model, task)
        assert metric.n == 3 and 0.0 <= metric.value() <= 1.0


def test_subset_keeps_the_chosen_items(syn) -> None:
    ds = DetectionData(syn / "mini_coco_det", "train", size=64, categories=SHAPES)
    sub = ds.subset([4, 1])
    assert len(sub) == 2 and sub.image_info(0) == ds.image_info(4)
    assert torch.equal(sub[1][1]["heatmap"], ds[1][1]["heatmap"])
    seg = SegmentationData(syn / "mini_voc_seg", "train", size=64).subset([2])
    assert len(seg) == 1 and seg.pairs[0][0].name.endswith("00002.jpg")


def test_evaluation_items_are_computed_once_and_equal_uncached_ones(syn) -> None:
    kinds = [
        (SegmentationData, syn / "mini_voc_seg", {}),
        (DetectionData, syn / "mini_coco_det", {"categories": SHAPES}),
        (ClassificationData, syn / "imagenette_160", {}),
    ]
    for cls, root, kw in kinds:
        cached = cls(root, "val", size=64, **kw)
        plain = cls(root, "val", size=64, cache=False, **kw)
        first, again, fresh = cached[1], cached[1], plain[1]
        assert len(cached._fixed) == 1  # resized (and encoded) once
        assert torch.equal(first[0], fresh[0]) and torch.equal(again[0], fresh[0]) and first[0].dtype == torch.float32
        ta, tb, tc = (t if isinstance(t, dict) else {"y": t} for t in (first[1], again[1], fresh[1]))
        assert ta.keys() == tc.keys() and all(torch.equal(ta[k], tc[k]) and torch.equal(tb[k], tc[k]) for k in ta)
        if isinstance(first[1], dict):
            first[1]["heatmap"] = None  # a caller editing its target dict leaves the cache alone
            assert isinstance(cached[1][1]["heatmap"], torch.Tensor)
    train = SegmentationData(syn / "mini_voc_seg", "train", size=64, train=True)
    train[0]
    assert train._fixed == {}  # augmented items are drawn afresh
