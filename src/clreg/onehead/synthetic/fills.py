"""What an object and a background are painted with: random colours, the striped texture of the
earlier world, the pattern world's two-colour patterns (one per shape kind) and the blotchy
background."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["PATTERNS", "background", "pattern_fill", "pattern_mask", "random_colour", "striped_texture"]

# fill="pattern": the two-colour pattern of each shape kind (in SHAPES' order), drawn fine or coarse
PATTERNS = ("stripes", "checker", "dots", "xhatch", "grid", "diamonds", "zigzag", "bricks", "speckle", "hstripes")

Colour = tuple[int, int, int]


def random_colour(rng: random.Random) -> Colour:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def contrasting_colour(rng: random.Random, a: Colour) -> Colour:
    """A random colour at least 150 away from ``a`` (L1 over RGB)."""
    b = random_colour(rng)
    while sum(abs(x - y) for x, y in zip(a, b)) < 150:
        b = random_colour(rng)
    return b


def striped_texture(rng: random.Random, size: int, striped: bool) -> Image.Image:
    """The earlier world's fill: one random colour, or stripes of two at a random angle."""
    a = random_colour(rng)
    img = Image.new("RGB", (size, size), a)
    if striped:
        b = contrasting_colour(rng, a)
        d = ImageDraw.Draw(img)
        period = rng.uniform(6, 10)
        ang = rng.uniform(0, math.pi)
        ca, sa = math.cos(ang), math.sin(ang)
        span = size * 1.5
        k = -span
        while k < span:
            pts = [
                (size / 2 + (k + t) * ca - s * sa, size / 2 + (k + t) * sa + s * ca)
                for t, s in ((0, -span), (period / 2, -span), (period / 2, span), (0, span))
            ]
            d.polygon(pts, fill=b)
            k += period
    return img


# Each pattern: (u, v, fu, fv, rng) -> where the second colour goes; u, v are lattice coordinates and
# fu, fv their fractional parts.
Lattice = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, random.Random], np.ndarray]


def _diagonal_lines(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    a, b = u + v, u - v
    return (a - np.floor(a) < 0.2) | (b - np.floor(b) < 0.2)


def _zigzag(u: np.ndarray, fv: np.ndarray) -> np.ndarray:
    w = u + 0.6 * np.abs(2 * fv - 1)
    return w - np.floor(w) < 0.3


def _bricks(u: np.ndarray, v: np.ndarray, fv: np.ndarray) -> np.ndarray:
    b = u / 2 + 0.5 * (np.floor(v) % 2)
    return (fv < 0.2) | (b - np.floor(b) < 0.1)


def _speckle(u: np.ndarray, v: np.ndarray, rng: random.Random) -> np.ndarray:
    cells = np.frombuffer(rng.randbytes(64 * 64), dtype=np.uint8).reshape(64, 64) < 128
    return cells[np.floor(2 * u).astype(np.int64) % 64, np.floor(2 * v).astype(np.int64) % 64]


_LATTICES: dict[str, Lattice] = {
    "stripes": lambda u, v, fu, fv, rng: fu < 0.5,
    "checker": lambda u, v, fu, fv, rng: (np.floor(u) + np.floor(v)) % 2 == 1,
    "dots": lambda u, v, fu, fv, rng: (fu - 0.5) ** 2 + (fv - 0.5) ** 2 < 0.3**2,
    "xhatch": lambda u, v, fu, fv, rng: _diagonal_lines(u, v),  # thin lines along both diagonals
    "grid": lambda u, v, fu, fv, rng: (fu < 0.2) | (fv < 0.2),
    "diamonds": lambda u, v, fu, fv, rng: (np.floor(u + v) + np.floor(u - v)) % 2 == 1,  # a checker turned by 45°
    "zigzag": lambda u, v, fu, fv, rng: _zigzag(u, fv),
    "bricks": lambda u, v, fu, fv, rng: _bricks(u, v, fv),
    "speckle": lambda u, v, fu, fv, rng: _speckle(u, v, rng),  # random on/off cells of half the period
    "hstripes": lambda u, v, fu, fv, rng: fv < 0.5,
}


def pattern_mask(rng: random.Random, size: int, family: str, period: float) -> np.ndarray:
    """A (size, size) bool array: where a two-colour pattern of ``family`` puts its second colour.
    ``period`` is the lattice spacing in pixels; the phase is random, the lattice axis-aligned. The
    share of the second colour: stripes ½, checker ½, dots π·0.3², xhatch 1 − 0.8², grid 1 − 0.8², diamonds ½,
    zigzag 0.3, bricks 0.2 + 0.8·0.1, speckle ½ on average, hstripes ½. No pattern is changed into
    another by a horizontal flip (the training augmentation)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5 - size / 2
    u = x / period + rng.random()
    v = y / period + rng.random()
    if family not in _LATTICES:
        raise ValueError(f"unknown pattern family {family!r}; expected one of {PATTERNS}")
    return _LATTICES[family](u, v, u - np.floor(u), v - np.floor(v), rng)


def pattern_fill(rng: random.Random, size: int, kind: int, coarse: bool, image_size: int) -> Image.Image:
    """An object's fill with ``fill="pattern"``: its kind's pattern in two random, contrasting colours,
    at a period of 1/20 (fine) or 1/10 (coarse) of the image side."""
    a = random_colour(rng)
    b = contrasting_colour(rng, a)
    mask = pattern_mask(rng, size, PATTERNS[kind], image_size / (10 if coarse else 20))
    pixels = np.where(mask[..., None], np.array(b, dtype=np.uint8), np.array(a, dtype=np.uint8))
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def background(rng: random.Random, size: int, lines: int = 0) -> Image.Image:
    """A textured background: blurred blotches (and ``lines`` thin lines), all in random colours."""
    img = Image.new("RGB", (size, size), random_colour(rng))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 7)):
        r = rng.uniform(size * 0.1, size * 0.5)
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        d.ellipse([x - r, y - r, x + r, y + r], fill=random_colour(rng))
    img = img.filter(ImageFilter.GaussianBlur(radius=size / 16))
    d = ImageDraw.Draw(img)
    for _ in range(lines):
        d.line(
            [(rng.uniform(0, size), rng.uniform(0, size)), (rng.uniform(0, size), rng.uniform(0, size))],
            fill=random_colour(rng),
            width=rng.randint(1, 2),
        )
    return img
