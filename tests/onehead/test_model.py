"""The one-head model: one head tensor, the architecture rules, backbone weights, checkpoints, latency, task priors."""

from __future__ import annotations

import pytest

pytest.importorskip("timm", reason="the one-head benchmark needs the benchmark extra")
import torch

from clreg.onehead import (
    UnifiedOneHead,
    load_checkpoint,
    save_checkpoint,
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


_HUB_SCRIPT = """
import sys, torch
from clreg.onehead import UnifiedOneHead
model = UnifiedOneHead(width=16, pretrained=True)
want = torch.load(sys.argv[1], weights_only=True)
got = model.backbone.state_dict()
same = [k for k in got if k in want and torch.equal(got[k], want[k])]
print(len(same), len(got))
"""


def _hub_cache(root, state) -> None:
    """``state`` as timm's ImageNet checkpoint in the Hugging Face hub's cache layout under ``root``."""
    from safetensors.torch import save_file

    repo = root / "models--timm--mobilenetv3_small_100.lamb_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, repo / "snapshots" / commit / "model.safetensors")


def test_pretrained_weights_load_offline_from_the_hubs_cache_and_fail_clearly_without(tmp_path) -> None:
    """``--pretrained`` takes the path a download takes: offline (``HF_HUB_OFFLINE=1``) it reads the
    hub's local cache; with an empty cache it fails with a message that points to --backbone-weights."""
    import os
    import subprocess
    import sys

    import timm

    torch.manual_seed(3)
    full = timm.create_model("mobilenetv3_small_100", pretrained=False).state_dict()
    _hub_cache(tmp_path / "hub", full)
    torch.save(full, tmp_path / "want.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    run = [sys.executable, "-c", _HUB_SCRIPT, str(tmp_path / "want.pt")]
    r = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    same, total = map(int, r.stdout.split())
    assert same == total > 100  # every backbone tensor is the cached checkpoint's
    empty = {**env, "HF_HUB_CACHE": str(tmp_path / "empty")}
    cli = [sys.executable, "-m", "clreg.onehead", "--profile", "tiny", "--pretrained", "--out", str(tmp_path / "o")]
    r = subprocess.run(cli, env=empty, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "could not fetch ImageNet weights" in r.stderr and "--backbone-weights" in r.stderr
