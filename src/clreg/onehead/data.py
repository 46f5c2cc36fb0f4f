"""Loaders for the challenge's on-disk formats, with augmentation that keeps masks and boxes aligned.

Accepted layouts (``{split}`` is ``train``, ``val`` or ``test``):

* segmentation (VOC: JPEG images, palette PNG masks, 255 = ignore)
    1. ``{split}/<id>.jpg`` beside ``{split}/<id>.png``
    2. ``{split}/JPEGImages/`` and ``{split}/SegmentationClass/``
    3. a VOC root: ``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/Segmentation/{split}.txt``
* detection (COCO instances JSON, read through pycocotools; categories chosen by name)
    1. ``annotations/instances_{split}2017.json`` with images in ``{split}/`` or ``{split}2017/``
    2. ``{split}/labels.json`` with images in ``{split}/data/``
* classification: class folders ``{split}/<class>/<image>``

Every image is read as RGB. Nothing is written under a data root.

Example:
    >>> import tempfile
    >>> from clreg.onehead.synthetic import SyntheticConfig, generate
    >>> from clreg.onehead.data import SegmentationData
    >>> root = generate(SyntheticConfig(train=2, val=1, test=1, size=64), cache_dir=tempfile.mkdtemp())
    >>> ds = SegmentationData(root / "mini_voc_seg", "train", size=64)
    >>> image, mask = ds[0]
    >>> image.shape, mask.shape, mask.dtype
    (torch.Size([3, 64, 64]), torch.Size([64, 64]), torch.int64)
"""

from __future__ import annotations

import abc
import contextlib
import copy
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ..data import stable_seed
from .model import IMAGENET_MEAN, IMAGENET_STD
from .targets import DetectionEncoder

__all__ = [
    "COCO_DEFAULT_CATEGORIES",
    "VOC_CLASSES",
    "ClassificationData",
    "DataFormatError",
    "DetectionData",
    "LoadSummary",
    "SegmentationData",
    "check_split_overlap",
]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
COCO_DEFAULT_CATEGORIES = ("person", "car", "dog", "cat", "chair", "dining table", "book", "bottle", "cup", "bird")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

SEG_LAYOUTS = (
    "{split}/<id>.jpg beside {split}/<id>.png",
    "{split}/JPEGImages/ and {split}/SegmentationClass/",
    "a VOC root: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/{split}.txt",
)
DET_LAYOUTS = (
    "annotations/instances_{split}2017.json with images in {split}/ or {split}2017/",
    "{split}/labels.json with images in {split}/data/",
)
CLS_LAYOUTS = ("{split}/<class>/<image>",)


class DataFormatError(ValueError):
    """Data that cannot be read as one of the accepted layouts, or a bad file (named)."""


def _layout_error(kind: str, root: Path, split: str, layouts: Sequence[str]) -> DataFormatError:
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:12] if root.is_dir() else []
    lines = "\n  ".join(layout.format(split=split) for layout in layouts)
    what = f"found: {found}" if root.is_dir() else "the folder does not exist"
    return DataFormatError(f"no {kind} data for split {split!r} under {root}; accepted layouts:\n  {lines}\n{what}")


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DataFormatError(f"cannot read image {path}: {err}") from err


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as err:
        raise DataFormatError(f"cannot read image {path}: {err}") from err


@dataclass
class LoadSummary:
    """What a loader read and what it skipped."""

    images: int = 0
    boxes: int = 0
    boxes_clipped: int = 0
    boxes_degenerate: int = 0
    crowd_ignored: int = 0
    other_categories_ignored: int = 0
    warnings: list[str] = field(default_factory=list)


# -- shared geometry --------------------------------------------------------------------------------


def _to_tensor(img: Image.Image) -> Tensor:
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.size[1], img.size[0], 3).permute(2, 0, 1).contiguous()


def _mask_tensor(mask: Image.Image) -> Tensor:
    """A label image ("P" or "L") as int64 (H, W)."""
    return torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).view(mask.size[1], mask.size[0]).long()


def normalize(x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """uint8 (3, H, W) → normalised float."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x.float() / 255.0 - m) / s


@dataclass
class Crop:
    """A crop box in source pixels and a horizontal flip, applied to image, mask and boxes alike."""

    x0: float
    y0: float
    w: float
    h: float
    flip: bool = False

    @staticmethod
    def full(w: int, h: int) -> Crop:
        return Crop(0.0, 0.0, float(w), float(h))

    @staticmethod
    def random(w: int, h: int, g: torch.Generator, scale: tuple[float, float] = (0.5, 1.0)) -> Crop:
        area = w * h * (scale[0] + (scale[1] - scale[0]) * float(torch.rand(1, generator=g)))
        ratio = float(torch.exp(torch.empty(1).uniform_(-0.29, 0.29, generator=g)))
        cw, ch = min(w, (area * ratio) ** 0.5), min(h, (area / ratio) ** 0.5)
        x0 = float(torch.rand(1, generator=g)) * (w - cw)
        y0 = float(torch.rand(1, generator=g)) * (h - ch)
        return Crop(x0, y0, cw, ch, bool(torch.rand(1, generator=g) < 0.5))

    def image(self, img: Image.Image, size: int, resample: int = Image.BILINEAR) -> Image.Image:
        out = img.resize((size, size), resample=resample, box=(self.x0, self.y0, self.x0 + self.w, self.y0 + self.h))
        return out.transpose(Image.FLIP_LEFT_RIGHT) if self.flip else out

    def boxes(self, boxes: Tensor, size: int) -> tuple[Tensor, Tensor]:
        """Boxes (N, 4) x1y1x2y2 in source pixels → in output pixels; returns (boxes, kept mask):
        boxes mostly cut away by the crop (< 25 % of their area left, or under 2 px) are dropped."""
        if boxes.numel() == 0:
            return boxes.reshape(0, 4), torch.zeros(0, dtype=torch.bool)
        sx, sy = size / self.w, size / self.h
        x1, y1, x2, y2 = boxes.unbind(1)
        x1, x2 = (x1 - self.x0) * sx, (x2 - self.x0) * sx
        y1, y2 = (y1 - self.y0) * sy, (y2 - self.y0) * sy
        area0 = (x2 - x1) * (y2 - y1)
        x1, y1, x2, y2 = torch.stack([x1, y1, x2, y2]).clamp(0, size)
        w, h = x2 - x1, y2 - y1
        keep = (w * h >= 0.25 * area0) & (w >= 2) & (h >= 2)
        b = torch.stack([size - x2, y1, size - x1, y2] if self.flip else [x1, y1, x2, y2], 1)
        return b[keep], keep


class _Base(Dataset, abc.ABC):
    def __init__(self, size: int, train: bool, seed: int, cache: bool) -> None:
        if size % 32:
            raise ValueError(f"size must be a multiple of 32, got {size}")
        self.size, self.train, self.seed, self.cache = size, train, seed, cache
        self.epoch = 0
        self._images: dict[int, Image.Image] = {}
        self._fixed: dict[int, tuple[Tensor, Any]] = {}  # evaluation transform: index → (uint8 pixels, target)

    def set_epoch(self, epoch: int) -> None:
        """Augmentations are seeded by (seed, epoch, index): repeatable, and new each epoch."""
        self.epoch = epoch

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(stable_seed(self.seed, self.epoch, index))

    def _image(self, index: int, path: Path) -> Image.Image:
        if self.cache and index in self._images:
            return self._images[index]
        img = _open_rgb(path)
        if self.cache:
            self._images[index] = img
        return img

    def _crop(self, index: int, w: int, h: int) -> Crop:
        return Crop.random(w, h, self._generator(index)) if self.train else Crop.full(w, h)

    @abc.abstractmethod
    def _item(self, index: int) -> tuple[Tensor, Any]:
        """(uint8 pixels (3, S, S), target) of one item, each loader's own."""

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        if self.train or not self.cache:
            pixels, target = self._item(index)
        else:  # the evaluation transform is fixed: resize and encode each item once
            if index not in self._fixed:
                self._fixed[index] = self._item(index)
            pixels, target = self._fixed[index]
            if isinstance(target, dict):
                target = dict(target)
        return normalize(pixels), target

    _items_attr = "items"

    def subset(self, indices: Sequence[int]):
        """A copy holding only ``indices`` (in that order), e.g. the first 32 images."""
        out = copy.copy(self)
        items = getattr(self, self._items_attr)
        setattr(out, self._items_attr, [items[i] for i in indices])
        out._images, out._fixed = {}, {}
        if hasattr(out, "_masks"):
            out._masks = {}
        return out


# -- segmentation ------------------------------------------------------------------------------------


def find_segmentation_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of ``split`` in one of the accepted VOC layouts."""
    d = root / split
    if d.is_dir() and any(p.suffix.lower() == ".png" for p in d.iterdir()):
        pairs = []
        for img in sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")):
            mask = img.with_suffix(".png")
            if not mask.is_file():
                raise DataFormatError(f"image {img} has no mask {mask.name} beside it")
            pairs.append((img, mask))
        if pairs:
            return pairs
    if (d / "JPEGImages").is_dir() and (d / "SegmentationClass").is_dir():
        masks = sorted((d / "SegmentationClass").glob("*.png"))
        return [(_find_image(d / "JPEGImages", m.stem), m) for m in masks]
    ids_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if ids_file.is_file() and (root / "JPEGImages").is_dir():
        ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
        return [(_find_image(root / "JPEGImages", i), _existing(root / "SegmentationClass" / f"{i}.png")) for i in ids]
    raise _layout_error("segmentation", root, split, SEG_LAYOUTS)


def _find_image(folder: Path, stem: str) -> Path:
    for suf in (".jpg", ".jpeg", ".png"):
        p = folder / f"{stem}{suf}"
        if p.is_file():
            return p
    raise DataFormatError(f"no image for {stem!r} in {folder}")


def _existing(p: Path) -> Path:
    if not p.is_file():
        raise DataFormatError(f"missing file {p}")
    return p


class SegmentationData(_Base):
    """(normalised image (3, S, S), mask (S, S) int64 with 255 = ignore)."""

    _items_attr = "pairs"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        size: int = 160,
        train: bool = False,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        super().__init__(size, train, seed, cache)
        self.root = Path(root)
        self.pairs = find_segmentation_pairs(self.root, split)
        for img, mask in self.pairs:
            if _image_size(img) != _image_size(mask):
                raise DataFormatError(
                    f"mask {mask} is {_image_size(mask)} but its image {img.name} is {_image_size(img)}"
                )
        self.summary = LoadSummary(images=len(self.pairs))
        self._masks: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def mask(self, index: int) -> Image.Image:
        if index not in self._masks:
            with Image.open(self.pairs[index][1]) as m:
                m.load()
                mask = m if m.mode in ("P", "L") else m.convert("L")
            if not self.cache:
                return mask
            self._masks[index] = mask
        return self._masks[index]

    def original_mask(self, index: int) -> Tensor:
        """The mask at the image's original size (for evaluation there)."""
        return _mask_tensor(self.mask(index))

    def _item(self, index: int) -> tuple[Tensor, Tensor]:
        img = self._image(index, self.pairs[index][0])
        crop = self._crop(index, *img.size)
        return _to_tensor(crop.image(img, self.size)), _mask_tensor(
            crop.image(self.mask(index), self.size, resample=Image.NEAREST)
        )


# -- detection ---------------------------------------------------------------------------------------


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
    raise _layout_error("detection", root, split, DET_LAYOUTS)


class DetectionData(_Base):
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
        from pycocotools.coco import COCO

        self.root = Path(root)
        self.categories = list(categories)
        ann_file, self.image_dir = find_coco_split(self.root, split)
        try:
            raw = json.loads(ann_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DataFormatError(f"cannot read COCO annotations {ann_file}: {err}") from err
        for key in ("images", "annotations", "categories"):
            if key not in raw:
                raise DataFormatError(f"{ann_file} is not a COCO instances file: no {key!r}")
        by_name = {c["name"]: c["id"] for c in raw["categories"]}
        chosen = [n for n in self.categories if n in by_name]
        if not chosen:
            raise DataFormatError(
                f"none of the categories {self.categories} is in {ann_file} (it has e.g. {sorted(by_name)[:10]})"
            )
        missing = [n for n in self.categories if n not in by_name]
        self.summary = LoadSummary()
        if missing:
            self.summary.warnings.append(f"categories not in {ann_file.name}: {missing}")
        self.cat_ids = {n: by_name[n] for n in chosen}  # name → this split's category id
        self.label_of = {by_name[n]: self.categories.index(n) for n in chosen}
        self.encoder = DetectionEncoder(len(self.categories), size, stride)
        self.images = sorted(raw["images"], key=lambda im: im["id"])
        for im in self.images:
            p = self.image_dir / im["file_name"]
            if not p.is_file():
                raise DataFormatError(
                    f"annotation file {ann_file.name} names image {im['file_name']}, missing from {self.image_dir}"
                )
        sizes = {im["id"]: (im["width"], im["height"]) for im in self.images}
        self.boxes: dict[int, list[tuple[list[float], int]]] = {im["id"]: [] for im in self.images}
        kept_anns = []
        for a in raw["annotations"]:
            if a["category_id"] not in self.label_of:
                self.summary.other_categories_ignored += 1
                continue
            kept_anns.append(a)
            if a.get("iscrowd", 0):
                self.summary.crowd_ignored += 1
                continue
            w_img, h_img = sizes.get(a["image_id"], (None, None))
            if w_img is None:
                raise DataFormatError(
                    f"annotation {a['id']} in {ann_file.name} points to a missing image id {a['image_id']}"
                )
            x, y, w, h = a["bbox"]
            x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(w_img), x + w), min(float(h_img), y + h)
            if w <= 0 or h <= 0 or x2 <= x1 or y2 <= y1:
                msg = f"degenerate box {a['bbox']} (annotation {a['id']}, image {a['image_id']}) in {ann_file.name}"
                if strict:
                    raise DataFormatError(msg)
                warnings.warn(msg + ": skipped", stacklevel=2)
                self.summary.boxes_degenerate += 1
                continue
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                self.summary.boxes_clipped += 1
            self.boxes[a["image_id"]].append(([x1, y1, x2, y2], self.label_of[a["category_id"]]))
            self.summary.boxes += 1
        self.summary.images = len(self.images)
        gt = {
            "images": self.images,
            "annotations": kept_anns,
            "categories": [c for c in raw["categories"] if c["id"] in self.label_of],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco_gt = COCO()
            self.coco_gt.dataset = gt
            self.coco_gt.createIndex()

    def __len__(self) -> int:
        return len(self.images)

    def image_info(self, index: int) -> dict[str, Any]:
        return self.images[index]

    def category_id(self, label: int) -> int:
        """This split's COCO category id of a label."""
        return self.cat_ids[self.categories[label]]

    def _item(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        im = self.images[index]
        img = self._image(index, self.image_dir / im["file_name"])
        crop = self._crop(index, *img.size)
        x = _to_tensor(crop.image(img, self.size))
        anns = self.boxes[im["id"]]
        boxes = torch.tensor([b for b, _ in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([c for _, c in anns], dtype=torch.long)
        boxes, keep = crop.boxes(boxes, self.size)
        target = self.encoder.encode(boxes, labels[keep])
        target["image_index"] = torch.tensor(index)
        return x, target


# -- classification ----------------------------------------------------------------------------------


class ClassificationData(_Base):
    """(normalised image (3, S, S), label) from class folders; classes sorted by folder name, or in
    the order ``classes`` gives."""

    _items_attr = "samples"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        size: int = 160,
        train: bool = False,
        seed: int = 0,
        classes: Sequence[str] | None = None,
        cache: bool = True,
    ) -> None:
        super().__init__(size, train, seed, cache)
        self.root = Path(root)
        d = self.root / split
        if not d.is_dir() or not any(p.is_dir() for p in d.iterdir()):
            raise _layout_error("classification", self.root, split, CLS_LAYOUTS)
        folders = sorted(p.name for p in d.iterdir() if p.is_dir())
        self.classes = list(classes) if classes is not None else folders
        unknown = [c for c in folders if c not in self.classes]
        if unknown:
            raise DataFormatError(f"class folders {unknown} under {d} are not among the classes {self.classes}")
        self.samples: list[tuple[Path, int]] = []
        for c in folders:
            files = sorted(p for p in (d / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataFormatError(f"class folder {d / c} holds no images")
            self.samples += [(p, self.classes.index(c)) for p in files]
        self.summary = LoadSummary(images=len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def _item(self, index: int) -> tuple[Tensor, Tensor]:
        path, label = self.samples[index]
        img = self._image(index, path)
        crop = self._crop(index, *img.size)
        return _to_tensor(crop.image(img, self.size)), torch.tensor(label)


def check_split_overlap(a: Sequence[Path | str], b: Sequence[Path | str], what: str) -> list[str]:
    """Names found in both splits; warns when there are any."""
    common = sorted({Path(p).name for p in a} & {Path(p).name for p in b})
    if common:
        warnings.warn(f"{len(common)} {what} images appear in both splits (e.g. {common[:3]})", stacklevel=2)
    return common
