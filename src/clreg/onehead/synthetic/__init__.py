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

One module per concept: :mod:`~clreg.onehead.synthetic.config` (the parameters, the cache key),
:mod:`~clreg.onehead.synthetic.shapes` (the 10 kinds), :mod:`~clreg.onehead.synthetic.fills`
(colours, patterns, backgrounds), :mod:`~clreg.onehead.synthetic.layout` (a scene) and
:mod:`~clreg.onehead.synthetic.writer` (the three data sets on disk).

Example:
    >>> import tempfile
    >>> from clreg.onehead.synthetic import SyntheticConfig, generate
    >>> root = generate(SyntheticConfig(train=4, val=2, test=2, size=64), cache_dir=tempfile.mkdtemp())
    >>> sorted(p.name for p in root.iterdir())
    ['imagenette_160', 'manifest.json', 'mini_coco_det', 'mini_voc_seg']
"""

from .config import (
    FILLS,
    GENERATOR_VERSION,
    PATTERN_FILLS,
    PATTERN_VERSION,
    STRIPED_WORLD,
    SyntheticConfig,
    default_cache_dir,
)
from .fills import PATTERNS, pattern_mask
from .layout import Placed, render
from .shapes import SHAPES, shape_mask
from .writer import class_names, generate, voc_palette

__all__ = [
    "FILLS",
    "GENERATOR_VERSION",
    "PATTERNS",
    "PATTERN_FILLS",
    "PATTERN_VERSION",
    "SHAPES",
    "STRIPED_WORLD",
    "Placed",
    "SyntheticConfig",
    "class_names",
    "default_cache_dir",
    "generate",
    "pattern_mask",
    "render",
    "shape_mask",
    "voc_palette",
]
