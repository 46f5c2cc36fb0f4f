"""The backbone: timm's MobileNetV3-small as a features-only network (strides 8, 16, 32), from
random weights, a local checkpoint, or timm's hub (ImageNet weights): online, or offline from the
hub's local cache (``HF_HUB_OFFLINE=1`` with ``model.safetensors`` of
``timm/mobilenetv3_small_100.lamb_in1k`` in ``$HF_HUB_CACHE``, the layout a download leaves there)."""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from torch import nn

__all__ = ["BACKBONE", "BackboneWeightsError", "load_backbone_weights", "make_backbone"]

BACKBONE = "mobilenetv3_small_100"


class BackboneWeightsError(ValueError):
    """Pretrained weights that cannot be had here (offline without the hub's cache)."""


def make_backbone(pretrained: bool) -> nn.Module:
    kw = dict(features_only=True, out_indices=(2, 3, 4))
    if not pretrained:
        return timm.create_model(BACKBONE, pretrained=False, **kw)
    try:
        return timm.create_model(BACKBONE, pretrained=True, **kw)
    except Exception as err:  # offline, and not in the hub's cache
        raise BackboneWeightsError(
            f"could not fetch ImageNet weights for {BACKBONE} from timm's hub ({type(err).__name__}); "
            "this machine may be offline and the hub's cache lacks them: pass a local checkpoint with "
            "backbone_weights=FILE (--backbone-weights FILE) instead"
        ) from err


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a local timm checkpoint (full model or features-only) into the features-only backbone."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read backbone weights {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    own = backbone.state_dict()
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    usable = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in usable]
    if missing:
        raise ValueError(
            f"{path} does not fit {BACKBONE}: {len(missing)} of {len(own)} backbone tensors are missing (e.g. {missing[:3]})"
        )
    bad = [k for k, v in usable.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{path} does not fit {BACKBONE}: shapes differ for {bad[:3]}")
    backbone.load_state_dict(usable, strict=True)
