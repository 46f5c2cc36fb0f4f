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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import load_backbone_weights, make_backbone

__all__ = [
    "ARCHITECTURE_LIMITS",
    "HEATMAP_PRIOR_LOGIT",
    "TASKS",
    "HeadOutput",
    "UnifiedOneHead",
    "classification_output",
    "detection_output",
    "segmentation_output",
]

TASKS = ("det", "seg", "cls")
"""The built-in tasks, in the head tensor's order."""

ARCHITECTURE_LIMITS = {"max_parameters": 8_000_000, "max_neck_layers": 2, "head_layers": (2, 3)}
HEATMAP_PRIOR_LOGIT = -2.19  # sigmoid = 0.1: the focal-loss prior of an object at a cell


def _check_tasks(tasks: Sequence[str] | None, outputs: Sequence[HeadOutput] | None) -> tuple[str, ...]:
    """The head's built-in tasks in the head tensor's order (with custom ``outputs``: theirs)."""
    if outputs is not None:
        if tasks is not None:
            raise ValueError("give either outputs or tasks, not both")
        return tuple(o.task for o in outputs)
    if tasks is None:
        return TASKS
    if isinstance(tasks, str):
        raise TypeError(f"tasks is a sequence of task names, got the string {tasks!r}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks names each of {list(TASKS)} at most once (at least one), got {list(tasks)}")
    return tuple(t for t in TASKS if t in tasks)


def _conv_bn_relu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


@dataclass(frozen=True)
class HeadOutput:
    """One task's share of the head tensor: its named channel groups, the initial bias of each
    group (its prior) and the parameter-free read-out of the task's output from its channels.

    ``read(t, size)`` gets the task's channels of the head tensor, (B, Σ channels, h, w), and the
    input's spatial size.
    """

    task: str
    groups: tuple[tuple[str, int], ...]  # (name, channels) in the head tensor's order
    read: Callable[[Tensor, Sequence[int]], Any]
    prior: tuple[tuple[str, float], ...] = ()  # (group, initial bias); others start at 0

    @property
    def channels(self) -> int:
        return sum(n for _, n in self.groups)


def detection_output(num_classes: int, task: str = "det") -> HeadOutput:
    """Class-centre logits (sigmoid, at the focal-loss prior) and log box sides, plus the objectness."""

    def read(t: Tensor, size: Sequence[int]) -> dict[str, Tensor]:
        heatmap = t[:, :num_classes]
        return {"heatmap": heatmap, "box": t[:, num_classes:], "objectness": torch.sigmoid(heatmap).amax(1)}

    return HeadOutput(task, (("heatmap", num_classes), ("box", 4)), read, (("heatmap", HEATMAP_PRIOR_LOGIT),))


def segmentation_output(num_classes: int, task: str = "seg") -> HeadOutput:
    """Per-class logits upsampled to the input size."""

    def read(t: Tensor, size: Sequence[int]) -> Tensor:
        return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)

    return HeadOutput(task, ((task, num_classes),), read)


def classification_output(num_classes: int, task: str = "cls") -> HeadOutput:
    """Per-class logits averaged over locations."""
    return HeadOutput(task, ((task, num_classes),), lambda t, size: t.mean(dim=(2, 3)))


class UnifiedOneHead(nn.Module):
    """One backbone, one neck, one head tensor for detection, segmentation and classification.

    Args:
        det_classes, seg_classes, cls_classes: class counts (seg includes background).
        width: channels of the neck and the head's hidden layer.
        backbone_weights: a local timm checkpoint for the backbone (a state dict of
            ``mobilenetv3_small_100``, full or features-only); a clear error if missing or unfit.
        pretrained: ask timm's hub for ImageNet weights (fails offline, pointing to
            ``backbone_weights``).
        outputs: the tasks' :class:`HeadOutput` s in the head tensor's order, instead of the three
            built from the class counts (e.g. to add a task); such a model is not saved by
            :func:`save_checkpoint`.
        tasks: the built-in tasks whose outputs the head carries (``None``: all of :data:`TASKS`), kept
            in the head tensor's order det, seg, cls whatever order they are given in, so a run of any
            stage order builds the same model.
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
        outputs: Sequence[HeadOutput] | None = None,
        tasks: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("det_classes", det_classes), ("seg_classes", seg_classes), ("cls_classes", cls_classes)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.det_classes, self.seg_classes, self.cls_classes = det_classes, seg_classes, cls_classes
        self.tasks = _check_tasks(tasks, outputs)
        self.outputs = tuple(outputs) if outputs is not None else self.default_outputs()
        self.custom_outputs = outputs is not None
        self.backbone = make_backbone(pretrained)
        if backbone_weights is not None:
            load_backbone_weights(self.backbone, backbone_weights)
        chans = self.backbone.feature_info.channels()
        self.neck = nn.Sequential(_conv_bn_relu(sum(chans), width, 1), _conv_bn_relu(width, width, 3))
        self.head = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, self.out_channels, 1)
        )
        with torch.no_grad():  # each task's priors (a low initial objectness: the focal-loss prior)
            for o in self.outputs:
                self._set_prior(o)

    def default_outputs(self) -> tuple[HeadOutput, ...]:
        """Detection, segmentation and classification (those of ``tasks``), in that order in the head tensor."""
        made = {
            "det": lambda: detection_output(self.det_classes),
            "seg": lambda: segmentation_output(self.seg_classes),
            "cls": lambda: classification_output(self.cls_classes),
        }
        return tuple(made[t]() for t in self.tasks)

    @property
    def out_channels(self) -> int:
        return sum(o.channels for o in self.outputs)

    def _spans(self) -> dict[str, slice]:
        """Each task's channels of the head tensor."""
        spans, start = {}, 0
        for o in self.outputs:
            spans[o.task] = slice(start, start + o.channels)
            start += o.channels
        return spans

    def slices(self) -> dict[str, slice]:
        """Each channel group's channels of the head tensor (``heatmap``, ``box``, ``seg``, ``cls``)."""
        out, start = {}, 0
        for o in self.outputs:
            for name, n in o.groups:
                out[name] = slice(start, start + n)
                start += n
        return out

    def _set_prior(self, o: HeadOutput) -> None:
        sl = self.slices()
        for group, bias in o.prior:
            self.head[-1].bias[sl[group]].fill_(bias)

    @torch.no_grad()
    def reset_task_outputs(self, task: str) -> None:
        """Zero the output layer's rows of one task (``"det"``: heatmap and boxes, ``"seg"``, ``"cls"``),
        its priors back in place. A task that starts after another one begins from its prior rather
        than from large random logits on the hidden features the earlier task scaled up."""
        spans = self._spans()
        if task not in spans:
            raise ValueError(f"task must be one of {sorted(spans)}, got {task!r}")
        out = self.head[-1]
        out.weight[spans[task]].zero_()
        out.bias[spans[task]].zero_()
        self._set_prior(next(o for o in self.outputs if o.task == task))

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
        spans = self._spans()
        return {o.task: o.read(t[:, spans[o.task]], size) for o in self.outputs}

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
        """The constructor's arguments (what a checkpoint rebuilds the model from)."""
        if self.custom_outputs:
            raise ValueError("a model built with custom outputs has no config to rebuild it from")
        config: dict[str, Any] = {
            "det_classes": self.det_classes,
            "seg_classes": self.seg_classes,
            "cls_classes": self.cls_classes,
            "width": self.neck[0][0].out_channels,
        }
        return config if self.tasks == TASKS else {**config, "tasks": list(self.tasks)}
