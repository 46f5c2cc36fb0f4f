"""pytest-benchmark suite: the one-head model's inference on one 512×512 image, in parts.

    python -m pytest benchmarks/test_bench_inference.py --benchmark-only --benchmark-save=NAME
    python -m pytest benchmarks/test_bench_inference.py --benchmark-only --benchmark-compare
    python -m pytest benchmarks --benchmark-disable          # a smoke run (each case once)

Parts: the whole model; the bare backbone (timm's MobileNetV3-small, features only); the neck on the
backbone's maps (upsampling, concatenation, its two conv layers); the head on the neck's output (its
learnable layers and the parameter-free read-outs). The head's share of the whole model is measured
in one interleaved run by ``clreg.onehead.model.cpu_latency`` and kept in the report's extra info.
"""

from __future__ import annotations

import pytest

pytest.importorskip("timm", reason="the performance suite needs the benchmark extra (timm)")
pytest.importorskip("pytest_benchmark")

import torch

from clreg.onehead.model import UnifiedOneHead, cpu_latency

SIZE = 512


@pytest.fixture(scope="module")
def model() -> UnifiedOneHead:
    torch.manual_seed(0)
    return UnifiedOneHead(width=96).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _parts(model: UnifiedOneHead, x: torch.Tensor) -> dict:
    with torch.no_grad():
        feats = model.backbone(x)
        neck = model.neck_features(x)

    def neck_only() -> torch.Tensor:
        size = feats[0].shape[-2:]
        up = [torch.nn.functional.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]]
        return model.neck(torch.cat([feats[0], *up], 1))

    return {
        "model": lambda: model(x),
        "backbone": lambda: model.backbone(x),
        "neck": neck_only,
        "head": lambda: model.split(model.head(neck), x.shape[-2:]),
    }


@pytest.mark.parametrize("part", ["model", "backbone", "neck", "head"])
def test_inference_512(benchmark, model, image, part: str) -> None:
    benchmark.group = "one-head inference, 512×512, batch 1"
    fn = _parts(model, image)[part]
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=10, warmup_rounds=2)


def test_head_share(benchmark, model, image) -> None:
    """The head's share of the whole model's latency (median of interleaved repeats)."""
    benchmark.group = "one-head head share"
    lat = cpu_latency(model, size=SIZE, repeats=3, warmup=1)
    benchmark.extra_info.update(lat)
    assert 0 < lat["head_share"] < 1
    with torch.no_grad():
        benchmark.pedantic(lambda: model.split(model.head(model.neck_features(image)), image.shape[-2:]), rounds=1)
