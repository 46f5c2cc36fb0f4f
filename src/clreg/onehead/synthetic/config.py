"""The synthetic world's parameters, its versions and its cache location."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "FILLS",
    "FILL_NAMES",
    "GENERATOR_VERSION",
    "PATTERN_FILLS",
    "PATTERN_VERSION",
    "STRIPED_WORLD",
    "SyntheticConfig",
    "default_cache_dir",
]

GENERATOR_VERSION = 3
FILLS = ("solid", "striped")
PATTERN_FILLS = ("fine", "coarse")
PATTERN_VERSION = 1  # bumped whenever the patterns change (part of the pattern world's cache key)
FILL_NAMES = {"random": FILLS, "pattern": PATTERN_FILLS}  # SyntheticConfig.fill -> the two fills' names


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
        if self.fill not in FILL_NAMES:
            raise ValueError(f"fill must be one of {sorted(FILL_NAMES)}, got {self.fill!r}")

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
