r"""Dense, anchor-free detection targets on the head's grid, and their decoding.

Encoding (CenterNet-style centres, FCOS-style distances), for boxes (x1, y1, x2, y2) in input pixels
and a grid of stride s:

* ``heatmap`` (K, h, w): for each box a Gaussian at its centre cell in its class channel,
  σ = max(0.5, min(w, h) / (6 s)) cells, peak 1; the maximum where boxes overlap;
* ``box`` (4, h, w): at the centre cell and its neighbours that lie inside the box (radius 1),
  log(l / s), log(t / s), log(r / s), log(b / s) — the distances from the cell's centre to the box's
  edges; where two boxes claim a cell, the smaller box wins;
* ``box_weight`` (h, w): 1 where ``box`` holds a target, else 0;
* ``num_objects`` (): the number of boxes.

All fixed shapes, so a per-sample loss can be vmapped over them. Decoding takes the heatmap's local
maxima (3×3), keeps the top scores, reads the distances at each peak and applies class-wise NMS
(``torchvision.ops.batched_nms``).

Example:
    >>> import torch
    >>> from clreg.onehead import DetectionEncoder, decode_detections
    >>> enc = DetectionEncoder(num_classes=3, size=64, stride=8)
    >>> t = enc.encode(torch.tensor([[8.0, 16.0, 40.0, 48.0]]), torch.tensor([2]))
    >>> t["heatmap"].shape, t["box"].shape, int(t["num_objects"])
    (torch.Size([3, 8, 8]), torch.Size([4, 8, 8]), 1)
    >>> logits = torch.logit(t["heatmap"].clamp(1e-4, 1 - 1e-4))[None]
    >>> dets = decode_detections(logits, t["box"][None], stride=8)[0]
    >>> dets["boxes"][0].round().tolist(), int(dets["labels"][0])
    ([8.0, 16.0, 40.0, 48.0], 2)
"""

from __future__ import annotations

import math
import struct

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

__all__ = ["DetectionEncoder", "decode_detections"]


class DetectionEncoder:
    """Encodes boxes into fixed-shape dense targets for a ``size``×``size`` input at ``stride``."""

    def __init__(self, num_classes: int, size: int, stride: int = 8, radius: int = 1) -> None:
        if size % stride:
            raise ValueError(f"size {size} must be a multiple of stride {stride}")
        self.num_classes, self.size, self.stride, self.radius = num_classes, size, stride, radius
        self.grid = size // stride
        g, s = self.grid, stride
        self._centres = [(j + 0.5) * s for j in range(g)]  # cell centres in input pixels
        cells = torch.arange(g, dtype=torch.float32) + 0.5
        ys, xs = torch.meshgrid(cells * s, cells * s, indexing="ij")
        self._cell_x, self._cell_y = xs / s - 0.5, ys / s - 0.5  # (g, g): each cell's column and row

    def encode(self, boxes: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """``boxes`` (N, 4) in input pixels (x1, y1, x2, y2), ``labels`` (N,) in [0, K)."""
        g, s, k = self.grid, self.stride, self.num_classes
        boxes = boxes.float().reshape(-1, 4)
        labels = labels.long().reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"labels must be in [0, {k}), got {labels.tolist()}")
        heat = torch.zeros(k, g * g)
        box = torch.zeros(4, g, g)
        weight = torch.zeros(g, g)
        kept, peaks, centre_cells = [], [], []
        owner: dict[tuple[int, int], tuple[float, tuple[float, ...]]] = {}  # cell → (area, distances)
        centres = self._centres
        for n, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            w, h = x2 - x1, y2 - y1
            if w <= 0 or h <= 0:
                continue
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            kept.append(n)
            peaks.append((cx / s - 0.5, cy / s - 0.5, 2 * max(0.5, min(w, h) / (6 * s)) ** 2))
            ci, cj = min(g - 1, max(0, int(cy // s))), min(g - 1, max(0, int(cx // s)))
            centre_cells.append(ci * g + cj)
            area = _float32(w * h)  # areas compare in float32
            for i in range(max(0, ci - self.radius), min(g, ci + self.radius + 1)):
                for j in range(max(0, cj - self.radius), min(g, cj + self.radius + 1)):
                    px, py = centres[j], centres[i]
                    d = (px - x1, py - y1, x2 - px, y2 - py)
                    if min(d) <= 0 or area >= owner.get((i, j), (math.inf,))[0]:
                        continue
                    owner[(i, j)] = (area, d)  # the smaller box wins the cell
        if kept:
            gx, gy, two_var = torch.tensor(peaks).T.reshape(3, -1, 1, 1)
            gauss = torch.exp(-((self._cell_x - gx) ** 2 + (self._cell_y - gy) ** 2) / two_var).flatten(1)
            gauss[torch.arange(len(kept)), torch.tensor(centre_cells)] = 1.0
            channels = labels[kept, None].expand(-1, g * g)
            heat.scatter_reduce_(0, channels, gauss, "amax")  # where boxes overlap, the maximum
        if owner:
            rows, cols = (torch.tensor(v) for v in zip(*owner))
            box[:, rows, cols] = torch.log(torch.tensor([d for _, d in owner.values()]) / s).T
            weight[rows, cols] = 1.0
        return {
            "heatmap": heat.view(k, g, g),
            "box": box,
            "box_weight": weight,
            "num_objects": torch.tensor(float(len(labels))),
        }


def _float32(v: float) -> float:
    """``v`` rounded to float32."""
    return struct.unpack("f", struct.pack("f", v))[0]


@torch.no_grad()
def decode_detections(
    heatmap: Tensor,
    box: Tensor,
    stride: int,
    *,
    score_threshold: float = 0.05,
    top_k: int = 100,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
) -> list[dict[str, Tensor]]:
    """Scored boxes per image: ``[{"boxes": (D, 4) x1y1x2y2 in input pixels, "scores", "labels"}]``."""
    b, _k, h, w = heatmap.shape
    heat = torch.sigmoid(heatmap.float())
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    out = []
    centres_x = (torch.arange(w, device=heat.device, dtype=torch.float32) + 0.5) * stride
    centres_y = (torch.arange(h, device=heat.device, dtype=torch.float32) + 0.5) * stride
    dist = torch.exp(box.float().clamp(max=10.0)) * stride  # (B, 4, h, w)
    for i in range(b):
        scores, idx = peaks[i].flatten().topk(min(top_k, peaks[i].numel()))
        keep = scores > score_threshold
        scores, idx = scores[keep], idx[keep]
        labels = idx // (h * w)
        cell = idx % (h * w)
        yi, xi = cell // w, cell % w
        px, py = centres_x[xi], centres_y[yi]
        d = dist[i][:, yi, xi]
        boxes = torch.stack([px - d[0], py - d[1], px + d[2], py + d[3]], dim=1)
        kept = batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
        out.append({"boxes": boxes[kept], "scores": scores[kept], "labels": labels[kept]})
    return out
