"""The curvature engine's Kronecker factors and diagonal Fisher against independent implementations:
curvlinops' ``KFACLinearOperator`` (factors) and BackPACK's ``DiagGGNExact`` / ``BatchGrad`` (the
diagonal), in float64, and against A and G written from their definitions.

Conversions (clreg: means over samples; the libraries: sums, with ``reduction="sum"``):

* A: both libraries and clreg average the input's outer product over a layer's locations and over the
  samples (curvlinops' "expand" K-FAC with ``separate_weight_and_bias=False`` appends the bias's 1 last,
  as clreg does): equal as they come.
* G: curvlinops sums g gᵀ over samples and output locations; clreg's G is the mean over samples, and for
  a dense output (n locations per sample) of the location-mean log-likelihood (the per-location Fisher
  convention), so ``G_clreg = G_curvlinops / (N · n)``, with n = 1 for (B, C) logits.
* The diagonal: BackPACK sums over samples, so ``F_clreg = diag_ggn_exact / N`` and the empirical one is
  the mean over samples of BackPACK's squared per-sample gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import clreg
from clreg.functional import fisher_curvature, fisher_diagonal

curvlinops = pytest.importorskip("curvlinops")
backpack = pytest.importorskip("backpack")

ESTIMATORS = {"exact": "type-2", "empirical": "empirical"}  # clreg's name → curvlinops' fisher_type


class ToClassesFirst(nn.Module):
    """(B, L, V) token logits → (B, V, L), the layout ``CrossEntropyLoss`` reads (no parameters)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.transpose(1, 2)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()


def cnn() -> nn.Module:
    """Two ungrouped convolutions (padding, stride, a bias each) whose last output is dense logits."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Conv2d(3, 4, 2)).double()


def classification_data(n: int = 12) -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g))


def dense_data(n: int = 6) -> TensorDataset:
    """Inputs (N, 2, 7, 7); the CNN gives (N, 4, 3, 3) logits, labels per location."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, 7, 7, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.randint(0, 4, (n, 3, 3), generator=g))


def reference_factors(model: nn.Module, data: TensorDataset, fisher_type: str, mc_samples: int = 1) -> dict:
    """curvlinops' (A, G) per layer, ``reduction="sum"``, the whole data as one batch."""
    x, y = data.tensors
    op = curvlinops.KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        [p for p in model.parameters()],
        [(x, y)],
        fisher_type=fisher_type,
        mc_samples=mc_samples,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    state = op.state_dict()
    return {name: (state["input_covariances"][name], state["gradient_covariances"][name]) for name in op._mapping}


def locations(model: nn.Module, data: TensorDataset) -> int:
    with torch.no_grad():
        out = model(data.tensors[0][:1])
    return out[0, 0].numel()


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_mlp_factors_equal_curvlinops(estimator: str) -> None:
    model, data = mlp(), classification_data()
    ours = fisher_curvature(model, data, estimator=estimator).factors
    ref = reference_factors(model, data, ESTIMATORS[estimator])
    n = len(data)
    assert sorted(ours) == sorted(ref) == ["0", "2"]
    for name, (a_ref, g_ref) in ref.items():
        a, g = ours[name]
        torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, g_ref / n, rtol=1e-10, atol=1e-12)


def test_cnn_empirical_factors_equal_curvlinops_with_location_scaling() -> None:
    """Dense logits: A averaged over each layer's locations, G = G_curvlinops / (N · output locations)."""
    model, data = cnn(), dense_data()
    ours = fisher_curvature(model, data, estimator="empirical").factors
    ref = reference_factors(model, data, "empirical")
    scale = len(data) * locations(model, data)
    for name, (a_ref, g_ref) in ref.items():
        a, g = ours[name]
        torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, g_ref / scale, rtol=1e-10, atol=1e-12)


def test_token_logits_empirical_factors_equal_curvlinops() -> None:
    """A Linear on a sequence (B, L, d) giving token logits (B, L, V), classes last: A averaged over the
    L positions, G = G_curvlinops / (N · L)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 6)).double()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 7, 3, generator=g, dtype=torch.float64), torch.randint(0, 6, (4, 7), generator=g)
    ours = fisher_curvature(model, TensorDataset(x, y), estimator="empirical", outputs=clreg.OutputSpec(class_dim=-1))
    ref = reference_factors(nn.Sequential(model, ToClassesFirst()), TensorDataset(x, y), "empirical")
    for name, (a_ref, g_ref) in ref.items():
        a, g_ = ours.factors[name.removeprefix("0.")]
        torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_, g_ref / (4 * 7), rtol=1e-10, atol=1e-12)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_mlp_mc_factors_converge_to_curvlinops_type2() -> None:
    """``mc`` with K draws: A equal at any K; G within 3 % of the exact (type-2) G at K = 2000 (its
    relative error measured 0.5–1.6 % over four seeds; 21–54 % at K = 1)."""
    model, data = mlp(), classification_data()
    ref = reference_factors(model, data, "type-2")
    ours = fisher_curvature(model, data, estimator="mc", mc_samples=2000).factors
    for name, (a_ref, g_ref) in ref.items():
        a, g = ours[name]
        torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-12)
        assert relative_error(g, g_ref / len(data)) < 0.03, name


def test_cnn_mc_factors_converge_to_curvlinops() -> None:
    """Dense logits, labels drawn per location, 2000 draws per sample: the output layer's G (whose
    locations do not mix) within 3 % of curvlinops' exact one (measured 0.5–0.6 % over three seeds).
    The hidden layer's G, where locations mix, within 5 % of curvlinops' own MC estimate (measured
    0.6–0.8 %): both are unbiased for the same expectation, in which the cross terms between
    independently drawn locations vanish; curvlinops' type-2 G keeps the cross terms between the
    locations of one column of the Hessian's square root (74 % away from the MC expectation here)."""
    model, data = cnn(), dense_data()
    scale = len(data) * locations(model, data)
    ours = fisher_curvature(model, data, estimator="mc", mc_samples=2000).factors
    exact = reference_factors(model, data, "type-2")
    mc = reference_factors(model, data, "mc", mc_samples=2000)
    for name in ("0", "2"):
        torch.testing.assert_close(ours[name][0], exact[name][0], rtol=1e-10, atol=1e-12)
    assert relative_error(ours["2"][1], exact["2"][1] / scale) < 0.03
    assert relative_error(ours["0"][1], mc["0"][1] / scale) < 0.05


@pytest.mark.parametrize("classes", [3, 4, 7])
@pytest.mark.parametrize(("estimator", "draws"), [("exact", 1), ("mc", 1), ("mc", 4), ("empirical", 1)])
def test_input_factor_is_the_mean_outer_product_whatever_the_passes(classes: int, estimator: str, draws: int) -> None:
    """A = mean over samples of a aᵀ, written here, whatever the number of backward passes per sample
    (``exact``: one per class; ``mc``: one per draw)."""
    torch.manual_seed(classes)
    model = nn.Sequential(nn.Linear(5, classes, bias=False)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, classes, (20,))
    a, _ = fisher_curvature(model, TensorDataset(x, y), estimator=estimator, mc_samples=draws).factors["0"]
    torch.testing.assert_close(a, x.T @ x / 20, rtol=1e-12, atol=1e-12)


def test_exact_output_factor_is_the_softmax_hessian() -> None:
    """For a linear-softmax layer, G = mean over samples of diag p − p pᵀ."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 4, bias=False)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 4, (20,))
    _, g = fisher_curvature(model, TensorDataset(x, y), estimator="exact").factors["0"]
    p = torch.softmax(model(x), 1).detach()
    torch.testing.assert_close(g, (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0))


# -- the diagonal against BackPACK --------------------------------------------------------------------


def grouped_cnn() -> nn.Module:
    """A depthwise and a grouped convolution (no factors: diagonal only), then a classifier."""
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, groups=2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 3),
    ).double()


def embedding_model() -> nn.Module:
    """In float32: BackPACK's embedding GGN does not run in float64."""
    torch.manual_seed(8)
    return nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(12, 3))


def image_data() -> TensorDataset:
    g = torch.Generator().manual_seed(9)
    return TensorDataset(
        torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    )


def token_data() -> TensorDataset:
    g = torch.Generator().manual_seed(10)
    return TensorDataset(torch.randint(0, 7, (6, 4), generator=g), torch.randint(0, 3, (6,), generator=g))


def backpack_diagonals(model: nn.Module, data: TensorDataset) -> tuple[dict, dict]:
    """(Σ_n diag GGN, Σ_n per-sample gradient²) by BackPACK, per parameter name."""
    from backpack import backpack as backpack_context
    from backpack import extend
    from backpack.extensions import BatchGrad, DiagGGNExact

    x, y = data.tensors
    ext = extend(model)
    loss = extend(nn.CrossEntropyLoss(reduction="sum"))(ext(x), y)
    with backpack_context(DiagGGNExact(), BatchGrad()):
        loss.backward()
    named = dict(ext.named_parameters())
    ggn = {n: p.diag_ggn_exact.detach().clone() for n, p in named.items()}
    squares = {n: p.grad_batch.detach().square().sum(0) for n, p in named.items()}
    return ggn, squares


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize(("make_model", "make_data"), [(grouped_cnn, image_data), (embedding_model, token_data)])
@pytest.mark.parametrize("engine", ["layers", "per_sample"])
def test_diagonal_equals_backpack(make_model, make_data, engine: str) -> None:
    """``exact`` equals BackPACK's exact GGN diagonal / N and ``empirical`` its squared per-sample
    gradients' mean, on depthwise and grouped convolutions and an embedding, on both engines."""
    model, data = make_model(), make_data()
    exact = fisher_diagonal(model, data, estimator="exact", engine=engine)
    empirical = fisher_diagonal(model, data, estimator="empirical", engine=engine)
    ggn, squares = backpack_diagonals(model, data)
    n = len(data)
    tol = {"rtol": 1e-9, "atol": 1e-14} if next(model.parameters()).dtype == torch.float64 else {}
    for name in ggn:
        torch.testing.assert_close(exact[name], ggn[name] / n, **tol)
        torch.testing.assert_close(empirical[name], squares[name] / n, **tol)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_mc_diagonal_converges_to_backpack_exact() -> None:
    """``mc`` at 2000 draws per sample within 3 % (relative, over the whole diagonal) of BackPACK's exact GGN."""
    model, data = grouped_cnn(), image_data()
    mc = fisher_diagonal(model, data, estimator="mc", mc_samples=2000)
    ggn, _ = backpack_diagonals(model, data)
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(ggn)])  # noqa: E731
    assert relative_error(flat(mc), flat(ggn) / len(data)) < 0.03
