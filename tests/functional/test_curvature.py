"""The curvature engine against per-sample autograd loops (float64): each layer type's squared
per-sample gradients, the Kronecker factors against their definitions, the exact Fisher through the
output Hessian's square root, and the engine inside ``fisher_diagonal`` against the per-sample path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import clreg
from clreg import OutputSpec
from clreg.functional import fisher_diagonal
from clreg.functional.curvature import CurvatureEngine, rule_for
from clreg.functional.curvature import layers as layers_module
from clreg.functional.curvature.layers import Call
from models import MultiHead


def _loop_square_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ_n (∂ log p(y_n | x_n) / ∂θ)², one backward per sample (the reference)."""
    params = dict(model.named_parameters())
    out = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(x.shape[0]):
        z = model(x[i : i + 1]).reshape(1, -1)
        logp = F.log_softmax(z, dim=1)[0, y[i]]
        for (k, _), g in zip(params.items(), torch.autograd.grad(logp, list(params.values()))):
            out[k] += g.square()
    return out


def _engine_square_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 3) -> dict:
    """The engine's sums for the same objective (the empirical log-likelihood of y), no division."""

    def objective(out, target, extra):
        v = F.log_softmax(out.reshape(1, -1), dim=1)[0, target[0]].reshape(1)
        return v, torch.ones_like(v)

    engine = CurvatureEngine(model)
    assert engine.fallback == []
    sums = engine.run(TensorDataset(x, y), objective, chunk_size=chunk)
    assert sums.n == x.shape[0]
    return sums.diagonal


def _close(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k].to(a[k].dtype), rtol=1e-9, atol=1e-12, msg=k)


class Seq(nn.Module):
    """Layers then a flatten: the whole output is one softmax."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x).flatten(1)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 5),
    d_in=st.integers(1, 5),
    d_out=st.integers(1, 4),
    t=st.sampled_from([None, 1, 3]),
    bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_linear_square_sums_equal_a_per_sample_loop(n, d_in, d_out, t, bias, seed) -> None:
    torch.manual_seed(seed)
    model = Seq(nn.Linear(d_in, d_out, bias=bias)).double()
    x = torch.randn(n, d_in, dtype=torch.float64) if t is None else torch.randn(n, t, d_in, dtype=torch.float64)
    y = torch.randint(0, d_out * (t or 1), (n,))
    _close(_loop_square_sum(model, x, y), _engine_square_sum(model, x, y))


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 4),
    groups=st.sampled_from([1, 2]),
    per_group=st.integers(1, 2),
    mult=st.integers(1, 2),
    k=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    bias=st.booleans(),
    depthwise=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_conv2d_square_sums_equal_a_per_sample_loop(n, groups, per_group, mult, k, stride, bias, depthwise, seed):
    torch.manual_seed(seed)
    c_in = groups * per_group
    groups = c_in if depthwise else groups
    conv = nn.Conv2d(c_in, groups * mult if depthwise else groups * mult * 2, k, stride=stride, padding=k // 2,
                     groups=groups, bias=bias)  # fmt: skip
    model = Seq(conv).double()
    x = torch.randn(n, c_in, 5, 4, dtype=torch.float64)
    y = torch.randint(0, model(x[:1]).shape[1], (n,))
    _close(_loop_square_sum(model, x, y), _engine_square_sum(model, x, y))


@pytest.mark.parametrize(
    ("c_in", "c_out", "k", "stride", "dilation", "padding", "groups", "form"),
    [
        (6, 5, 1, 2, 1, 0, 1, "strided input"),  # a 1 × 1 convolution
        (4, 8, 5, 2, 1, 2, 4, "convolution"),  # depthwise with a channel multiplier of 2
        (3, 4, 3, 2, 2, 1, 1, "convolution"),  # a stem: 3 · 3² = 27 weights per output channel
        (6, 4, 3, 1, 1, 1, 2, "convolution"),  # grouped, 3 · 3² = 27 per output channel
        (8, 4, 3, 1, 2, 2, 1, "unfold"),  # 8 · 3² = 72
        (4, 6, 5, 2, 1, 0, 2, "unfold"),  # 2 · 5² = 50
    ],
)
def test_each_form_of_a_convolutions_per_sample_gradients_equals_a_loop(
    c_in, c_out, k, stride, dilation, padding, groups, form
) -> None:
    """The 1 × 1 strided-input form, the grouped-convolution form and the unfolded one, each against a
    per-sample loop (float64), with strides, dilations, paddings, groups and odd sizes."""
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, dilation=dilation, padding=padding, groups=groups)
    model = Seq(conv).double()
    x = torch.randn(3, c_in, 11, 10, dtype=torch.float64)
    y = torch.randint(0, model(x[:1]).shape[1], (3,))
    _close(_loop_square_sum(model, x, y), _engine_square_sum(model, x, y))
    per_channel = conv.weight.shape[1:].numel()
    taken = ("strided input" if k == 1 and padding == 0 and groups == 1
             else "convolution" if per_channel <= layers_module._CONV_FORM_MAX else "unfold")  # fmt: skip
    assert taken == form


@pytest.mark.parametrize(
    "norm",
    [
        lambda: nn.BatchNorm2d(3).eval(),
        lambda: nn.GroupNorm(3, 6),
        lambda: nn.LayerNorm([4, 4]),
        lambda: nn.LayerNorm(4, bias=False),
    ],
)
def test_norm_affine_square_sums_equal_a_per_sample_loop(norm) -> None:
    torch.manual_seed(0)
    layer = norm()
    channels = 6 if isinstance(layer, nn.GroupNorm) else 3
    model = Seq(nn.Conv2d(2, channels, 3, padding=1), layer, nn.ReLU(inplace=True)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.3, 0.3)
            layer.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, model(x[:1]).shape[1], (5,))
    _close(_loop_square_sum(model, x, y), _engine_square_sum(model, x, y, chunk=2))


def test_embedding_square_sums_equal_a_per_sample_loop_with_repeats_and_padding() -> None:
    torch.manual_seed(0)

    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 3, padding_idx=0)
            self.out = nn.Linear(3, 5)

        def forward(self, idx):
            return self.out(self.emb(idx).mean(1))

    model = Emb().double()
    idx = torch.tensor([[1, 1, 2, 0], [3, 0, 0, 3], [6, 5, 4, 1]])  # repeated rows and padding
    y = torch.tensor([0, 3, 4])
    _close(_loop_square_sum(model, idx, y), _engine_square_sum(model, idx, y, chunk=2))


def test_a_layer_used_twice_or_sharing_a_weight_takes_the_right_path() -> None:
    """A layer called twice sums its calls' per-sample gradients before squaring; a weight shared
    between two layers takes the per-sample path; the result equals the loop either way."""
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
            self.c = nn.Linear(4, 4)
            self.c.weight = self.a.weight  # shared

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))) + self.c(x))

    model = Twice().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    engine = CurvatureEngine(model)
    assert engine.fallback == ["a.weight"]  # shared by a and c: the per-sample path
    ref = _loop_square_sum(model, x, y)
    data = TensorDataset(x, y)
    got = fisher_diagonal(model, data, estimator="empirical", engine="layers")
    want = fisher_diagonal(model, data, estimator="empirical", engine="per_sample")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got[k], ref[k] / 6, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("estimator", ["exact", "mc", "empirical"])
def test_the_engine_inside_fisher_diagonal_equals_the_per_sample_path(estimator) -> None:
    torch.manual_seed(0)
    model = MultiHead().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, 5, 5, generator=g, dtype=torch.float64)
    kw = dict(outputs=OutputSpec(select="cls"), estimator=estimator, mc_samples=2, seed=3)
    cls = TensorDataset(x, torch.randint(0, 3, (7,), generator=g))
    want = fisher_diagonal(model, cls, engine="per_sample", **kw)
    got = fisher_diagonal(model, cls, engine="layers", chunk_size=3, **kw)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=2e-6, atol=1e-9, msg=k)


@pytest.mark.parametrize("estimator", ["mc", "empirical"])
def test_the_engine_on_dense_logits_with_an_ignore_index(estimator) -> None:
    torch.manual_seed(0)
    model = MultiHead().double()
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 4, (5, 5, 5), generator=g)
    y[:, 0] = 255
    data = TensorDataset(torch.randn(5, 3, 5, 5, generator=g, dtype=torch.float64), y)
    kw = dict(outputs=OutputSpec(select="seg", ignore_index=255), estimator=estimator, seed=1)
    want = fisher_diagonal(model, data, engine="per_sample", **kw)
    got = fisher_diagonal(model, data, engine="layers", chunk_size=2, **kw)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=k)


def test_exact_through_the_output_hessians_square_root_equals_the_class_sum() -> None:
    """Σ_c p_c g_c² by a loop over samples and classes equals the engine's one backward per class of
    √p_c (e_c − p)."""
    torch.manual_seed(0)
    model = Seq(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    params = dict(model.named_parameters())
    ref = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(6):
        logp = F.log_softmax(model(x[i : i + 1]), dim=1)[0]
        for c in range(3):
            gs = torch.autograd.grad(logp[c], list(params.values()), retain_graph=True)
            for (k, _), gc in zip(params.items(), gs):
                ref[k] += logp[c].exp().detach() * gc.square()
    got = fisher_diagonal(model, TensorDataset(x, torch.zeros(6, dtype=torch.long)), estimator="exact",
                          engine="layers")  # fmt: skip
    for k in ref:
        torch.testing.assert_close(got[k].double(), ref[k] / 6, rtol=1e-6, atol=1e-10, msg=k)


def test_kronecker_factors_equal_their_definitions_and_the_exact_block_for_one_sample() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])

    def objective(out, target, extra):
        v = F.log_softmax(out, dim=1)[0, target[0]].reshape(1)
        return v, torch.ones_like(v)

    sums = CurvatureEngine(lin, kfac=True).run(TensorDataset(x, y), objective)
    a, g = sums.factors[""]
    gw, gb = torch.autograd.grad(F.log_softmax(lin(x), dim=1)[0, 1], [lin.weight, lin.bias])
    grad = torch.cat([gw, gb[:, None]], 1)  # (out, in + 1): the augmented weight's gradient
    exact = torch.outer(grad.t().reshape(-1), grad.t().reshape(-1))  # vec stacks columns
    torch.testing.assert_close(torch.kron(a, g), exact, rtol=1e-10, atol=1e-12)
    # a convolution: A averages ã ãᵀ over the locations, G sums g gᵀ over them
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    xc = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    seeds = []

    def conv_objective(out, target, extra):
        v = (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()).sum().reshape(1)
        seeds.append(1)
        return v, torch.ones_like(v)

    sums = CurvatureEngine(conv, kfac=True).run(TensorDataset(xc, torch.zeros(2)), conv_objective)
    a, g = sums.factors[""]
    patches = F.unfold(xc, 3, padding=1)  # (2, 18, 16)
    patches = torch.cat([patches, torch.ones(2, 1, 16, dtype=torch.float64)], 1)
    want_a = sum(p @ p.t() / 16 for p in patches)
    out_grad = torch.arange(3 * 16, dtype=torch.float64).reshape(1, 3, 16).sin().expand(2, 3, 16)
    want_g = sum(q @ q.t() for q in out_grad)
    torch.testing.assert_close(a, want_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, want_g, rtol=1e-10, atol=1e-12)


def test_rules_cover_the_layer_types_and_leave_others_to_the_per_sample_path() -> None:
    assert rule_for(nn.Linear(2, 2)) is not None and rule_for(nn.Conv2d(2, 2, 3, groups=2)) is not None
    assert rule_for(nn.BatchNorm2d(2, track_running_stats=False)) is None  # batch statistics mix the samples
    assert rule_for(nn.BatchNorm2d(2)) is not None and rule_for(nn.Embedding(3, 2)) is not None
    assert rule_for(nn.Conv2d(2, 2, 3, padding_mode="reflect")) is None and rule_for(nn.PReLU()) is None
    model = nn.Sequential(nn.Linear(2, 3), nn.PReLU(), nn.Linear(3, 2))
    assert CurvatureEngine(model).fallback == ["1.weight"]
    with pytest.raises(ValueError, match="engine must be one of"):
        fisher_diagonal(model, TensorDataset(torch.randn(2, 2), torch.zeros(2, dtype=torch.long)), engine="fast")


def test_an_embeddings_dense_per_sample_gradients_give_its_row_by_row_sums() -> None:
    """EmbeddingRule.per_sample (a dense (b, V, D) per sample) against autograd per sample, and its
    square, absolute and plain sums against the row-by-row reductions (padding row left out)."""
    torch.manual_seed(0)
    emb = nn.Embedding(6, 3, padding_idx=0).double()
    idx = torch.tensor([[1, 2, 1, 0], [3, 3, 5, 0], [0, 4, 2, 2]])
    g = torch.randn(3, 4, 3, dtype=torch.float64)
    calls = [Call(idx, g)]
    rule = rule_for(emb)
    dense = rule.per_sample(calls, "weight", slice(0, 3))
    for n in range(3):
        (want,) = torch.autograd.grad((emb(idx[n]) * g[n]).sum(), [emb.weight])
        torch.testing.assert_close(dense[n], want)
    torch.testing.assert_close(rule.square_sum(calls, "weight"), dense.square().sum(0))
    torch.testing.assert_close(rule.abs_sum(calls, "weight"), dense.abs().sum(0))
    torch.testing.assert_close(rule.batch_grad(calls, "weight"), dense.sum(0))
    torch.testing.assert_close(rule.per_sample(calls, "weight", slice(1, 3)), dense[1:])


def test_a_model_that_flattens_samples_takes_the_per_sample_path_by_default() -> None:
    """A Linear applied to (B·T, D) rows cannot be read per sample by the engine: ``auto`` (the
    default) takes the per-sample path and equals it, ``layers`` names the layer in a ValueError."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(3, 4), nn.Linear(8, 2)

        def forward(self, x):  # (B, 2, 3) → rows (2B, 3) → (B, 8)
            return self.out(torch.tanh(self.lin(x.reshape(-1, 3))).reshape(x.shape[0], 8))

    torch.manual_seed(0)
    model = Flat().double()
    data = TensorDataset(torch.randn(5, 2, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))
    want = fisher_diagonal(model, data, estimator="empirical", engine="per_sample")
    got = fisher_diagonal(model, data, estimator="empirical")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"layer 'lin' ran on an input of shape \(10, 3\).*engine='per_sample'"):
        fisher_diagonal(model, data, estimator="empirical", engine="layers")
    with pytest.raises(ValueError, match="engine must be one of"):
        clreg.EWC(model, engine="fast")


@pytest.mark.parametrize("estimator", ["exact", "mc", "empirical"])
def test_the_engine_equals_the_per_sample_path_on_the_performance_suites_model(estimator) -> None:
    """The performance suite's model (MobileNetV3-small and a conv head: depthwise, 1 × 1, strided,
    squeeze-excitation and 3 × 3 convolutions, BatchNorm) at 64 px: every estimator, each parameter
    covered by a layer rule."""
    pytest.importorskip("timm")
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "protocol.py"
    spec = importlib.util.spec_from_file_location("suite_protocol", path)
    protocol = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("suite_protocol", protocol)  # its dataclasses look their module up
    spec.loader.exec_module(protocol)
    torch.manual_seed(0)
    model = protocol.Net().eval()
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(3, 3, 64, 64, generator=g), torch.randint(0, protocol.CLASSES, (3,), generator=g))
    assert CurvatureEngine(model).fallback == []
    kw = dict(estimator=estimator, seed=1, chunk_size=2)
    want = fisher_diagonal(model, data, engine="per_sample", **kw)
    got = fisher_diagonal(model, data, engine="layers", **kw)
    for name in want:
        scale = float(want[name].abs().max()) + 1e-12
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
