r"""Per-sample losses of the three tasks, ``loss(outputs, target) -> Tensor[B]``, vmap-safe.

* segmentation: the mean over non-ignored pixels (255 = ignore) of the pixel cross-entropy;
* detection: the CenterNet focal loss on the heatmap (α = 2, β = 4) plus the L1 loss on the log
  distances at the weighted cells, **divided by max(1, number of objects)** (the per-sample
  normalisation an empirical Fisher scales with the square of);
* classification: the cross-entropy.

Each can be computed alone, so each stage trains its own task.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "classification_loss", "detection_loss", "segmentation_loss"]

IGNORE_INDEX = 255


def segmentation_loss(outputs: Any, target: Tensor) -> Tensor:
    """Pixel-mean cross-entropy per sample; ``target`` (B, H, W) with 255 ignored."""
    logits = outputs["seg"] if isinstance(outputs, dict) else outputs
    target = target.long()
    nll = F.cross_entropy(
        logits.float(), target.clamp(max=logits.shape[1] - 1) * (target != IGNORE_INDEX), reduction="none"
    )
    valid = (target != IGNORE_INDEX).to(nll.dtype)
    return (nll * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1.0)


def detection_loss(outputs: Any, target: dict[str, Tensor], box_weight: float = 1.0) -> Tensor:
    """(focal heatmap loss + box L1) / max(1, objects), per sample."""
    det = outputs.get("det", outputs)
    logits = det["heatmap"].float()
    gt = target["heatmap"]
    p = torch.sigmoid(logits)
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    pos = (gt >= 1.0 - 1e-4).to(p.dtype)
    pos_term = -pos * (1 - p) ** 2 * log_p
    neg_term = -(1 - pos) * (1 - gt) ** 4 * p**2 * log_1mp
    focal = (pos_term + neg_term).flatten(1).sum(1)
    w = target["box_weight"].to(p.dtype)
    l1 = ((det["box"].float() - target["box"]).abs().sum(1) * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1.0)
    n = target["num_objects"].to(p.dtype).reshape(-1).clamp(min=1.0)
    return focal / n + box_weight * l1


def classification_loss(outputs: Any, target: Tensor) -> Tensor:
    logits = outputs["cls"] if isinstance(outputs, dict) else outputs
    return F.cross_entropy(logits.float(), target.long().reshape(-1), reduction="none")
