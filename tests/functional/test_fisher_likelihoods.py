"""The ``mc`` Fisher of sigmoid (Bernoulli) and regression (unit Gaussian) outputs against the
per-location Fisher written from its definition, on a 1 × 1 convolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from clreg import OutputSpec
from clreg.functional import fisher_diagonal, resolve_estimator
from clreg.functional.likelihoods import standard_normal

DRAWS = 3000


def conv_and_data() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Conv2d(2, 3, 1).double()
    return model, torch.randn(5, 2, 4, 4, dtype=torch.float64)


def relative_error(ours: dict, ref: dict) -> float:
    a = torch.cat([ours[k].flatten() for k in sorted(ref)])
    b = torch.cat([ref[k].flatten() for k in sorted(ref)])
    return float((a - b).norm() / b.norm())


def test_sigmoid_mc_converges_to_the_bernoulli_fisher() -> None:
    """F_W[c, i] = mean_n mean_l σ(1 − σ)_{c,l} x_{i,l}², F_b[c] = mean_n mean_l σ(1 − σ)_{c,l}."""
    model, x = conv_and_data()
    data = TensorDataset(x, torch.zeros(len(x)))
    ours = fisher_diagonal(model, data, outputs=OutputSpec(kind="sigmoid"), estimator="mc", mc_samples=DRAWS)
    with torch.no_grad():
        p = torch.sigmoid(model(x)).flatten(2)  # (N, C, L)
    v, xs = p * (1 - p), x.flatten(2)  # (N, C, L), (N, I, L)
    ref = {"weight": torch.einsum("ncl,nil->ci", v, xs.square())[:, :, None, None] / (16 * 5), "bias": v.mean((0, 2))}
    assert relative_error(ours, ref) < 0.03


@pytest.mark.parametrize("weighted", [False, True])
def test_regression_mc_converges_to_the_gaussian_fisher(weighted: bool) -> None:
    """Unit-variance Gaussian: F_W[c, i] = mean_n Σ_l w_l x_{i,l}² / Σ_l w_l (the same for every c),
    F_b[c] = 1; unweighted, w_l = 1."""
    model, x = conv_and_data()

    class WithWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = model

        def forward(self, t: torch.Tensor) -> dict:
            return {"box": self.conv(t), "w": t[:, :1].abs()}  # a weight per location, from the input

    net = WithWeight()
    spec = OutputSpec(select="box", kind="regression", weight="w" if weighted else None)
    data = TensorDataset(x, torch.zeros(len(x)))
    ours = fisher_diagonal(net, data, outputs=spec, estimator="mc", mc_samples=DRAWS)
    w = x[:, :1].abs().flatten(2) if weighted else torch.ones(5, 1, 16, dtype=torch.float64)
    xs = x.flatten(2)
    per_input = ((w * xs.square()).sum(2) / w.sum(2)).mean(0)  # (I,)
    ref = {"conv.weight": per_input.expand(3, 2)[:, :, None, None], "conv.bias": torch.ones(3, dtype=torch.float64)}
    assert relative_error(ours, ref) < 0.03


def test_the_engines_agree_on_drawn_likelihoods() -> None:
    model, x = conv_and_data()
    data = TensorDataset(x, torch.zeros(len(x)))
    for kind in ("sigmoid", "regression"):
        a = fisher_diagonal(model, data, outputs=OutputSpec(kind=kind), estimator="mc", mc_samples=3, engine="layers")
        b = fisher_diagonal(
            model, data, outputs=OutputSpec(kind=kind), estimator="mc", mc_samples=3, engine="per_sample"
        )
        for k in a:
            torch.testing.assert_close(a[k], b[k])


def test_sigmoid_and_regression_take_mc_by_default_and_refuse_the_others() -> None:
    model, x = conv_and_data()
    data = TensorDataset(x, torch.zeros(len(x)))
    assert resolve_estimator(model, data, outputs=OutputSpec(kind="sigmoid")) == "mc"
    for estimator in ("exact", "empirical", "batched"):
        with pytest.raises(ValueError, match="takes estimator 'mc'"):
            fisher_diagonal(model, data, outputs=OutputSpec(kind="regression"), estimator=estimator)


def test_standard_normal_draws_have_the_normal_moments() -> None:
    e = standard_normal(torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert abs(float(e.mean())) < 0.01 and abs(float(e.var()) - 1) < 0.01 and abs(float((e**4).mean()) - 3) < 0.05
