"""The embedded default data: a deterministic generator of three task data sets on disk.

The world: 10 shape kinds (circle, square, triangle, bowtie, L-shape, star, cross, ring, crescent,
arrow), each filled with its own two-colour pattern (:data:`PATTERNS`: stripes, checker, dots, …),
fine or coarse, at random sizes (40–70 % of the image side by default), rotations and positions, in
random colours (colour carries no class information), on textured backgrounds shared by every
class, overlapping (occlusion, limited to box IoU < 0.25): shape and texture both carry the kind.
``fill="random"`` gives the earlier world (:data:`STRIPED_WORLD`), in which any kind is drawn solid
or striped. The tasks:

* segmentation (``mini_voc_seg``): 20 classes = shape × fill (fine / coarse, or solid / striped
  with ``fill="random"``), + background; VOC layout
  ``{split}/<id>.jpg`` + palette ``{split}/<id>.png`` (255 = ignore on a thin band around objects);
* detection (``mini_coco_det``): the 10 shape kinds as categories (fill random); COCO layout
  ``{split}/labels.json`` + ``{split}/data/*.jpg``;
* classification (``imagenette_160``): 10 scenes, each named by the shape kind that makes up the
  majority of its objects (the rest are distractors); class folders ``{split}/<class>/*.jpg``.

Splits train / val (tuning) / test (reporting) come from disjoint seeds. Data sets are cached in the
user's cache directory (``$XDG_CACHE_HOME/clreg`` or ``~/.cache/clreg``) or a given folder, keyed by
the generator's version and parameters, and never written under a data root. A ``manifest.json``
holds the class names.

Example:
    >>> import tempfile
    >>> from clreg.onehead.synthetic import SyntheticConfig, generate
    >>> root = generate(SyntheticConfig(train=4, val=2, test=2, size=64), cache_dir=tempfile.mkdtemp())
    >>> sorted(p.name for p in root.iterdir())
    ['imagenette_160', 'manifest.json', 'mini_coco_det', 'mini_voc_seg']
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "FILLS",
    "GENERATOR_VERSION",
    "PATTERNS",
    "PATTERN_FILLS",
    "PATTERN_VERSION",
    "SHAPES",
    "STRIPED_WORLD",
    "SyntheticConfig",
    "default_cache_dir",
    "generate",
    "voc_palette",
]

GENERATOR_VERSION = 3
SHAPES = ("circle", "square", "triangle", "bowtie", "lshape", "star", "cross", "ring", "crescent", "arrow")
FILLS = ("solid", "striped")
# fill="pattern": the two-colour pattern of each shape kind (in SHAPES' order), drawn fine or coarse
PATTERNS = ("stripes", "checker", "dots", "xhatch", "grid", "diamonds", "zigzag", "bricks", "speckle", "hstripes")
PATTERN_FILLS = ("fine", "coarse")
PATTERN_VERSION = 1  # bumped whenever the patterns change (part of the pattern world's cache key)
_FILL_NAMES = {"random": FILLS, "pattern": PATTERN_FILLS}  # SyntheticConfig.fill -> the two fills' names


@dataclass(frozen=True)
class SyntheticConfig:
    """The generated world and the sizes and counts of its sets (the defaults: the synthetic default)."""

    train: int = 240
    val: int = 300
    test: int = 600
    size: int = 160
    cls_train: int = 2400  # classification uses more unique training images (budgets are in steps)
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 2
    min_scale: float = 0.4  # object side as a fraction of the image side
    max_scale: float = 0.7
    background_lines: int = 0  # thin distractor lines on the background (harder when > 0)
    jpeg_quality: int = 92
    fill: str = "pattern"  # "pattern": the kind's own pattern; "random": solid or striped, whatever the kind

    def __post_init__(self) -> None:
        if self.fill not in _FILL_NAMES:
            raise ValueError(f"fill must be one of {sorted(_FILL_NAMES)}, got {self.fill!r}")

    def key(self) -> str:
        fields = asdict(self)
        if fields["fill"] == "random":  # the striped world keeps the key it had before fills were chosen
            del fields["fill"]
        else:
            fields["pattern_version"] = PATTERN_VERSION
        blob = json.dumps({"version": GENERATOR_VERSION, **fields}, sort_keys=True)
        return f"v{GENERATOR_VERSION}-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


# The earlier default world (generator 3 before the pattern fills): solid or striped objects of 30–55 %
# of the image side. The shipped pretext backbone was trained on its renderer.
STRIPED_WORLD = SyntheticConfig(fill="random", min_scale=0.3, max_scale=0.55)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clreg" / "synthetic"


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


# -- drawing ----------------------------------------------------------------------------------------


def _rand_colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _polygon(
    n: int, r: float, rot: float, cx: float, cy: float, inner: float | None = None
) -> list[tuple[float, float]]:
    pts = []
    steps = n * 2 if inner else n
    for k in range(steps):
        rad = (inner if inner and k % 2 else 1.0) * r
        a = rot + 2 * math.pi * k / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _rotated(points: list[tuple[float, float]], rot: float, c: float) -> list[tuple[float, float]]:
    """``points`` (around the origin) rotated by ``rot`` radians and moved to (c, c)."""
    ca, sa = math.cos(rot), math.sin(rot)
    return [(c + x * ca - y * sa, c + x * sa + y * ca) for x, y in points]


def shape_mask(kind: str, size: int, rot: float) -> Image.Image:
    """An 'L' mask (size × size) of one shape, rotated by ``rot`` radians."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    c = r = size / 2
    r *= 0.96
    if kind == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif kind == "square":
        d.polygon(_polygon(4, r, rot + math.pi / 4, c, c), fill=255)
    elif kind == "triangle":
        d.polygon(_polygon(3, r, rot, c, c), fill=255)
    elif kind == "bowtie":
        d.polygon(_rotated([(-r, -0.8 * r), (r, 0.8 * r), (r, -0.8 * r), (-r, 0.8 * r)], rot, c), fill=255)
    elif kind == "lshape":
        w = 0.45 * r
        d.polygon(_rotated([(-r, -r), (-r + w, -r), (-r + w, r - w), (r, r - w), (r, r), (-r, r)], rot, c), fill=255)
    elif kind == "star":
        d.polygon(_polygon(5, r, rot, c, c, inner=0.45), fill=255)
    elif kind == "cross":
        w = 0.32 * r
        for a in (rot, rot + math.pi / 2):
            d.polygon(_rotated([(-r, -w), (r, -w), (r, w), (-r, w)], a, c), fill=255)
    elif kind == "ring":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        q = 0.55 * r
        d.ellipse([c - q, c - q, c + q, c + q], fill=0)
    elif kind == "crescent":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        off = 0.5 * r
        ox, oy = c + off * math.cos(rot), c + off * math.sin(rot)
        q = 0.8 * r
        d.ellipse([ox - q, oy - q, ox + q, oy + q], fill=0)
    elif kind == "arrow":
        pts0 = [
            (-r, -0.22 * r),
            (0.1 * r, -0.22 * r),
            (0.1 * r, -0.6 * r),
            (r, 0),
            (0.1 * r, 0.6 * r),
            (0.1 * r, 0.22 * r),
            (-r, 0.22 * r),
        ]
        d.polygon(_rotated(pts0, rot, c), fill=255)
    else:  # pragma: no cover - the kinds are fixed
        raise ValueError(kind)
    return m


def _contrasting_colour(rng: random.Random, a: tuple[int, int, int]) -> tuple[int, int, int]:
    """A random colour at least 150 away from ``a`` (L1 over RGB)."""
    b = _rand_colour(rng)
    while sum(abs(x - y) for x, y in zip(a, b)) < 150:
        b = _rand_colour(rng)
    return b


def _texture(rng: random.Random, size: int, striped: bool) -> Image.Image:
    a = _rand_colour(rng)
    img = Image.new("RGB", (size, size), a)
    if striped:
        b = _contrasting_colour(rng, a)
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


def _pattern(rng: random.Random, size: int, family: str, period: float) -> np.ndarray:
    """A (size, size) bool array: where a two-colour pattern of ``family`` puts its second colour.
    ``period`` is the lattice spacing in pixels; the phase is random, the lattice axis-aligned. The
    share of the second colour: stripes ½, checker ½, dots π·0.3², xhatch 1 − 0.8², grid 1 − 0.8², diamonds ½,
    zigzag 0.3, bricks 0.2 + 0.8·0.1, speckle ½ on average, hstripes ½. No pattern is changed into
    another by a horizontal flip (the training augmentation)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5 - size / 2
    u = x / period + rng.random()
    v = y / period + rng.random()
    fu, fv = u - np.floor(u), v - np.floor(v)
    if family == "stripes":
        return fu < 0.5
    if family == "checker":
        return (np.floor(u) + np.floor(v)) % 2 == 1
    if family == "dots":
        return (fu - 0.5) ** 2 + (fv - 0.5) ** 2 < 0.3**2
    if family == "xhatch":  # thin lines along both diagonals
        a, b = u + v, u - v
        return (a - np.floor(a) < 0.2) | (b - np.floor(b) < 0.2)
    if family == "grid":
        return (fu < 0.2) | (fv < 0.2)
    if family == "diamonds":  # a checker turned by 45°
        return (np.floor(u + v) + np.floor(u - v)) % 2 == 1
    if family == "zigzag":
        w = u + 0.6 * np.abs(2 * fv - 1)
        return w - np.floor(w) < 0.3
    if family == "bricks":
        b = u / 2 + 0.5 * (np.floor(v) % 2)
        return (fv < 0.2) | (b - np.floor(b) < 0.1)
    if family == "speckle":  # random on/off cells of half the period
        cells = np.frombuffer(rng.randbytes(64 * 64), dtype=np.uint8).reshape(64, 64) < 128
        return cells[np.floor(2 * u).astype(np.int64) % 64, np.floor(2 * v).astype(np.int64) % 64]
    if family == "hstripes":
        return fv < 0.5
    raise ValueError(f"unknown pattern family {family!r}; expected one of {PATTERNS}")


def _pattern_fill(rng: random.Random, size: int, kind: int, coarse: bool, image_size: int) -> Image.Image:
    """An object's fill with ``fill="pattern"``: its kind's pattern in two random, contrasting colours,
    at a period of 1/20 (fine) or 1/10 (coarse) of the image side."""
    a = _rand_colour(rng)
    b = _contrasting_colour(rng, a)
    mask = _pattern(rng, size, PATTERNS[kind], image_size / (10 if coarse else 20))
    pixels = np.where(mask[..., None], np.array(b, dtype=np.uint8), np.array(a, dtype=np.uint8))
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def _background(rng: random.Random, size: int, lines: int = 0) -> Image.Image:
    """A textured background: blurred blotches (and ``lines`` thin lines), all in random colours."""
    img = Image.new("RGB", (size, size), _rand_colour(rng))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 7)):
        r = rng.uniform(size * 0.1, size * 0.5)
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        d.ellipse([x - r, y - r, x + r, y + r], fill=_rand_colour(rng))
    img = img.filter(ImageFilter.GaussianBlur(radius=size / 16))
    d = ImageDraw.Draw(img)
    for _ in range(lines):
        d.line(
            [(rng.uniform(0, size), rng.uniform(0, size)), (rng.uniform(0, size), rng.uniform(0, size))],
            fill=_rand_colour(rng),
            width=rng.randint(1, 2),
        )
    return img


@dataclass
class Placed:
    kind: int
    second_fill: bool  # striped (fill="random") or coarse (fill="pattern")
    box: tuple[float, float, float, float]


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
    index is 0 solid / 1 striped, or with ``fill="pattern"`` 0 fine / 1 coarse."""
    img = _background(rng, size, lines)
    mask = Image.new("L", (size, size), 0)
    placed: list[tuple[Placed, Image.Image]] = []
    for kind in kinds:
        for _ in range(20):  # rejection: limit the overlap with what is already there
            s = max(8, int(rng.uniform(*scale) * size))
            x, y = rng.randint(0, size - s), rng.randint(0, size - s)
            box = (x, y, x + s, y + s)
            if all(_iou(box, p.box) < 0.25 for p, _ in placed):
                break
        second_fill = rng.random() < 0.5
        m = shape_mask(SHAPES[kind], s, rng.uniform(0, 2 * math.pi))
        tex = _pattern_fill(rng, s, kind, second_fill, size) if fill == "pattern" else _texture(rng, s, second_fill)
        img.paste(tex, (x, y), m)
        full = Image.new("L", (size, size), 0)
        full.paste(m, (x, y))
        mask.paste(1 + 2 * kind + int(second_fill), (0, 0), full)
        placed.append((Placed(kind, second_fill, box), full))
    # visible extents after occlusion, and an ignore band on object borders
    out = []
    for i, (p, full) in enumerate(placed):
        vis = full
        for _, later in placed[i + 1 :]:
            vis = Image.composite(Image.new("L", (size, size), 0), vis, later)
        bb = vis.point(lambda v: 255 if v > 127 else 0).getbbox()
        if bb is not None and (bb[2] - bb[0]) >= 4 and (bb[3] - bb[1]) >= 4:
            out.append(Placed(p.kind, p.second_fill, (float(bb[0]), float(bb[1]), float(bb[2]), float(bb[3]))))
    edges = mask.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v else 0)
    mask.paste(255, (0, 0), edges)
    return img, mask, out


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# -- writing the three data sets ---------------------------------------------------------------------

SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}


def _seg_names(fill: str = "random") -> list[str]:
    return ["background"] + [f"{s}_{f}" for s in SHAPES for f in _FILL_NAMES[fill]]


def _scene_names() -> list[str]:
    return [f"scene_{s}" for s in SHAPES]


def _write_seg(root: Path, cfg: SyntheticConfig, split: str, n: int) -> None:
    d = root / "mini_voc_seg" / split
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed * 1000 + SPLIT_SEEDS[split] * 10 + 1)
    pal = voc_palette()
    for i in range(n):
        kinds = [rng.randrange(len(SHAPES)) for _ in range(rng.randint(cfg.min_objects, cfg.max_objects))]
        img, mask, _ = render(rng, cfg.size, kinds, (cfg.min_scale, cfg.max_scale), cfg.background_lines, cfg.fill)
        img.save(d / f"seg_{split}_{i:05d}.jpg", quality=cfg.jpeg_quality)
        mask.putpalette(pal)
        mask.save(d / f"seg_{split}_{i:05d}.png")  # a palette ("P") PNG after putpalette


def _write_det(root: Path, cfg: SyntheticConfig, split: str, n: int) -> None:
    d = root / "mini_coco_det" / split
    (d / "data").mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed * 1000 + SPLIT_SEEDS[split] * 10 + 2)
    images, anns = [], []
    for i in range(n):
        kinds = [rng.randrange(len(SHAPES)) for _ in range(rng.randint(cfg.min_objects, cfg.max_objects))]
        img, _, placed = render(rng, cfg.size, kinds, (cfg.min_scale, cfg.max_scale), cfg.background_lines, cfg.fill)
        name = f"det_{split}_{i:05d}.jpg"
        img.save(d / "data" / name, quality=cfg.jpeg_quality)
        images.append({"id": i + 1, "file_name": name, "width": cfg.size, "height": cfg.size})
        for p in placed:
            x1, y1, x2, y2 = p.box
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": p.kind + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    cats = [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
    (d / "labels.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def _write_cls(root: Path, cfg: SyntheticConfig, split: str, n: int) -> None:
    rng = random.Random(cfg.seed * 1000 + SPLIT_SEEDS[split] * 10 + 3)
    names = _scene_names()
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
    cfg: SyntheticConfig = SyntheticConfig(), cache_dir: str | os.PathLike | None = None, progress: bool = False
) -> Path:
    """Generate (or find in the cache) the three data sets; returns the data root."""
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
        "class_names": {"seg": _seg_names(cfg.fill), "det": list(SHAPES), "cls": _scene_names()},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
