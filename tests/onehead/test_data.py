"""Loaders for every accepted layout, on generated and real data; bad data; augmentation."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("pycocotools", reason="the one-head data needs the benchmark extra")
pytest.importorskip("timm", reason="the one-head data needs the benchmark extra")
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
from clreg.onehead.synthetic import SHAPES, SyntheticConfig, generate

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"


real_data = pytest.mark.skipif(
    not REAL.is_dir() and not os.environ.get("CI"), reason=f"real sample data not found at {REAL}"
)


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return generate(
        SyntheticConfig(train=6, val=3, test=3, size=64, cls_train=10), cache_dir=tmp_path_factory.mktemp("cache")
    )


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
