"""Classification data in class folders: ``{split}/<class>/<image>``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .common import IMAGE_SUFFIXES, DataFormatError, ImageData, LoadSummary, layout_error, to_tensor

__all__ = ["CLS_LAYOUTS", "ClassificationData"]

CLS_LAYOUTS = ("{split}/<class>/<image>",)


class ClassificationData(ImageData):
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
            raise layout_error("classification", self.root, split, CLS_LAYOUTS)
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
        return to_tensor(crop.image(img, self.size)), torch.tensor(label)
