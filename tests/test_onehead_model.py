"""The one-head model, its detection targets and decoding, its losses and checkpoints."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("timm", reason="the one-head benchmark needs the benchmark extra")

import torch
from torch.func import grad, vmap
from torchvision.ops import box_iou

from clreg.onehead import (
    DetectionEncoder,
    UnifiedOneHead,
    classification_loss,
    decode_detections,
    detection_loss,
    load_checkpoint,
    save_checkpoint,
    segmentation_loss,
)
from clreg.onehead.model import cpu_latency


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UnifiedOneHead(det_classes=10, seg_classes=21, cls_classes=10, width=32)


def test_outputs_are_slices_of_the_one_head_tensor(model) -> None:
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    t = model.head_tensor(x)
    sl = model.slices()
    assert out["seg"].shape == (2, 21, 64, 96)
    assert out["det"]["heatmap"].shape == (2, 10, 8, 12) and out["det"]["box"].shape == (2, 4, 8, 12)
    assert out["cls"].shape == (2, 10)
    torch.testing.assert_close(out["det"]["heatmap"], t[:, sl["heatmap"]])
    torch.testing.assert_close(out["cls"], t[:, sl["cls"]].mean((2, 3)))
    # every output depends on the head's last layer: its gradient reaches each slice of it
    for key in ("seg", "cls"):
        model.zero_grad()
        out = model(x)
        out[key].sum().backward()
        g = model.head[-1].weight.grad.abs().sum(dim=(1, 2, 3))
        assert (g[sl[key]] > 0).all() and (g[sl["heatmap"]] == 0).all()


def test_architecture_check_counts_layers_and_parameters() -> None:
    m = UnifiedOneHead()
    r = m.check_architecture()
    assert r["parameters"] < 8_000_000 and r["neck_layers"] == 2 and r["head_layers"] == 2
    assert r["parameters"] == sum(p.numel() for p in m.parameters())
    m.head.append(torch.nn.Conv2d(m.out_channels, m.out_channels, 1))
    m.head.append(torch.nn.Conv2d(m.out_channels, m.out_channels, 1))
    with pytest.raises(ValueError, match="learnable layers"):
        m.check_architecture()
    assert UnifiedOneHead(cls_classes=30, width=16).eval()(torch.randn(1, 3, 64, 64))["cls"].shape == (1, 30)


def test_backbone_weights_errors_and_loading(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="backbone weights file not found"):
        UnifiedOneHead(backbone_weights=tmp_path / "none.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="does not fit"):
        UnifiedOneHead(backbone_weights=bad)
    src = UnifiedOneHead(width=16)
    good = tmp_path / "good.pth"
    torch.save(src.backbone.state_dict(), good)
    dst = UnifiedOneHead(width=16, backbone_weights=good)
    for (k, a), b in zip(src.backbone.state_dict().items(), dst.backbone.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_round_trip(tmp_path, model) -> None:
    path = tmp_path / "m.pt"
    names = {
        "det": [f"d{i}" for i in range(10)],
        "seg": [f"s{i}" for i in range(21)],
        "cls": [f"c{i}" for i in range(10)],
    }
    save_checkpoint(model, path, class_names=names, category_map={"d0": 1}, input_size=64)
    loaded, meta = load_checkpoint(path)
    assert meta["class_names"] == names and meta["input_size"] == 64 and meta["category_map"] == {"d0": 1}
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(loaded(x)["cls"], model(x)["cls"])
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_encode_decode_round_trip_recovers_boxes() -> None:
    enc = DetectionEncoder(num_classes=4, size=128, stride=8)
    boxes = torch.tensor([[10.0, 12.0, 60.0, 50.0], [70.0, 64.0, 120.0, 126.0], [30.0, 80.0, 46.0, 96.0]])
    labels = torch.tensor([0, 3, 1])
    t = enc.encode(boxes, labels)
    assert int(t["num_objects"]) == 3 and t["box_weight"].sum() >= 3
    logits = torch.logit(t["heatmap"].clamp(1e-4, 1 - 1e-4))[None]
    det = decode_detections(logits, t["box"][None], stride=8)[0]
    ious = box_iou(det["boxes"], boxes)
    best = ious.max(0)
    assert (best.values > 0.999).all()
    assert det["labels"][best.indices].tolist() == labels.tolist()
    with pytest.raises(ValueError, match="labels must be in"):
        enc.encode(boxes, torch.tensor([0, 4, 1]))


def test_encoder_targets_by_hand() -> None:
    """Stride 8 on 32 px (a 4×4 grid, cell centres 4, 12, 20, 28): a big box of class 0 and a small
    box of class 1 that share cells; the smaller box owns the shared cells, the heatmap keeps the
    maximum, and a degenerate box counts as an object but writes nothing."""
    enc = DetectionEncoder(num_classes=2, size=32, stride=8)
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 24.0, 24.0], [5.0, 5.0, 5.0, 9.0]])
    t = enc.encode(boxes, torch.tensor([0, 1, 1]))
    assert int(t["num_objects"]) == 3
    # big box: centre (16, 16) → cell (2, 2); σ = max(0.5, 32 / 48) = 2/3 cell; peak 1 at its cell
    sigma = 2 / 3
    expected = math.exp(-((0 - 1.5) ** 2 + (0 - 1.5) ** 2) / (2 * sigma**2))
    assert t["heatmap"][0, 0, 0].item() == pytest.approx(expected, rel=1e-6)
    assert t["heatmap"][0, 2, 2] == 1.0 and t["heatmap"][1, 2, 2] == 1.0
    # small box (area 256) claims the cells whose centres lie inside it: (1..2, 1..2); the big box
    # (area 1024) keeps the rest of its 3×3 neighbourhood around (2, 2)
    small_cells = {(1, 1), (1, 2), (2, 1), (2, 2)}
    big_cells = {(i, j) for i in (1, 2, 3) for j in (1, 2, 3)} - small_cells
    assert {tuple(ij) for ij in t["box_weight"].nonzero().tolist()} == small_cells | big_cells
    for i, j in small_cells:
        cx, cy = 8 * j + 4, 8 * i + 4
        d = torch.tensor([cx - 8.0, cy - 8.0, 24.0 - cx, 24.0 - cy])
        torch.testing.assert_close(t["box"][:, i, j], torch.log(d / 8))
    for i, j in big_cells:
        cx, cy = 8 * j + 4, 8 * i + 4
        d = torch.tensor([cx - 0.0, cy - 0.0, 32.0 - cx, 32.0 - cy])
        torch.testing.assert_close(t["box"][:, i, j], torch.log(d / 8))
    # two boxes of equal area: the first one listed keeps the shared cell
    t = enc.encode(torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 24.0, 24.0]]), torch.tensor([0, 1]))
    torch.testing.assert_close(t["box"][:, 1, 1], torch.log(torch.tensor([12.0, 12.0, 4.0, 4.0]) / 8))


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


def test_cpu_latency_reports_head_share(model) -> None:
    lat = cpu_latency(model, size=64, repeats=2, warmup=1)
    assert 0 < lat["head_ms"] < lat["model_ms"] and 0 < lat["head_share"] < 1


def test_reset_task_outputs_puts_one_task_at_its_prior_and_leaves_the_others():
    torch.manual_seed(0)
    model = UnifiedOneHead(det_classes=3, seg_classes=5, cls_classes=4, width=16).eval()
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    model.reset_task_outputs("det")
    after = model(x)
    torch.testing.assert_close(after["det"]["heatmap"], torch.full_like(after["det"]["heatmap"], -2.19))
    torch.testing.assert_close(after["det"]["box"], torch.zeros_like(after["det"]["box"]))
    torch.testing.assert_close(after["seg"], before["seg"])
    torch.testing.assert_close(after["cls"], before["cls"])
    model.reset_task_outputs("cls")
    torch.testing.assert_close(model(x)["cls"], torch.zeros(2, 4))
    with pytest.raises(ValueError, match="task must be one of"):
        model.reset_task_outputs("depth")
