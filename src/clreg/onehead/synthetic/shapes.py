"""The 10 shape kinds as masks: one small drawing function per kind, looked up by name."""

from __future__ import annotations

import math
from collections.abc import Callable

from PIL import Image, ImageDraw

__all__ = ["SHAPES", "shape_mask"]

SHAPES = ("circle", "square", "triangle", "bowtie", "lshape", "star", "cross", "ring", "crescent", "arrow")

Points = list[tuple[float, float]]


def _polygon(n: int, r: float, rot: float, cx: float, cy: float, inner: float | None = None) -> Points:
    pts = []
    steps = n * 2 if inner else n
    for k in range(steps):
        rad = (inner if inner and k % 2 else 1.0) * r
        a = rot + 2 * math.pi * k / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _rotated(points: Points, rot: float, c: float) -> Points:
    """``points`` (around the origin) rotated by ``rot`` radians and moved to (c, c)."""
    ca, sa = math.cos(rot), math.sin(rot)
    return [(c + x * ca - y * sa, c + x * sa + y * ca) for x, y in points]


def _disc(d: ImageDraw.ImageDraw, x: float, y: float, r: float, fill: int) -> None:
    d.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _circle(d: ImageDraw.ImageDraw, c: float, r: float, rot: float) -> None:
    _disc(d, c, c, r, 255)


def _square(d: ImageDraw.ImageDraw, c: float, r: float, rot: float) -> None:
    d.polygon(_polygon(4, r, rot + math.pi / 4, c, c), fill=255)


def _triangle(d: ImageDraw.ImageDraw, c: float, r: float, rot: float) -> None:
    d.polygon(_polygon(3, r, rot, c, c), fill=255)


def _bowtie(d: ImageDraw.ImageDraw, c: float, r: float, rot: float) -> None:
    d.polygon(_rotated([(-r, -0.8 * r), (r, 0.8 * r), (r, -0.8 * r), (-r, 0.8 * r)], rot, c), fill=255)


def _lshape(d: ImageDraw.ImageDraw, c: float, r: float, rot: float) -> None:
    w = 0.45 * r
    d.polygon(_rotated([(-r, -r), (-r + w, -r), (-r + w, r - w), (r, r - w), (r, r), (-r, r)], rot, c), fill=255)


def _star(d: ImageDraw.ImageDraw, c: float, r: float, rot: float) -> None:
    d.polygon(_polygon(5, r, rot, c, c, inner=0.45), fill=255)


def _cross(d: ImageDraw.ImageDraw, c: float, r: float, rot: float) -> None:
    w = 0.32 * r
    for a in (rot, rot + math.pi / 2):
        d.polygon(_rotated([(-r, -w), (r, -w), (r, w), (-r, w)], a, c), fill=255)


def _ring(d: ImageDraw.ImageDraw, c: float, r: float, rot: float) -> None:
    _disc(d, c, c, r, 255)
    _disc(d, c, c, 0.55 * r, 0)


def _crescent(d: ImageDraw.ImageDraw, c: float, r: float, rot: float) -> None:
    _disc(d, c, c, r, 255)
    off = 0.5 * r
    _disc(d, c + off * math.cos(rot), c + off * math.sin(rot), 0.8 * r, 0)


def _arrow(d: ImageDraw.ImageDraw, c: float, r: float, rot: float) -> None:
    pts = [(-r, -0.22 * r), (0.1 * r, -0.22 * r), (0.1 * r, -0.6 * r), (r, 0), (0.1 * r, 0.6 * r), (0.1 * r, 0.22 * r)]
    d.polygon(_rotated([*pts, (-r, 0.22 * r)], rot, c), fill=255)


_DRAW: dict[str, Callable[[ImageDraw.ImageDraw, float, float, float], None]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "bowtie": _bowtie,
    "lshape": _lshape,
    "star": _star,
    "cross": _cross,
    "ring": _ring,
    "crescent": _crescent,
    "arrow": _arrow,
}


def shape_mask(kind: str, size: int, rot: float) -> Image.Image:
    """An 'L' mask (size × size) of one shape, rotated by ``rot`` radians.

    Example:
        >>> shape_mask("ring", 32, 0.0).getpixel((16, 16))   # the ring's hole
        0
    """
    if kind not in _DRAW:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")
    m = Image.new("L", (size, size), 0)
    c = size / 2
    _DRAW[kind](ImageDraw.Draw(m), c, c * 0.96, rot)
    return m
