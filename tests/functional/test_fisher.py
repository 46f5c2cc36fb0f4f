"""Fisher estimators checked against closed forms, per-sample loops and each other."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from clreg import EWC, OutputSpec, TaskSpec
from clreg.functional import default_estimator, fisher_diagonal, resolve_estimator
from models import MLP, MultiHead, PixelModel, per_sample_grads


def close(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=rtol, atol=atol, msg=k)


def classification_data(n: int = 12, d: int = 4, c: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g))


def dense_data(n: int = 6, size: int = 5, c: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n, size, size), generator=g)
    y[:, 0, :] = 255  # an ignored row
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), y)


# -- closed forms and reference loops ---------------------------------------------------------------


def test_exact_fisher_of_linear_softmax_equals_closed_form() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = classification_data()
    x = data.tensors[0]
    p = F.softmax(model(x), dim=1).detach()
    # d log p_c / dW_jk = (δ_cj − p_j) x_k, so Σ_c p_c (·)² = p_j (1 − p_j) x_k²
    expected_w = (p * (1 - p)).T @ x.square() / len(x)
    expected_b = (p * (1 - p)).mean(0)
    fisher = fisher_diagonal(model, data, estimator="exact")
    torch.testing.assert_close(fisher["weight"], expected_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fisher["bias"], expected_b, rtol=1e-5, atol=1e-7)


def test_empirical_equals_per_sample_loop_classification() -> None:
    torch.manual_seed(1)
    model = MLP()
    data = classification_data()
    x, y = data.tensors
    grads = per_sample_grads(model, lambda i: F.log_softmax(model(x[i : i + 1]), 1)[0, y[i]], len(x))
    ref = {k: torch.stack([g[k].square() for g in grads]).mean(0) for k in grads[0]}
    close(fisher_diagonal(model, data, estimator="empirical"), ref)
    close(fisher_diagonal(model, data, estimator="empirical", vectorize=False), ref)


def exact_fisher_loop(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mean over samples of Σ_c p_c (∂ log p_c)², by a plain loop over samples and the 3 classes."""
    ref = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(len(x)):
        logp = F.log_softmax(model(x[i : i + 1]), 1)[0]
        for c in range(3):
            g = torch.autograd.grad(logp[c], list(model.parameters()), retain_graph=True)
            for (k, _), gi in zip(model.named_parameters(), g):
                ref[k] += logp[c].exp().detach() * gi.square() / len(x)
    return ref


def test_exact_vmapped_equals_loop() -> None:
    torch.manual_seed(2)
    model = MLP()
    data = classification_data()
    ref = exact_fisher_loop(model, data.tensors[0])
    close(fisher_diagonal(model, data, estimator="exact"), ref)
    close(fisher_diagonal(model, data, estimator="exact", vectorize=False), ref)


def test_dense_empirical_equals_per_pixel_convention_loop() -> None:
    torch.manual_seed(3)
    model = MultiHead()
    data = dense_data()
    x, y = data.tensors
    model.eval()

    def sample_term(i: int) -> torch.Tensor:
        logp = F.log_softmax(model(x[i : i + 1])["seg"], 1)[0]
        valid = y[i] != 255
        lp = logp.gather(0, y[i].clamp(max=3).unsqueeze(0))[0]
        n = valid.sum()
        return (lp * valid).sum() / n.sqrt()  # squared grad = n · (∇ mean log-lik)²

    grads = per_sample_grads(model, sample_term, len(x))
    ref = {k: torch.stack([g[k].square() for g in grads]).mean(0) for k in grads[0]}
    model.train()
    spec = OutputSpec(select="seg", ignore_index=255)
    got = fisher_diagonal(model, data, outputs=spec, estimator="empirical")
    close(got, ref, rtol=1e-4, atol=1e-8)
    close(fisher_diagonal(model, data, outputs=spec, estimator="empirical", vectorize=False), ref, rtol=1e-4, atol=1e-8)
    assert model.training and all(m.training for m in model.modules())


def test_per_sample_loss_empirical_equals_loop() -> None:
    torch.manual_seed(4)
    model = MultiHead()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 6, 6, generator=g)
    target = torch.rand(5, 2, 6, 6, generator=g)

    def loss(out, tgt):
        return F.binary_cross_entropy_with_logits(out["det"]["heatmap"], tgt, reduction="none").flatten(1).mean(1)

    model.eval()
    grads = per_sample_grads(model, lambda i: loss(model(x[i : i + 1]), target[i : i + 1])[0], 5)
    ref = {k: torch.stack([gi[k].square() for gi in grads]).mean(0) for k in grads[0]}
    got = fisher_diagonal(model, TensorDataset(x, target), spec=TaskSpec(per_sample_loss=loss))
    close(got, ref, rtol=1e-4, atol=1e-9)
    got_loop = fisher_diagonal(model, TensorDataset(x, target), per_sample_loss=loss, vectorize=False)
    close(got_loop, ref, rtol=1e-4, atol=1e-9)


def test_mc_vmapped_equals_loop_and_is_seeded() -> None:
    torch.manual_seed(5)
    model = MultiHead()
    data = dense_data()
    spec = [OutputSpec(select="seg", ignore_index=255), OutputSpec(select="cls", target=lambda t: t[:, 1, 1] % 3)]
    a = fisher_diagonal(model, data, outputs=spec, estimator="mc", mc_samples=2, seed=3)
    b = fisher_diagonal(model, data, outputs=spec, estimator="mc", mc_samples=2, seed=3, vectorize=False)
    close(a, b, rtol=1e-4, atol=1e-9)
    c = fisher_diagonal(model, data, outputs=spec, estimator="mc", mc_samples=2, seed=4)
    assert any(not torch.allclose(a[k], c[k]) for k in a)


def test_mc_mean_approaches_exact() -> None:
    torch.manual_seed(6)
    model = torch.nn.Linear(3, 4)
    data = classification_data(n=4, d=3, c=4)
    exact = fisher_diagonal(model, data, estimator="exact")
    mc = fisher_diagonal(model, data, estimator="mc", mc_samples=4000, seed=1)
    for k in exact:
        rel = (mc[k] - exact[k]).norm() / exact[k].norm()
        assert rel < 0.06, (k, float(rel))


def test_dense_mc_fisher_does_not_depend_on_resolution() -> None:
    torch.manual_seed(7)
    model = PixelModel()
    g = torch.Generator().manual_seed(0)
    small = torch.randn(2, 2, 16, 16, generator=g)
    big = F.interpolate(small, scale_factor=4, mode="nearest")  # the same pixel distribution at 64²
    # one draw's relative spread does not shrink with the number of pixels: average many draws
    f16 = fisher_diagonal(model, TensorDataset(small), estimator="mc", mc_samples=1024, seed=0)
    f64 = fisher_diagonal(model, TensorDataset(big), estimator="mc", mc_samples=512, seed=0, chunk_size=1)
    # reference: the mean per-pixel exact Fisher (each pixel is a (1, C) classification)
    pix = small.permute(0, 2, 3, 1).reshape(-1, 2, 1, 1)
    flat = OutputSpec(select=lambda out: out.flatten(1))
    ref = fisher_diagonal(model, TensorDataset(pix), outputs=flat, estimator="exact")
    for k in ref:
        for got in (f16, f64):
            rel = (got[k] - ref[k]).norm() / ref[k].norm()
            assert rel < 0.1, (k, float(rel))
        assert (f16[k] - f64[k]).norm() / ref[k].norm() < 0.12


def test_batched_equals_mean_of_squared_batch_mean_gradients() -> None:
    torch.manual_seed(8)
    model = MLP()
    data = classification_data(n=10)
    loader = DataLoader(data, batch_size=4)
    ref = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    nb = 0
    for x, y in loader:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        for (k, _), gi in zip(model.named_parameters(), g):
            ref[k] += gi.square()
        nb += 1
    ref = {k: v / nb for k, v in ref.items()}
    close(fisher_diagonal(model, loader, estimator="batched"), ref)
    close(fisher_diagonal(model, data, estimator="batched", batch_size=4), ref)


def test_batched_bias_against_per_sample() -> None:
    """In expectation batched = F/B + (1 − 1/B)(E g)²: with B = 1 it is the empirical Fisher."""
    torch.manual_seed(9)
    model = MLP()
    data = classification_data(n=9)
    emp = fisher_diagonal(model, data, estimator="empirical")
    b1 = fisher_diagonal(model, data, estimator="batched", batch_size=1)
    close(emp, b1, rtol=1e-4, atol=1e-8)
    full = fisher_diagonal(model, data, estimator="batched", batch_size=9)
    x, y = data.tensors
    g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    close(full, {k: gi.square() for (k, _), gi in zip(model.named_parameters(), g)})


# -- invariance to batching (property) -------------------------------------------------------------


@given(
    chunk=st.integers(1, 7),
    batch=st.integers(1, 7),
    estimator=st.sampled_from(["exact", "empirical", "mc"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    n=st.integers(1, 11),
)
def test_fisher_is_invariant_to_how_data_is_split(chunk: int, batch: int, estimator: str, dtype, n: int) -> None:
    torch.manual_seed(10)
    model = MLP().to(dtype)
    data = classification_data(n=n)
    data = TensorDataset(data.tensors[0].to(dtype), data.tensors[1])
    ref = fisher_diagonal(model, data, estimator=estimator, chunk_size=n)
    got = fisher_diagonal(model, data, estimator=estimator, chunk_size=chunk)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    close(got, ref, rtol=tol, atol=tol * 1e-2)
    got_loader = fisher_diagonal(model, DataLoader(data, batch_size=batch), estimator=estimator, chunk_size=chunk)
    close(got_loader, ref, rtol=tol, atol=tol * 1e-2)
    for v in ref.values():
        assert (v >= 0).all() and v.dtype == dtype


# -- options and mode ------------------------------------------------------------------------------


def test_max_samples_and_progress() -> None:
    model = MLP()
    data = classification_data(n=12)
    seen = []
    part = fisher_diagonal(
        model, data, estimator="empirical", max_samples=5, chunk_size=2, progress=lambda d, t: seen.append(d)
    )
    ref = fisher_diagonal(model, TensorDataset(*(t[:5] for t in data.tensors)), estimator="empirical")
    close(part, ref)
    assert seen == [2, 4, 5]


def test_batchnorm_statistics_untouched_and_modes_restored() -> None:
    model = MultiHead()
    model.train()
    model.trunk[1].train(False)  # a mixed mode must be restored as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fisher_diagonal(model, dense_data(), outputs=OutputSpec(select="seg", ignore_index=255))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and not model.trunk[1].training


class Branchy(torch.nn.Module):
    """Data-dependent control flow: cannot be vmapped."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return self.lin(-x)


def test_fallback_loop_warns_and_matches() -> None:
    torch.manual_seed(11)
    model = Branchy()
    data = classification_data()
    with pytest.warns(RuntimeWarning, match="cannot be vmapped"):
        got = fisher_diagonal(model, data, estimator="exact", vectorize=True)
    close(got, exact_fisher_loop(model, data.tensors[0]))


def test_params_selection_and_wrapped_model_names() -> None:
    model = MultiHead()
    got = fisher_diagonal(
        model, dense_data(), outputs=OutputSpec(select="seg"), params=lambda n, p: not n.startswith("trunk.1")
    )
    assert "trunk.1.weight" not in got and "seg.weight" in got
    compiled = torch.compile(model, backend="eager")
    got2 = fisher_diagonal(
        compiled, dense_data(), outputs=OutputSpec(select="seg"), params=["seg.weight", "_orig_mod.seg.bias"]
    )
    assert sorted(got2) == ["seg.bias", "seg.weight"]


# -- errors ----------------------------------------------------------------------------------------


def test_estimator_and_kind_errors() -> None:
    model = MultiHead()
    data = dense_data()
    with pytest.raises(ValueError, match="exact Fisher is for \\(B, C\\) logits"):
        fisher_diagonal(model, data, outputs=OutputSpec(select="seg"), estimator="exact")
    with pytest.raises(ValueError, match="needs a likelihood"):
        fisher_diagonal(model, data, per_sample_loss=lambda o, t: o["cls"].sum(1), estimator="mc")
    with pytest.raises(ValueError, match="takes estimator 'mc'"):
        fisher_diagonal(model, data, outputs=OutputSpec(select="det.heatmap", kind="sigmoid"), estimator="empirical")
    with pytest.raises(ValueError, match="estimator must be one of"):
        fisher_diagonal(model, data, outputs=OutputSpec(select="seg"), estimator="fast")
    with pytest.raises(ValueError, match="key 'segm' not found"):
        fisher_diagonal(model, data, outputs=OutputSpec(select="segm"))
    with pytest.raises(ValueError, match=r"empty data|no samples"):
        fisher_diagonal(torch.nn.Linear(4, 3), TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="needs targets"):
        fisher_diagonal(torch.nn.Linear(4, 3), TensorDataset(torch.zeros(3, 4)), estimator="empirical")
    with pytest.raises(TypeError, match="data must be"):
        fisher_diagonal(torch.nn.Linear(4, 3), 5)


def test_request_is_validated_once_and_every_valid_pair_has_one_objective() -> None:
    from clreg.functional.fisher import _OBJECTIVES, FisherRequest

    def loss(out, target):
        return out.sum(1)

    for estimator in ("exact", "mc", "empirical"):
        for per_sample_loss in (None, loss):
            try:
                req = FisherRequest.of(None, per_sample_loss, None, estimator, 1)
            except ValueError:
                assert per_sample_loss is not None and estimator in ("exact", "mc")
                continue
            assert (req.estimator, req.per_sample_loss is not None) in _OBJECTIVES
    assert FisherRequest.of(None, loss, None, None, 1).estimator == "empirical"
    assert FisherRequest.of(None, None, TaskSpec(), None, 2).outputs == (OutputSpec(),)
    with pytest.raises(ValueError, match="either spec or outputs"):
        FisherRequest.of(OutputSpec(), None, TaskSpec(), None, 1)
    with pytest.raises(ValueError, match="mc_samples must be an int >= 1"):
        FisherRequest.of(None, None, None, "mc", 0)
    with pytest.raises(ValueError, match="exact Fisher takes one softmax output"):
        fisher_diagonal(MultiHead(), dense_data(), outputs=[OutputSpec(select="cls")] * 2, estimator="exact")
    with pytest.raises(FrozenInstanceError):
        FisherRequest.of(None, None, None, "mc", 1).mc_samples = 2


@pytest.mark.parametrize("engine", ["per_sample", "layers"])
def test_bad_labels_are_refused_naming_the_sample_and_the_range(engine) -> None:
    """A label outside [0, C) or a target of the wrong shape is a ValueError before the chunk's
    gradients (no vmap warning, no index error from torch)."""
    import warnings

    model = MultiHead()
    y = torch.randint(0, 3, (6,))
    y[4] = 7
    data = TensorDataset(torch.randn(6, 3, 5, 5), y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for est in ("empirical", "batched"):
            with pytest.raises(ValueError, match=r"sample 4: label 7 is outside \[0, 3\) \(output 'cls'\)"):
                fisher_diagonal(model, data, outputs=OutputSpec(select="cls"), estimator=est, engine=engine)
    dense = dense_data()
    dense.tensors[1][2, 3, 3] = 9  # 255 is the ignore index; 9 is not a class of 4
    with pytest.raises(ValueError, match=r"sample 2: label 9 is outside \[0, 4\) and is not the ignore index 255"):
        fisher_diagonal(model, dense, outputs=OutputSpec(select="seg", ignore_index=255), estimator="mc", engine=engine)
    flat = TensorDataset(torch.randn(6, 3, 5, 5), torch.randint(0, 4, (6, 25)))
    with pytest.raises(ValueError, match=r"labels of shape \(B, 25\) for logits of shape \(B, C, 5, 5\)"):
        fisher_diagonal(model, flat, outputs=OutputSpec(select="seg"), estimator="empirical", engine=engine)


def test_a_one_shot_generator_is_refused_before_the_probe_eats_its_first_batch() -> None:
    """The Fisher reads its data twice (the first sample probes the outputs' shapes): a generator would
    silently lose its first batch, so it is a TypeError; the same batches in a list are accepted."""
    model = torch.nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(2)]
    with pytest.raises(TypeError, match="one-shot iterator"):
        fisher_diagonal(model, (b for b in batches), estimator="empirical")
    assert fisher_diagonal(model, batches, estimator="empirical")["weight"].shape == (2, 3)


@pytest.mark.parametrize(("classes", "expected"), [(2, "exact"), (32, "exact"), (33, "mc")])
def test_the_default_estimator_is_exact_for_few_classes(classes: int, expected: str) -> None:
    """No estimator named: one (B, C) softmax output with C ≤ 32 gets the exact Fisher (its value, to
    float tolerance), more classes one mc draw; EWC logs the one it used."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, classes)
    data = TensorDataset(torch.randn(6, 3), torch.randint(0, classes, (6,)))
    default = fisher_diagonal(model, data)
    named = fisher_diagonal(model, data, estimator=expected)
    for name in named:
        torch.testing.assert_close(default[name], named[name])
    assert resolve_estimator(model, data) == expected


def test_the_default_estimator_of_dense_several_outputs_and_losses() -> None:
    torch.manual_seed(1)
    multi = MultiHead()
    x = torch.randn(3, 3, 8, 8)
    seg = TensorDataset(x, torch.randint(0, 4, (3, 8, 8)))
    assert resolve_estimator(multi, seg, outputs=OutputSpec(select="seg")) == "mc"
    cls = TensorDataset(x, torch.randint(0, 3, (3,)))
    assert resolve_estimator(multi, cls, outputs=OutputSpec(select="cls")) == "exact"
    two = [OutputSpec(select="cls"), OutputSpec(select="cls", channels=(0, 1))]
    assert resolve_estimator(multi, cls, outputs=two) == "mc"
    loss = lambda out, y: F.cross_entropy(out["cls"], y, reduction="none")  # noqa: E731
    assert resolve_estimator(multi, cls, per_sample_loss=loss) == "empirical"
    assert resolve_estimator(multi, cls, outputs=OutputSpec(select="cls"), estimator="mc") == "mc"
    assert default_estimator(None) == "mc" and default_estimator(loss) == "empirical"


def test_ewc_logs_the_default_estimator_it_used(caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.Linear(3, 4)
    data = TensorDataset(torch.randn(5, 3), torch.randint(0, 4, (5,)))
    with caplog.at_level("INFO", logger="clreg"):
        EWC(model).consolidate(model, data)
    assert "exact Fisher" in caplog.text
