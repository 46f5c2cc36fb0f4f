"""The three task losses: per sample, vmap-safe, equal to their definitions."""

from __future__ import annotations

import pytest

pytest.importorskip("timm", reason="the one-head benchmark needs the benchmark extra")
import torch
from torch.func import grad, vmap

from clreg.onehead import (
    DetectionEncoder,
    UnifiedOneHead,
    classification_loss,
    detection_loss,
    segmentation_loss,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UnifiedOneHead(det_classes=10, seg_classes=21, cls_classes=10, width=32)


def test_segmentation_loss_is_the_pixel_mean_cross_entropy_in_either_layout() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 6, 7, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (3, 6, 7), generator=g)
    target[0, :2] = 255
    target[2] = 255  # a sample with no labelled pixel scores 0
    ref = logits.clone().requires_grad_()
    expected = torch.stack(
        [
            torch.nn.functional.cross_entropy(ref[i : i + 1], target[i : i + 1], ignore_index=255)
            if (target[i] != 255).any()
            else ref.new_zeros(())
            for i in range(3)
        ]
    )
    expected.sum().backward()
    for layout in (torch.contiguous_format, torch.channels_last):
        x = logits.clone().contiguous(memory_format=layout).requires_grad_()
        got = segmentation_loss({"seg": x}, target)
        torch.testing.assert_close(got.double(), expected.detach())
        got.sum().backward()
        torch.testing.assert_close(x.grad, ref.grad)


def test_losses_are_per_sample_and_vmap_safe(model) -> None:
    enc = DetectionEncoder(num_classes=10, size=64, stride=8)
    targets = [
        enc.encode(torch.tensor([[4.0, 4.0, 30.0, 40.0]]), torch.tensor([2])),
        enc.encode(torch.zeros(0, 4), torch.zeros(0)),
    ]
    det_t = {k: torch.stack([t[k] for t in targets]) for k in targets[0]}
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    seg_t = torch.randint(0, 21, (2, 64, 64))
    seg_t[:, :8] = 255
    for loss, tgt in ((segmentation_loss, seg_t), (detection_loss, det_t), (classification_loss, torch.tensor([1, 2]))):
        per = loss(out, tgt)
        assert per.shape == (2,) and torch.isfinite(per).all()
        # per-sample: the loss of a batch equals the losses of its samples
        one = loss(
            {k: (v[:1] if torch.is_tensor(v) else {kk: vv[:1] for kk, vv in v.items()}) for k, v in out.items()},
            tgt[:1] if torch.is_tensor(tgt) else {k: v[:1] for k, v in tgt.items()},
        )
        torch.testing.assert_close(one, per[:1])
    # a perfect heatmap and box prediction gives a near-zero detection loss
    perfect = {"det": {"heatmap": torch.logit(det_t["heatmap"].clamp(1e-6, 1 - 1e-6)), "box": det_t["box"]}}
    assert detection_loss(perfect, det_t).max() < 0.05
    # vmap over samples with B = 1 inside (the form the Fisher uses)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    model.eval()

    def f(p, xi, ti):
        o = torch.func.functional_call(model, (p, buffers), (xi[None],))
        return detection_loss(o, {k: v[None] for k, v in ti.items()})[0]

    g = vmap(grad(f), in_dims=(None, 0, 0))(params, x, det_t)
    assert g["head.2.weight"].shape[0] == 2
