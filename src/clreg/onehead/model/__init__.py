"""The one-head model: :mod:`~clreg.onehead.model.network` (the model and each task's share of its
head tensor), :mod:`~clreg.onehead.model.backbone`, :mod:`~clreg.onehead.model.checkpoint` and
:mod:`~clreg.onehead.model.latency`."""

from .backbone import BACKBONE, BackboneWeightsError, load_backbone_weights, make_backbone
from .checkpoint import CHECKPOINT_VERSION, IMAGENET_MEAN, IMAGENET_STD, load_checkpoint, save_checkpoint
from .latency import cpu_latency
from .network import (
    ARCHITECTURE_LIMITS,
    HEATMAP_PRIOR_LOGIT,
    HeadOutput,
    UnifiedOneHead,
    classification_output,
    detection_output,
    segmentation_output,
)

__all__ = [
    "ARCHITECTURE_LIMITS",
    "BACKBONE",
    "CHECKPOINT_VERSION",
    "HEATMAP_PRIOR_LOGIT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneWeightsError",
    "HeadOutput",
    "UnifiedOneHead",
    "classification_output",
    "cpu_latency",
    "detection_output",
    "load_backbone_weights",
    "load_checkpoint",
    "make_backbone",
    "save_checkpoint",
    "segmentation_output",
]
