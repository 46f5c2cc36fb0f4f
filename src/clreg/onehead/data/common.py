"""What every loader shares: the layout error, image reading, the crop-and-flip augmentation that keeps
masks and boxes aligned, the loaders' base class and the split-overlap check."""

from __future__ import annotations

import abc
import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ...data import stable_seed
from ..model import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGE_SUFFIXES", "Crop", "DataFormatError", "LoadSummary", "check_split_overlap", "normalize"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataFormatError(ValueError):
    """Data that cannot be read as one of the accepted layouts, or a bad file (named)."""


def layout_error(kind: str, root: Path, split: str, layouts: Sequence[str]) -> DataFormatError:
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:12] if root.is_dir() else []
    lines = "\n  ".join(layout.format(split=split) for layout in layouts)
    what = f"found: {found}" if root.is_dir() else "the folder does not exist"
    return DataFormatError(f"no {kind} data for split {split!r} under {root}; accepted layouts:\n  {lines}\n{what}")


def open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DataFormatError(f"cannot read image {path}: {err}") from err


def image_size(path: Path) -> tuple[int, int]:
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


def to_tensor(img: Image.Image) -> Tensor:
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.size[1], img.size[0], 3).permute(2, 0, 1).contiguous()


def mask_tensor(mask: Image.Image) -> Tensor:
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


class ImageData(Dataset, abc.ABC):
    """The base of the loaders: a fixed input size, seeded augmentation on training sets, cached images
    and, on evaluation sets, each item's fixed transform computed once."""

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
        img = open_rgb(path)
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
        out._reset_caches()
        return out

    def _reset_caches(self) -> None:
        self._images, self._fixed = {}, {}


def check_split_overlap(a: Sequence[Path | str], b: Sequence[Path | str], what: str) -> list[str]:
    """Names found in both splits; warns when there are any."""
    common = sorted({Path(p).name for p in a} & {Path(p).name for p in b})
    if common:
        warnings.warn(f"{len(common)} {what} images appear in both splits (e.g. {common[:3]})", stacklevel=2)
    return common
