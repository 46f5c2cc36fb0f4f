"""A scene: objects placed with limited overlap on a background, their mask and visible boxes."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageFilter

from .fills import background, pattern_fill, striped_texture
from .shapes import SHAPES, shape_mask

__all__ = ["Placed", "render"]

Box = tuple[float, float, float, float]


@dataclass
class Placed:
    kind: int
    second_fill: bool  # striped (fill="random") or coarse (fill="pattern")
    box: Box


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _place(rng: random.Random, size: int, scale: tuple[float, float], placed: list[Placed]) -> tuple[int, int, int]:
    """(side, x, y) of a new object: rejection sampling limits the overlap with what is already there."""
    for _ in range(20):
        s = max(8, int(rng.uniform(*scale) * size))
        x, y = rng.randint(0, size - s), rng.randint(0, size - s)
        if all(_iou((x, y, x + s, y + s), p.box) < 0.25 for p in placed):
            break
    return s, x, y


def _visible_boxes(placed: list[tuple[Placed, Image.Image]], size: int) -> list[Placed]:
    """Each object's visible extent after the later ones occlude it (dropped when under 4 px)."""
    out = []
    for i, (p, full) in enumerate(placed):
        vis = full
        for _, later in placed[i + 1 :]:
            vis = Image.composite(Image.new("L", (size, size), 0), vis, later)
        bb = vis.point(lambda v: 255 if v > 127 else 0).getbbox()
        if bb is not None and (bb[2] - bb[0]) >= 4 and (bb[3] - bb[1]) >= 4:
            out.append(Placed(p.kind, p.second_fill, (float(bb[0]), float(bb[1]), float(bb[2]), float(bb[3]))))
    return out


def render(
    rng: random.Random,
    size: int,
    kinds: list[int],
    scale: tuple[float, float] = (0.18, 0.45),
    lines: int = 0,
    fill: str = "random",
) -> tuple[Image.Image, Image.Image, list[Placed]]:
    """An image, its segmentation mask (0 background, 1 + 2·kind + fill; 255 on object borders) and
    the placed objects' boxes (the visible extent). ``fill`` as in :class:`SyntheticConfig`; the fill
    index is 0 solid / 1 striped, or with ``fill="pattern"`` 0 fine / 1 coarse.

    Example:
        >>> img, mask, objects = render(random.Random(0), 64, [0, 3])
        >>> img.size, mask.mode, [o.kind for o in objects]
        ((64, 64), 'L', [0, 3])
    """
    img = background(rng, size, lines)
    mask = Image.new("L", (size, size), 0)
    placed: list[tuple[Placed, Image.Image]] = []
    for kind in kinds:
        s, x, y = _place(rng, size, scale, [p for p, _ in placed])
        second_fill = rng.random() < 0.5
        m = shape_mask(SHAPES[kind], s, rng.uniform(0, 2 * math.pi))
        tex = (
            pattern_fill(rng, s, kind, second_fill, size) if fill == "pattern" else striped_texture(rng, s, second_fill)
        )
        img.paste(tex, (x, y), m)
        full = Image.new("L", (size, size), 0)
        full.paste(m, (x, y))
        mask.paste(1 + 2 * kind + int(second_fill), (0, 0), full)
        placed.append((Placed(kind, second_fill, (x, y, x + s, y + s)), full))
    edges = mask.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v else 0)
    mask.paste(255, (0, 0), edges)
    return img, mask, _visible_boxes(placed, size)
