"""The unified one-head reference benchmark: one MobileNetV3-small model whose single head does
detection, segmentation and classification, its data, targets, losses and metrics.

Needs the benchmark extra: ``pip install "clreg[benchmark]"``.
"""

from __future__ import annotations

try:
    import timm  # noqa: F401
    import torchvision  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"clreg.onehead needs the benchmark extra: pip install 'clreg[benchmark]' (missing: {err.name})"
    ) from err

from .losses import classification_loss, detection_loss, segmentation_loss
from .model import ARCHITECTURE_LIMITS, UnifiedOneHead, load_checkpoint, save_checkpoint
from .targets import DetectionEncoder, decode_detections

__all__ = [
    "ARCHITECTURE_LIMITS",
    "DetectionEncoder",
    "UnifiedOneHead",
    "classification_loss",
    "decode_detections",
    "detection_loss",
    "load_checkpoint",
    "save_checkpoint",
    "segmentation_loss",
]
