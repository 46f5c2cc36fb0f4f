"""``UnifiedOneHead``: MobileNetV3-small, a two-layer neck and one two-layer head for three tasks.

::

    image (B, 3, S, S)
      └ backbone: timm mobilenetv3_small_100, features_only, strides 8, 16, 32
      └ neck (2 conv-BN-ReLU layers): upsample the stride-16/32 maps to stride 8, concatenate,
        1×1 conv → 3×3 conv
      └ head (2 learnable layers, one branch): 3×3 conv → ReLU → 1×1 conv → T (B, K+4+S+N, S/8, S/8)
    outputs, all parameter-free slices of T:
      "det": {"heatmap": T[:, :K]            (B, K, h, w)   class centre logits (sigmoid)
              "box":     T[:, K:K+4]         (B, 4, h, w)   log(l, t, r, b / stride)
              "objectness": max over K of sigmoid(heatmap)  (B, h, w)  (a distillation weight)}
      "seg": upsample(T[:, K+4:K+4+S])       (B, S_cls, H, W) segmentation logits
      "cls": mean over (h, w) of T[:, -N:]   (B, N)         classification logits

Example:
    >>> import torch
    >>> from clreg.onehead import UnifiedOneHead
    >>> model = UnifiedOneHead(det_classes=10, seg_classes=21, cls_classes=10)
    >>> out = model(torch.randn(1, 3, 128, 128))
    >>> out["seg"].shape, out["det"]["heatmap"].shape, out["cls"].shape
    (torch.Size([1, 21, 128, 128]), torch.Size([1, 10, 16, 16]), torch.Size([1, 10]))
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ARCHITECTURE_LIMITS", "CHECKPOINT_VERSION", "UnifiedOneHead", "load_checkpoint", "save_checkpoint"]

ARCHITECTURE_LIMITS = {"max_parameters": 8_000_000, "max_neck_layers": 2, "head_layers": (2, 3)}
BACKBONE = "mobilenetv3_small_100"
CHECKPOINT_VERSION = 1
HEATMAP_PRIOR_LOGIT = -2.19  # sigmoid = 0.1: the focal-loss prior of an object at a cell
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv_bn_relu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class UnifiedOneHead(nn.Module):
    """One backbone, one neck, one head tensor for detection, segmentation and classification.

    Args:
        det_classes, seg_classes, cls_classes: class counts (seg includes background).
        width: channels of the neck and the head's hidden layer.
        backbone_weights: a local timm checkpoint for the backbone (a state dict of
            ``mobilenetv3_small_100``, full or features-only); a clear error if missing or unfit.
        pretrained: ask timm's hub for ImageNet weights (fails offline, pointing to
            ``backbone_weights``).
    """

    stride = 8

    def __init__(
        self,
        det_classes: int = 10,
        seg_classes: int = 21,
        cls_classes: int = 10,
        width: int = 96,
        backbone_weights: str | os.PathLike | None = None,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        for name, v in (("det_classes", det_classes), ("seg_classes", seg_classes), ("cls_classes", cls_classes)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.det_classes, self.seg_classes, self.cls_classes = det_classes, seg_classes, cls_classes
        self.backbone = _make_backbone(pretrained)
        if backbone_weights is not None:
            load_backbone_weights(self.backbone, backbone_weights)
        chans = self.backbone.feature_info.channels()
        self.neck = nn.Sequential(_conv_bn_relu(sum(chans), width, 1), _conv_bn_relu(width, width, 3))
        self.head = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, self.out_channels, 1)
        )
        with torch.no_grad():  # a low initial objectness (focal-loss prior)
            self.head[-1].bias[:det_classes].fill_(HEATMAP_PRIOR_LOGIT)

    @property
    def out_channels(self) -> int:
        return self.det_classes + 4 + self.seg_classes + self.cls_classes

    def slices(self) -> dict[str, slice]:
        k, s = self.det_classes, self.seg_classes
        return {
            "heatmap": slice(0, k),
            "box": slice(k, k + 4),
            "seg": slice(k + 4, k + 4 + s),
            "cls": slice(k + 4 + s, k + 4 + s + self.cls_classes),
        }

    @torch.no_grad()
    def reset_task_outputs(self, task: str) -> None:
        """Zero the output layer's rows of one task (``"det"``: heatmap and boxes, ``"seg"``, ``"cls"``),
        the heatmap's bias back at its prior. A task that starts after another one begins from its
        prior rather than from large random logits on the hidden features the earlier task scaled up."""
        sl = self.slices()
        rows = {"det": [sl["heatmap"], sl["box"]], "seg": [sl["seg"]], "cls": [sl["cls"]]}
        if task not in rows:
            raise ValueError(f"task must be one of {sorted(rows)}, got {task!r}")
        out = self.head[-1]
        for r in rows[task]:
            out.weight[r].zero_()
            out.bias[r].zero_()
        if task == "det":
            out.bias[sl["heatmap"]].fill_(HEATMAP_PRIOR_LOGIT)

    def neck_features(self, x: Tensor) -> Tensor:
        """Backbone maps upsampled to stride 8, concatenated, through the neck: (B, width, H/8, W/8)."""
        feats = self.backbone(x)
        size = feats[0].shape[-2:]
        fused = torch.cat(
            [feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]], 1
        )
        return self.neck(fused)

    def head_tensor(self, x: Tensor) -> Tensor:
        """The one tensor every output is sliced from: (B, K+4+S+N, H/8, W/8)."""
        return self.head(self.neck_features(x))

    def split(self, t: Tensor, size: Sequence[int]) -> dict[str, Any]:
        """The outputs as parameter-free operations on the head tensor ``t``."""
        sl = self.slices()
        return {
            "seg": F.interpolate(t[:, sl["seg"]], size=tuple(size), mode="bilinear", align_corners=False),
            "det": {
                "heatmap": t[:, sl["heatmap"]],
                "box": t[:, sl["box"]],
                "objectness": torch.sigmoid(t[:, sl["heatmap"]]).amax(1),
            },
            "cls": t[:, sl["cls"]].mean(dim=(2, 3)),
        }

    def forward(self, x: Tensor) -> dict[str, Any]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"image sides must be multiples of 32, got {tuple(x.shape[-2:])}")
        return self.split(self.head_tensor(x), x.shape[-2:])

    # -- the challenge's constraints -----------------------------------------------------------
    def architecture_report(self) -> dict[str, Any]:
        """Counts for the challenge's rules: parameters, neck layers, head learnable layers."""
        learnable = (nn.Conv2d, nn.Linear)
        total = sum(p.numel() for p in self.parameters())
        return {
            "parameters": total,
            "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "backbone_parameters": sum(p.numel() for p in self.backbone.parameters()),
            "neck_layers": sum(isinstance(m, nn.Conv2d) for m in self.neck.modules()),
            "head_layers": sum(isinstance(m, learnable) for m in self.head.modules()),
            "head_parameters": sum(p.numel() for p in self.head.parameters()),
        }

    def check_architecture(self) -> dict[str, Any]:
        """Raise ValueError if the model breaks a rule; return the report otherwise."""
        r = self.architecture_report()
        lim = ARCHITECTURE_LIMITS
        if r["parameters"] >= lim["max_parameters"]:
            raise ValueError(f"{r['parameters']} parameters: the limit is {lim['max_parameters']}")
        if r["neck_layers"] > lim["max_neck_layers"]:
            raise ValueError(f"the neck has {r['neck_layers']} conv layers, at most {lim['max_neck_layers']} allowed")
        lo, hi = lim["head_layers"]
        if not lo <= r["head_layers"] <= hi:
            raise ValueError(f"the head has {r['head_layers']} learnable layers, {lo}-{hi} required")
        return r

    def config(self) -> dict[str, Any]:
        return {
            "det_classes": self.det_classes,
            "seg_classes": self.seg_classes,
            "cls_classes": self.cls_classes,
            "width": self.neck[0][0].out_channels,
        }


def _make_backbone(pretrained: bool) -> nn.Module:
    kw = dict(features_only=True, out_indices=(2, 3, 4))
    if not pretrained:
        return timm.create_model(BACKBONE, pretrained=False, **kw)
    try:
        return timm.create_model(BACKBONE, pretrained=True, **kw)
    except Exception as err:  # offline: no hub
        raise RuntimeError(
            f"could not fetch ImageNet weights for {BACKBONE} from timm's hub ({type(err).__name__}); "
            "this machine may be offline: pass a local checkpoint with backbone_weights=FILE "
            "(--backbone-weights FILE) instead"
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


# -- checkpoints --------------------------------------------------------------------------------


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


# -- latency ------------------------------------------------------------------------------------


@torch.no_grad()
def cpu_latency(model: UnifiedOneHead, size: int = 512, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median CPU latency of one ``size``×``size`` image, in ms: whole model, head alone, head share."""
    model = model.eval()
    x = torch.randn(1, 3, size, size)
    neck = model.neck_features(x)

    def median(fn) -> float:
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        ts.sort()
        return ts[len(ts) // 2] * 1e3

    whole = median(lambda: model(x))
    head = median(lambda: model.split(model.head(neck), x.shape[-2:]))
    return {
        "model_ms": whole,
        "head_ms": head,
        "head_share": head / whole,
        "size": size,
        "threads": torch.get_num_threads(),
    }
