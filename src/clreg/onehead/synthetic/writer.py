"""Writing the three task data sets of a :class:`SyntheticConfig` to disk, cached by its key."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

from .config import FILL_NAMES, GENERATOR_VERSION, SyntheticConfig, default_cache_dir
from .layout import render
from .shapes import SHAPES

__all__ = ["SPLIT_SEEDS", "class_names", "generate", "voc_palette"]

SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (256 entries)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def class_names(fill: str = "pattern") -> dict[str, list[str]]:
    """The class names of each task (as in the manifest)."""
    seg = ["background"] + [f"{s}_{f}" for s in SHAPES for f in FILL_NAMES[fill]]
    return {"seg": seg, "det": list(SHAPES), "cls": [f"scene_{s}" for s in SHAPES]}


def _rng(cfg: SyntheticConfig, split: str, task: int) -> random.Random:
    return random.Random(cfg.seed * 1000 + SPLIT_SEEDS[split] * 10 + task)


def _objects(rng: random.Random, cfg: SyntheticConfig) -> list[int]:
    return [rng.randrange(len(SHAPES)) for _ in range(rng.randint(cfg.min_objects, cfg.max_objects))]


def _write_seg(root: Path, cfg: SyntheticConfig, split: str, n: int) -> None:
    d = root / "mini_voc_seg" / split
    d.mkdir(parents=True, exist_ok=True)
    rng = _rng(cfg, split, 1)
    pal = voc_palette()
    for i in range(n):
        kinds = _objects(rng, cfg)
        img, mask, _ = render(rng, cfg.size, kinds, (cfg.min_scale, cfg.max_scale), cfg.background_lines, cfg.fill)
        img.save(d / f"seg_{split}_{i:05d}.jpg", quality=cfg.jpeg_quality)
        mask.putpalette(pal)
        mask.save(d / f"seg_{split}_{i:05d}.png")  # a palette ("P") PNG after putpalette


def _annotation(i: int, image_id: int, kind: int, box: tuple[float, float, float, float]) -> dict:
    x1, y1, x2, y2 = box
    return {
        "id": i,
        "image_id": image_id,
        "category_id": kind + 1,
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "area": (x2 - x1) * (y2 - y1),
        "iscrowd": 0,
    }


def _write_det(root: Path, cfg: SyntheticConfig, split: str, n: int) -> None:
    d = root / "mini_coco_det" / split
    (d / "data").mkdir(parents=True, exist_ok=True)
    rng = _rng(cfg, split, 2)
    images, anns = [], []
    for i in range(n):
        kinds = _objects(rng, cfg)
        img, _, placed = render(rng, cfg.size, kinds, (cfg.min_scale, cfg.max_scale), cfg.background_lines, cfg.fill)
        name = f"det_{split}_{i:05d}.jpg"
        img.save(d / "data" / name, quality=cfg.jpeg_quality)
        images.append({"id": i + 1, "file_name": name, "width": cfg.size, "height": cfg.size})
        anns += [_annotation(len(anns) + 1 + j, i + 1, p.kind, p.box) for j, p in enumerate(placed)]
    cats = [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
    (d / "labels.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def _write_cls(root: Path, cfg: SyntheticConfig, split: str, n: int) -> None:
    rng = _rng(cfg, split, 3)
    names = class_names(cfg.fill)["cls"]
    for i in range(n):
        c = i % len(SHAPES)
        major = rng.randint(2, 3)
        others = [k for k in range(len(SHAPES)) if k != c]
        kinds = [c] * major + [rng.choice(others) for _ in range(rng.randint(0, major - 2))]
        rng.shuffle(kinds)
        scale = (cfg.min_scale * 0.8, cfg.max_scale * 0.75)  # more objects per scene: a little smaller
        img, _, _ = render(rng, cfg.size, kinds, scale, cfg.background_lines, cfg.fill)
        folder = root / "imagenette_160" / split / names[c]
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"cls_{split}_{i:05d}.jpg", quality=cfg.jpeg_quality)


def generate(
    cfg: SyntheticConfig | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = False
) -> Path:
    """Generate (or find in the cache) the three data sets of ``cfg`` (default: the synthetic default);
    returns the data root."""
    cfg = cfg if cfg is not None else SyntheticConfig()
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = base / cfg.key()
    if (root / "manifest.json").is_file():
        return root
    tmp = base / (cfg.key() + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    counts = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    for split, n in counts.items():
        if progress:
            print(f"generating synthetic {split} split ({n} images per task)", flush=True)
        _write_seg(tmp, cfg, split, n)
        _write_det(tmp, cfg, split, n)
        _write_cls(tmp, cfg, split, cfg.cls_train if split == "train" else n)
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "config": asdict(cfg),
        "splits": list(counts),
        "class_names": class_names(cfg.fill),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
