"""pytest-benchmark suite: the training step per regularizer and mode, and the Fisher estimators.

    python -m pytest benchmarks --benchmark-only            # the measurements
    python -m pytest benchmarks --benchmark-disable         # a smoke run (each case once)

The ratios with intervals taken in one interleaved run come from ``benchmarks/step_overhead.py``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("timm", reason="the performance suite needs the benchmark extra (timm)")
pytest.importorskip("pytest_benchmark")

import torch

import protocol
from clreg.functional import fisher_diagonal


@pytest.fixture(scope="module")
def variants():
    return {v.name: v for v in protocol.build_all()}


@pytest.mark.parametrize("name", protocol.VARIANTS + protocol.AVALANCHE_VARIANTS)
def test_training_step(benchmark, variants, name: str) -> None:
    if name not in variants:
        pytest.skip("Avalanche's plugins need avalanche-lib (pip install clreg[avalanche])")
    benchmark.group = "training step"
    benchmark.pedantic(variants[name].step, rounds=30, warmup_rounds=3)


@pytest.mark.parametrize(
    ("estimator", "vectorize"),
    [(e, v) for e in ("empirical", "mc", "exact") for v in (True, False)] + [("batched", None)],
)
def test_fisher(benchmark, estimator: str, vectorize: bool | None) -> None:
    benchmark.group = f"fisher {estimator}"
    torch.manual_seed(0)
    model = protocol.Net()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(8, 3, protocol.SIZE, protocol.SIZE, generator=g),
        torch.randint(0, protocol.CLASSES, (8,), generator=g),
    )
    benchmark.pedantic(
        lambda: fisher_diagonal(model, data, estimator=estimator, vectorize=vectorize, batch_size=8),
        rounds=3,
        warmup_rounds=1,
    )
