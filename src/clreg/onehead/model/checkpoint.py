"""A saved one-head model: its weights with what ``evaluate`` needs (class names, the detection
category map, the input size and normalisation), written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .network import UnifiedOneHead

__all__ = ["CHECKPOINT_VERSION", "IMAGENET_MEAN", "IMAGENET_STD", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def save_checkpoint(
    model: UnifiedOneHead,
    path: str | os.PathLike,
    *,
    class_names: dict[str, list[str]],
    category_map: dict[str, int] | None = None,
    input_size: int = 160,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save weights with what ``evaluate`` needs (class names per task, the detection category map by
    name, the input size and normalisation), atomically (a temporary file, then a rename)."""
    path = Path(path)
    payload = {
        "format": "clreg.onehead",
        "version": CHECKPOINT_VERSION,
        "config": model.config(),
        "state_dict": model.state_dict(),
        "class_names": {k: list(v) for k, v in class_names.items()},
        "category_map": dict(category_map or {}),
        "input_size": int(input_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[UnifiedOneHead, dict[str, Any]]:
    """(model in eval mode, metadata) from :func:`save_checkpoint`, read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != "clreg.onehead":
        raise ValueError(f"{path} is not a clreg one-head checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} has checkpoint version {payload.get('version')}, this clreg reads {CHECKPOINT_VERSION}"
        )
    model = UnifiedOneHead(**payload["config"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict",)}
    return model, meta
