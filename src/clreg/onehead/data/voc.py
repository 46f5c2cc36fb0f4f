"""Segmentation data in the VOC format: JPEG images and palette PNG masks, 255 = ignore.

Accepted layouts (``{split}`` is ``train``, ``val`` or ``test``): ``{split}/<id>.jpg`` beside
``{split}/<id>.png``; ``{split}/JPEGImages/`` and ``{split}/SegmentationClass/``; or a VOC root with
``JPEGImages/``, ``SegmentationClass/`` and ``ImageSets/Segmentation/{split}.txt``.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from torch import Tensor

from .common import DataFormatError, ImageData, LoadSummary, image_size, layout_error, mask_tensor, to_tensor

__all__ = ["SEG_LAYOUTS", "VOC_CLASSES", "SegmentationData", "find_segmentation_pairs"]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
SEG_LAYOUTS = (
    "{split}/<id>.jpg beside {split}/<id>.png",
    "{split}/JPEGImages/ and {split}/SegmentationClass/",
    "a VOC root: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/{split}.txt",
)


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
    raise layout_error("segmentation", root, split, SEG_LAYOUTS)


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


class SegmentationData(ImageData):
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
            if image_size(img) != image_size(mask):
                raise DataFormatError(
                    f"mask {mask} is {image_size(mask)} but its image {img.name} is {image_size(img)}"
                )
        self.summary = LoadSummary(images=len(self.pairs))
        self._masks: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def _reset_caches(self) -> None:
        super()._reset_caches()
        self._masks = {}

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
        return mask_tensor(self.mask(index))

    def _item(self, index: int) -> tuple[Tensor, Tensor]:
        img = self._image(index, self.pairs[index][0])
        crop = self._crop(index, *img.size)
        return to_tensor(crop.image(img, self.size)), mask_tensor(
            crop.image(self.mask(index), self.size, resample=Image.NEAREST)
        )
