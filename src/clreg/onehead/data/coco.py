"""Detection data in the COCO instances format, read through pycocotools, categories chosen by name.

Accepted layouts: ``annotations/instances_{split}2017.json`` with images in ``{split}/`` or
``{split}2017/``; or ``{split}/labels.json`` with images in ``{split}/data/``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..targets import DetectionEncoder
from .common import DataFormatError, ImageData, LoadSummary, layout_error, to_tensor

__all__ = ["COCO_DEFAULT_CATEGORIES", "DET_LAYOUTS", "DetectionData", "choose_categories", "find_coco_split"]

COCO_DEFAULT_CATEGORIES = ("person", "car", "dog", "cat", "chair", "dining table", "book", "bottle", "cup", "bird")
DET_LAYOUTS = (
    "annotations/instances_{split}2017.json with images in {split}/ or {split}2017/",
    "{split}/labels.json with images in {split}/data/",
)


def find_coco_split(root: Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of ``split`` in one of the accepted COCO layouts."""
    ann = root / "annotations" / f"instances_{split}2017.json"
    if ann.is_file():
        for d in (root / split, root / f"{split}2017"):
            if d.is_dir():
                return ann, d
        raise DataFormatError(f"{ann} found but no image folder {root / split} or {root / (split + '2017')}")
    ann = root / split / "labels.json"
    if ann.is_file():
        if not (root / split / "data").is_dir():
            raise DataFormatError(f"{ann} found but no image folder {root / split / 'data'}")
        return ann, root / split / "data"
    raise layout_error("detection", root, split, DET_LAYOUTS)


def choose_categories(root: Path, split: str = "train") -> tuple[list[str], str]:
    """The detection categories of a data root that names none (no ``--categories``, no manifest), and
    why: the default ten when ``split`` has them all; else the data's own categories when it names
    exactly ten (in the order of their ids); else the defaults it has, the others named as missing."""
    ann_file, _ = find_coco_split(root, split)
    cats = sorted(_read_instances(ann_file)["categories"], key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    missing = [n for n in COCO_DEFAULT_CATEGORIES if n not in names]
    if not missing:
        return list(COCO_DEFAULT_CATEGORIES), "the default categories"
    if len(names) == len(COCO_DEFAULT_CATEGORIES):
        return names, f"the data's own {len(names)} categories ({ann_file.name} lacks the default {missing})"
    return list(COCO_DEFAULT_CATEGORIES), f"the default categories ({ann_file.name} lacks {missing}: pass --categories)"


class DetectionData(ImageData):
    """(normalised image (3, S, S), dense target dict) with COCO annotations of chosen categories.

    Categories are chosen by name (``categories``; ids differ between exports) and mapped to labels
    0..K−1 in that order; others are ignored, as are crowd annotations. ``coco_gt`` holds the original
    annotations of the chosen categories at the original image sizes, for :class:`DetectionMetric`.
    A degenerate box (non-positive size or wholly outside its image) is skipped with a warning
    (``strict=True``: an error); one that overhangs the border is clipped.
    """

    _items_attr = "images"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        size: int = 160,
        categories: Sequence[str] = COCO_DEFAULT_CATEGORIES,
        train: bool = False,
        seed: int = 0,
        strict: bool = False,
        cache: bool = True,
        stride: int = 8,
    ) -> None:
        super().__init__(size, train, seed, cache)
        self.root = Path(root)
        self.categories = list(categories)
        ann_file, self.image_dir = find_coco_split(self.root, split)
        raw = _read_instances(ann_file)
        self.summary = LoadSummary()
        self._choose_categories(raw["categories"], ann_file)
        self.encoder = DetectionEncoder(len(self.categories), size, stride)
        self.images = sorted(raw["images"], key=lambda im: im["id"])
        self._check_images(ann_file)
        kept = self._read_boxes(raw["annotations"], ann_file.name, strict)
        self.summary.images = len(self.images)
        self.coco_gt = _coco_index(self.images, kept, [c for c in raw["categories"] if c["id"] in self.label_of])

    def _choose_categories(self, cats: list[dict[str, Any]], ann_file: Path) -> None:
        """This split's category ids of the chosen names, and the label of each."""
        by_name = {c["name"]: c["id"] for c in cats}
        chosen = [n for n in self.categories if n in by_name]
        if not chosen:
            raise DataFormatError(
                f"none of the categories {self.categories} is in {ann_file} (it has e.g. {sorted(by_name)[:10]})"
            )
        missing = [n for n in self.categories if n not in by_name]
        if missing:
            self.summary.warnings.append(f"categories not in {ann_file.name}: {missing}")
        self.cat_ids = {n: by_name[n] for n in chosen}  # name → this split's category id
        self.label_of = {by_name[n]: self.categories.index(n) for n in chosen}

    def _check_images(self, ann_file: Path) -> None:
        for im in self.images:
            if not (self.image_dir / im["file_name"]).is_file():
                raise DataFormatError(
                    f"annotation file {ann_file.name} names image {im['file_name']}, missing from {self.image_dir}"
                )

    def _read_boxes(self, anns: list[dict[str, Any]], ann_name: str, strict: bool) -> list[dict[str, Any]]:
        """Each image's boxes (clipped to it) and labels; returns the chosen categories' annotations
        (crowd included) for COCOeval."""
        sizes = {im["id"]: (im["width"], im["height"]) for im in self.images}
        self.boxes: dict[int, list[tuple[list[float], int]]] = {im["id"]: [] for im in self.images}
        kept = []
        for a in anns:
            if a["category_id"] not in self.label_of:
                self.summary.other_categories_ignored += 1
                continue
            kept.append(a)
            if a.get("iscrowd", 0):
                self.summary.crowd_ignored += 1
                continue
            if a["image_id"] not in sizes:
                raise DataFormatError(
                    f"annotation {a['id']} in {ann_name} points to a missing image id {a['image_id']}"
                )
            box = self._clipped(a, sizes[a["image_id"]], ann_name, strict)
            if box is not None:
                self.boxes[a["image_id"]].append((box, self.label_of[a["category_id"]]))
                self.summary.boxes += 1
        return kept

    def _clipped(self, a: dict[str, Any], size: tuple[int, int], ann_name: str, strict: bool) -> list[float] | None:
        """The box x1, y1, x2, y2 clipped to its image; ``None`` (with a warning) when degenerate."""
        x, y, w, h = a["bbox"]
        x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(size[0]), x + w), min(float(size[1]), y + h)
        if w <= 0 or h <= 0 or x2 <= x1 or y2 <= y1:
            msg = f"degenerate box {a['bbox']} (annotation {a['id']}, image {a['image_id']}) in {ann_name}"
            if strict:
                raise DataFormatError(msg)
            warnings.warn(msg + ": skipped", stacklevel=4)
            self.summary.boxes_degenerate += 1
            return None
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            self.summary.boxes_clipped += 1
        return [x1, y1, x2, y2]

    def __len__(self) -> int:
        return len(self.images)

    def image_info(self, index: int) -> dict[str, Any]:
        return self.images[index]

    def category_id(self, label: int) -> int | None:
        """This split's COCO category id of a label; ``None`` when this split lacks the category."""
        return self.cat_ids.get(self.categories[label])

    def _item(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        im = self.images[index]
        img = self._image(index, self.image_dir / im["file_name"])
        crop = self._crop(index, *img.size)
        x = to_tensor(crop.image(img, self.size))
        anns = self.boxes[im["id"]]
        boxes = torch.tensor([b for b, _ in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([c for _, c in anns], dtype=torch.long)
        boxes, keep = crop.boxes(boxes, self.size)
        target = self.encoder.encode(boxes, labels[keep])
        target["image_index"] = torch.tensor(index)
        return x, target


def _read_instances(ann_file: Path) -> dict[str, Any]:
    """A COCO instances file's content, its three lists checked."""
    try:
        raw = json.loads(ann_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataFormatError(f"cannot read COCO annotations {ann_file}: {err}") from err
    for key in ("images", "annotations", "categories"):
        if key not in raw:
            raise DataFormatError(f"{ann_file} is not a COCO instances file: no {key!r}")
    return raw


def _coco_index(images: list[dict], anns: list[dict], cats: list[dict]) -> Any:
    """A pycocotools ``COCO`` over these annotations (built quietly)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns, "categories": cats}
        coco.createIndex()
    return coco
