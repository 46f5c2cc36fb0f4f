"""DER / DER++ and their reservoir buffer: values against the paper's definitions written here (the MSE
and cross-entropy of the drawn samples by hand, read from a hook on the model), the reservoir's
uniformity, state round trips, gradients against autograd, and bad inputs."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import chi2
from torch import nn
from torch.utils.data import TensorDataset, default_collate

import clreg
from clreg import OutputSpec
from clreg.data import KeywordInputs
from clreg.logit_buffer import LogitBuffer
from clreg.regularizers.der import DER
from clreg.testing import check_regularizer
from models import MLP, L, MultiHead, TinyLM, V


class Recorder:
    """Records the inputs of every forward of ``model`` (a forward pre-hook)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list = []
        model.register_forward_pre_hook(
            lambda m, args, kwargs: self.calls.append(args[0] if args else kwargs), with_kwargs=True
        )


def ids_of(x: torch.Tensor) -> list[int]:
    """The sample ids the tests write into the first input feature."""
    return [round(v) for v in x[:, 0].tolist()]


def stream(model: nn.Module, n_batches: int, b: int, d: int = 4, seed: int = 0):
    """Batches whose first feature is a sample id; the model moves between batches, so the outputs
    stored at insertion differ from the current ones. Yields ``(x, y, out)``; keeps ``offered[id]``."""
    g = torch.Generator().manual_seed(seed)
    offered: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    batches = []
    for k in range(n_batches):
        x = torch.randn(b, d, generator=g)
        x[:, 0] = torch.arange(k * b, (k + 1) * b).float()
        y = torch.randint(0, 3, (b,), generator=g)
        with torch.no_grad():
            out = model(x)
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        for i, sid in enumerate(ids_of(x)):
            offered[sid] = (x[i], y[i], out[i])
        batches.append((x, y, out))
    return batches, offered


def hand_mse(model: nn.Module, rows: list[int], offered: dict) -> torch.Tensor:
    """The mean over the drawn samples and their logits of (f(x) − z)², by a plain loop."""
    total, count = 0.0, 0
    for sid in rows:
        x, _, z = offered[sid]
        current = model(x[None])[0]
        for c in range(current.numel()):
            total = total + (current[c] - z[c]) ** 2
            count += 1
    return total / count


def hand_ce(model: nn.Module, rows: list[int], offered: dict) -> torch.Tensor:
    """The mean over the drawn samples of −log softmax(f(x))_y, by a plain loop."""
    total = 0.0
    for sid in rows:
        x, y, _ = offered[sid]
        z = model(x[None])[0]
        total = total - (z[y] - torch.log(torch.exp(z).sum()))
    return total / len(rows)


def grads(value: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, list(model.parameters()), retain_graph=True))


# -- DER and DER++ against the definitions ---------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.7, 2.0])
def test_der_is_alpha_mse_of_the_drawn_samples(alpha) -> None:
    torch.manual_seed(0)
    model = MLP()
    der = DER(model, capacity=8, alpha=alpha, batch_size=5, seed=3)
    batches, offered = stream(model, 3, 5)
    for x, y, out in batches:
        der.observe(x, y, out)
    rec = Recorder(model)
    value = der(model)
    assert len(rec.calls) == 1  # beta = 0: one replayed forward
    rows = ids_of(rec.calls[0])
    assert len(rows) == 5 and len(set(rows)) == 5 and set(rows) <= set(offered)  # without replacement
    expected = alpha * hand_mse(model, rows, offered)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads(value, model), grads(expected, model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_der_plus_plus_adds_beta_ce_on_a_second_independent_draw() -> None:
    torch.manual_seed(0)
    model = MLP()
    der = DER(model, capacity=10, alpha=0.5, beta=0.8, batch_size=4, seed=1)
    batches, offered = stream(model, 4, 6)
    for x, y, out in batches:
        der.observe(x, y, out)
    rec = Recorder(model)
    value = der(model)
    assert len(rec.calls) == 2
    first, second = ids_of(rec.calls[0]), ids_of(rec.calls[1])
    assert first != second  # independent draws (seeded: these two differ)
    expected = 0.5 * hand_mse(model, first, offered) + 0.8 * hand_ce(model, second, offered)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads(value, model), grads(expected, model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_draw_takes_everything_when_fewer_are_stored_than_the_batch() -> None:
    model = MLP()
    der = DER(model, capacity=10, batch_size=32)
    batches, offered = stream(model, 1, 3)
    der.observe(*batches[0])
    rec = Recorder(model)
    value = der(model)
    assert sorted(ids_of(rec.calls[0])) == [0, 1, 2]
    torch.testing.assert_close(value, hand_mse(model, [0, 1, 2], offered), rtol=1e-5, atol=1e-7)


def test_draws_are_seeded() -> None:
    def draws(seed: int) -> list[list[int]]:
        model = MLP()
        der = DER(model, capacity=6, batch_size=3, seed=seed)
        for x, y, out in stream(model, 3, 4)[0]:
            der.observe(x, y, out)
        rec = Recorder(model)
        for _ in range(4):
            der(model)
        return [ids_of(c) for c in rec.calls]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)


def test_several_outputs_dense_sigmoid_and_channels_by_hand() -> None:
    """seg (softmax, channels 0 and 2), det.heatmap (sigmoid: matched on its logits), det.box
    (regression) and cls: each the mean over its elements, summed."""
    torch.manual_seed(0)
    model = MultiHead().eval()
    specs = [
        OutputSpec("seg", "softmax", channels=(0, 2)),
        OutputSpec("det.heatmap", "sigmoid"),
        OutputSpec(("det", "box"), "regression"),
        OutputSpec("cls", "softmax"),
    ]
    der = DER(model, capacity=4, alpha=1.5, batch_size=3, outputs=specs)
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        stored = model(x)
    der.observe(x, None, stored)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    rec = Recorder(model)
    value = der(model)
    drawn = rec.calls[0]
    idx = [next(i for i in range(4) if torch.equal(x[i], r)) for r in drawn]
    now = model(drawn)
    then = {
        "seg": stored["seg"][idx][:, [0, 2]],
        "heat": stored["det"]["heatmap"][idx],
        "box": stored["det"]["box"][idx],
        "cls": stored["cls"][idx],
    }
    cur = {"seg": now["seg"][:, [0, 2]], "heat": now["det"]["heatmap"], "box": now["det"]["box"], "cls": now["cls"]}
    expected = 1.5 * sum(((cur[k] - then[k]) ** 2).sum() / cur[k].numel() for k in cur)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)


def test_der_plus_plus_dense_labels_with_ignore_index_and_label_loss() -> None:
    torch.manual_seed(0)
    model = MultiHead().eval()
    spec = OutputSpec("seg", "softmax", ignore_index=255)
    der = DER(model, capacity=3, alpha=0.0, beta=1.0, batch_size=3, outputs=spec)
    x = torch.randn(3, 3, 4, 4)
    y = torch.randint(0, 4, (3, 4, 4))
    y[:, 0] = 255
    der.observe(x, y, model(x))
    rec = Recorder(model)
    value = der(model)
    drawn = rec.calls[0]
    idx = [next(i for i in range(3) if torch.equal(x[i], r)) for r in drawn]
    logits, labels = model(drawn)["seg"], y[idx]
    total, count = 0.0, 0
    for b, i, j in itertools.product(range(3), range(4), range(4)):
        if labels[b, i, j] != 255:
            z = logits[b, :, i, j]
            total = total - (z[labels[b, i, j]] - torch.logsumexp(z, 0))
            count += 1
    torch.testing.assert_close(value, total / count, rtol=1e-5, atol=1e-7)
    # a label loss of the user's replaces the default cross-entropy
    custom = DER(
        model, capacity=3, beta=2.0, alpha=0.0, outputs=spec, label_loss=lambda out, t: out["cls"].sum() * 0 + 1
    )
    custom.observe(x, y, model(x))
    assert custom(model).item() == pytest.approx(2.0)


def test_der_plus_plus_labels_of_selected_channels_are_their_positions() -> None:
    """channels (1, 3) with labels='output': the stored labels 1 and 3 are positions 0 and 1 of the
    two kept logits; the CE is over those two logits alone."""
    torch.manual_seed(0)
    model = MultiHead(n_cls=5).eval()
    spec = OutputSpec("cls", "softmax", channels=(1, 3))
    der = DER(model, capacity=4, alpha=0.0, beta=1.0, batch_size=4, outputs=spec)
    x, y = torch.randn(4, 3, 4, 4), torch.tensor([3, 1, 1, 3])
    der.observe(x, y, model(x))
    rec = Recorder(model)
    value = der(model)
    idx = [next(i for i in range(4) if torch.equal(x[i], r)) for r in rec.calls[0]]
    logits = model(rec.calls[0])["cls"]
    expected = sum(
        -(logits[b, y[i]] - torch.log(torch.exp(logits[b, 1]) + torch.exp(logits[b, 3]))) for b, i in enumerate(idx)
    )
    torch.testing.assert_close(value, expected / 4, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"sample 2: label 2 is not one of the selected channels \(1, 3\)"):
        der.observe(x, torch.tensor([1, 3, 2, 1]), model(x))
    assert der.buffer.seen == 4  # the refused batch was not offered


def test_der_plus_plus_token_logits_with_shift() -> None:
    """(B, L, V) logits, classes last, shift 1: position t predicts token t + 1; the CE is the mean over
    the B·(L − 1) predictions, by hand. The inputs are keyword inputs, stored and replayed as such."""
    model = TinyLM()
    spec = OutputSpec("logits", "softmax", class_dim=-1, shift=1)
    der = DER(model, capacity=3, alpha=0.0, beta=0.5, batch_size=3, outputs=spec)
    ids = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(4))
    x = KeywordInputs(input_ids=ids)
    der.observe(x, ids, model(**x))
    rec = Recorder(model)
    value = der(model)
    drawn = rec.calls[0]["input_ids"]
    z = model(input_ids=drawn)["logits"]
    total = sum(-(z[b, t, drawn[b, t + 1]] - torch.logsumexp(z[b, t], 0)) for b in range(3) for t in range(L - 1))
    torch.testing.assert_close(value, 0.5 * total / (3 * (L - 1)), rtol=1e-5, atol=1e-7)


def test_a_buffer_without_outputs_or_labels_is_a_clear_error() -> None:
    model = MLP()
    x, y = torch.randn(3, 4), torch.randint(0, 3, (3,))
    der = DER(model, capacity=4)
    der.buffer.observe(x, y)  # filled behind DER's back: no outputs stored
    with pytest.raises(ValueError, match="DER: the buffer holds no outputs"):
        der(model)
    der = DER(model, capacity=4, beta=0.0)
    der.observe(x, None, model(x))
    der.beta = 1.0  # DER++ now, but the samples were stored without labels
    with pytest.raises(ValueError, match=r"DER\+\+: the buffer holds no labels"):
        der(model)


def test_no_attached_mode() -> None:
    model = MLP()
    with pytest.raises(TypeError, match="cannot be attached"):
        DER(model, capacity=2).attach(torch.optim.SGD(model.parameters(), lr=0.1))


def test_transform_is_applied_to_the_replayed_inputs() -> None:
    model = MLP()
    der = DER(model, capacity=4, batch_size=4, transform=lambda t: t * 2)
    x = torch.randn(4, 4)
    out = model(x).detach()
    der.observe(x, None, out)
    expected = ((model(2 * x) - out) ** 2).mean()
    torch.testing.assert_close(der(model), expected, rtol=1e-5, atol=1e-7)


def test_replayed_inputs_take_the_current_batch_dtype() -> None:
    model = MLP()
    der = DER(model, capacity=4, batch_size=4)
    x = torch.randn(4, 4, dtype=torch.float64)
    der.observe(x, None, torch.zeros(4, 3))
    rec = Recorder(model)
    der(model, inputs=x.float())
    assert rec.calls[0].dtype == torch.float32
    with pytest.raises(RuntimeError, match="dtype"):  # without the current batch: as stored
        der(model)


def test_keyword_inputs_are_stored_and_replayed_as_keywords() -> None:
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, a, b):
            return self.fc(a) * b

    model = KW()
    der = DER(model, capacity=5, batch_size=5)
    x = KeywordInputs(a=torch.randn(5, 3), b=torch.rand(5, 1))
    der.observe(x, None, torch.zeros(5, 2))
    torch.testing.assert_close(der(model), (model(**x) ** 2).mean(), rtol=1e-5, atol=1e-7)


def test_empty_buffer_is_a_zero_tensor_without_a_forward() -> None:
    model = MLP()
    der = DER(model, capacity=4, beta=1.0)
    rec = Recorder(model)
    x = torch.randn(2, 4)
    value = der(model, inputs=x, outputs=model(x))
    assert isinstance(value, torch.Tensor) and value.shape == () and value.item() == 0.0
    assert len(rec.calls) == 1  # the loop's own forward above, none from DER


def test_in_compose_with_ewc_and_consolidate_counts_tasks() -> None:
    model = MLP()
    der, ewc = DER(model, capacity=4), clreg.EWC(model, lam=1.0)
    reg = clreg.Compose(der, ewc)
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    der.observe(x, y, model(x).detach() + 1)
    reg.consolidate(model, TensorDataset(x, y))
    assert int(der.n_tasks) == 1 and len(der.buffer) == 4  # consolidate adds nothing to the buffer
    value = reg(model, inputs=x, outputs=model(x))
    torch.testing.assert_close(value, der(model) + ewc(model), rtol=1e-5, atol=1e-7)


# -- state -----------------------------------------------------------------------------------------


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("full", [False, True])
def test_state_round_trip_restores_the_buffer_and_continues_alike(full) -> None:
    torch.manual_seed(0)
    model = MLP()
    der = DER(model, capacity=8 if full else 20, alpha=0.4, beta=0.3, batch_size=3, seed=5)
    batches, _ = stream(model, 5, 3)
    for x, y, out in batches[:3]:
        der.observe(x, y, out)
    der(model)  # a draw before saving: the count of draws is state too
    state = roundtrip(der.state_dict())
    assert state["buffer.inputs.0"].shape == (len(der.buffer), 4)  # only the stored rows are saved
    fresh = DER(MLP(), capacity=1)
    fresh.load_state_dict(state, strict=True)
    assert (fresh.alpha, fresh.beta, fresh.batch_size, fresh.buffer.capacity) == (0.4, 0.3, 3, der.buffer.capacity)
    assert fresh.buffer.seen == der.buffer.seen
    for g in ("inputs", "labels", "outputs"):
        for a, b in zip(pytree.tree_leaves(fresh.buffer.stored(g)), pytree.tree_leaves(der.buffer.stored(g))):
            assert torch.equal(a, b) and a.dtype == b.dtype
    for x, y, out in batches[3:]:
        der.observe(x, y, out)
        fresh.observe(x, y, out)
    torch.testing.assert_close(fresh(model), der(model), rtol=0, atol=0)
    assert torch.equal(fresh.buffer.stored("inputs"), der.buffer.stored("inputs"))


def test_empty_state_round_trip_and_strict_errors() -> None:
    model = MLP()
    fresh = DER(model, capacity=3)
    fresh.load_state_dict(roundtrip(DER(model, capacity=3).state_dict()), strict=True)
    assert len(fresh.buffer) == 0 and fresh(model).item() == 0.0
    der = DER(model, capacity=3)
    der.observe(torch.randn(2, 4), None, torch.randn(2, 3))
    state = der.state_dict()
    with pytest.raises(RuntimeError, match="Missing key"):
        DER(model, capacity=3).load_state_dict({k: v for k, v in state.items() if k != "buffer.outputs.0"})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        DER(model, capacity=3).load_state_dict({**state, "buffer.outputs.1": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="outputs"):
        DER(model, capacity=3, outputs=OutputSpec(kind="regression")).load_state_dict(state)


def test_buffer_round_trip_with_pytrees_continues_alike() -> None:
    """Keyword inputs and a nested dict of outputs (the one-head model's shape): the state holds one key
    per leaf, only the rows filled, and a fresh buffer of another capacity restores the structure, the
    rows, the counts and the next draws and offers."""

    def batch(k: int) -> tuple:
        g = torch.Generator().manual_seed(k)
        x = KeywordInputs(a=torch.randn(3, 2, generator=g), b=torch.randint(0, 9, (3, 4), generator=g))
        out = {"cls": torch.randn(3, 5, generator=g), "det": {"box": torch.randn(3, 4, 2, 2, generator=g)}}
        return x, {"y": torch.randint(0, 5, (3,), generator=g)}, out

    buf = LogitBuffer(7, seed=3)
    for k in range(3):
        buf.observe(*batch(k))
    buf.sample(2)
    state = roundtrip(buf.state_dict())
    assert sorted(k for k in state if k != "_extra_state") == [
        "inputs.0",
        "inputs.1",
        "labels.0",
        "outputs.0",
        "outputs.1",
    ]
    assert state["outputs.1"].shape == (7, 4, 2, 2) and state["inputs.1"].dtype == torch.int64
    fresh = LogitBuffer(1)
    fresh.load_state_dict(state, strict=True)
    assert (fresh.capacity, fresh.seen, len(fresh)) == (7, 9, 7)
    for group in ("inputs", "labels", "outputs"):
        a, b = fresh.stored(group), buf.stored(group)
        assert pytree.tree_structure(a) == pytree.tree_structure(b)
        assert all(torch.equal(u, v) for u, v in zip(pytree.tree_leaves(a), pytree.tree_leaves(b)))
    assert isinstance(fresh.stored("inputs"), KeywordInputs)
    assert torch.equal(fresh.sample(4).index, buf.sample(4).index)
    fresh.observe(*batch(5))
    buf.observe(*batch(5))
    assert torch.equal(fresh.stored("outputs")["det"]["box"], buf.stored("outputs")["det"]["box"])


def test_stored_dtypes() -> None:
    x = torch.randn(2, 4)
    buf = LogitBuffer(4)
    buf.observe(x.double(), torch.tensor([1, 2]), torch.randn(2, 3, dtype=torch.bfloat16))
    assert buf.stored("inputs").dtype == torch.float64 and buf.stored("labels").dtype == torch.int64
    assert buf.stored("outputs").dtype == torch.float32  # the wider of float32 and bfloat16
    half = LogitBuffer(4, output_dtype=torch.bfloat16)
    half.observe(x, None, torch.randn(2, 3, dtype=torch.float64))
    assert half.stored("outputs").dtype == torch.bfloat16 and half.stored("labels") is None
    assert half.state_bytes() == 4 * 4 * 4 + 4 * 3 * 2  # capacity rows of inputs (float32) and outputs (bf16)


# -- the reservoir ---------------------------------------------------------------------------------


def kept_ids(seed: int, chunks: list[int], capacity: int) -> list[int]:
    buf = LogitBuffer(capacity, seed=seed)
    start = 0
    for n in chunks:
        buf.observe(torch.arange(start, start + n).float()[:, None])
        start += n
    return [int(v) for v in buf.stored("inputs")[:, 0].tolist()]


def test_reservoir_keeps_each_sample_with_probability_m_over_n() -> None:
    """N = 50 samples offered in uneven chunks to M = 10 slots, over 2000 seeds: each sample's
    frequency in the buffer is M / N = 0.2 within 5 binomial standard deviations (0.045)."""
    trials, chunks, m = 2000, [7, 3, 12, 1, 9, 18], 10
    n = sum(chunks)
    counts = torch.zeros(n)
    for seed in range(trials):
        ids = kept_ids(seed, chunks, m)
        assert len(set(ids)) == m
        counts[ids] += 1
    freq = counts / trials
    sd = math.sqrt(0.2 * 0.8 / trials)
    assert (freq - m / n).abs().max() < 5 * sd, freq


def test_reservoir_keeps_every_subset_equally_often() -> None:
    """N = 6 in chunks [2, 1, 3], M = 3, 4000 seeds: the 20 possible contents are equally likely
    (chi-square test with 19 degrees of freedom, rejected at p < 1e-4)."""
    trials = 4000
    subsets = {s: 0 for s in itertools.combinations(range(6), 3)}
    for seed in range(trials):
        subsets[tuple(sorted(kept_ids(seed, [2, 1, 3], 3)))] += 1
    expected = trials / len(subsets)
    stat = sum((c - expected) ** 2 / expected for c in subsets.values())
    assert stat < chi2.ppf(1 - 1e-4, len(subsets) - 1), subsets


@given(
    chunks=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    capacity=st.integers(1, 8),
    seed=st.integers(0, 3),
)
def test_reservoir_invariants(chunks, capacity, seed) -> None:
    """The first M samples fill the slots in order; later ones only replace; each stored row keeps its
    own label and output; the counts are right."""
    buf = LogitBuffer(capacity, seed=seed)
    start = 0
    for n in chunks:
        ids = torch.arange(start, start + n)
        buf.observe(ids.float()[:, None], ids * 10, {"z": ids.double()[:, None] * 100})
        start += n
    assert buf.seen == start and len(buf) == min(capacity, start)
    if start == 0:
        return
    x = buf.stored("inputs")[:, 0].long()
    assert torch.equal(buf.stored("labels"), x * 10) and torch.equal(buf.stored("outputs")["z"][:, 0], x.double() * 100)
    assert len(set(x.tolist())) == len(x) and x.max() < start
    if start <= capacity:
        assert x.tolist() == list(range(start))


# -- bad inputs ------------------------------------------------------------------------------------


class Padded(nn.Module):
    """The inner model's output, with one more column once ``pad`` is set."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.pad = inner, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return F.pad(out, (0, 1)) if self.pad else out


def test_bad_inputs_are_clear_errors() -> None:
    model = MLP()
    x, y = torch.randn(3, 4), torch.randint(0, 3, (3,))
    der = DER(model, capacity=4, beta=1.0)
    with pytest.raises(ValueError, match="outputs"):
        der.observe(x, y)
    with pytest.raises(ValueError, match="needs y"):
        der.observe(x, None, model(x))
    with pytest.raises(ValueError, match="3 samples in the batch, but outputs"):
        der.observe(x, y, torch.zeros(2, 3))
    der.observe(x, y, model(x))
    with pytest.raises(ValueError, match=r"inputs has per-sample shape \(5,\), the stored samples \(4,\)"):
        der.observe(torch.randn(3, 5), y, model(x))
    with pytest.raises(ValueError, match="target is not a tensor"):  # DER++ reads labels as its output says
        der.observe(x, {"y": y}, model(x))
    with pytest.raises(ValueError, match="sample 1: label 3 is outside"):
        der.observe(x, torch.tensor([0, 3, 1]), model(x))
    labelled = DER(model, capacity=2)  # DER (beta = 0) stores labels as given, unread
    labelled.observe(x, y, model(x))
    with pytest.raises(ValueError, match="another structure"):
        labelled.observe(x, {"y": y}, model(x))
    growing = Padded(model)
    grown = DER(growing, capacity=2)
    grown.observe(x, None, growing(x))
    growing.pad = True  # the head grew after the outputs were stored
    with pytest.raises(ValueError, match="must keep its shape"):
        grown(growing)
    plain = DER(model, capacity=2)
    plain.observe(x, None, model(x))
    with pytest.raises(ValueError, match="stored without labels"):
        plain.observe(x, y, model(x))


def test_buffer_bad_inputs() -> None:
    buf = LogitBuffer(3)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(2)
    with pytest.raises(ValueError, match="inputs are needed"):
        buf.observe(None)
    with pytest.raises(ValueError, match="0-d tensor"):
        buf.observe(torch.zeros(()))
    with pytest.raises(ValueError, match=r"outputs\['z'\] is str"):
        buf.observe(torch.zeros(2, 1), None, {"z": "logits"})
    buf.observe(torch.zeros(2, 1))
    with pytest.raises(ValueError, match="k must be"):
        buf.sample(0)
    with pytest.raises(ValueError, match="group must be"):
        buf.stores("targets")
    g = torch.Generator().manual_seed(0)
    assert buf.sample(5, generator=g).inputs.shape == (2, 1) and buf.stored("outputs") is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"capacity": 0}, ValueError, "capacity must be >= 1"),
        ({"capacity": 2.0}, TypeError, "capacity must be an int"),
        ({"capacity": 2, "alpha": -1.0}, ValueError, "alpha"),
        ({"capacity": 2, "beta": float("nan")}, ValueError, "beta"),
        ({"capacity": 2, "batch_size": 0}, ValueError, "batch_size"),
        ({"capacity": 2, "batch_size": 1.5}, TypeError, "batch_size"),
        ({"capacity": 2, "outputs": OutputSpec(kind="regression", norm="l1")}, ValueError, "unweighted"),
        ({"capacity": 2, "beta": 1.0, "outputs": OutputSpec(kind="sigmoid")}, ValueError, "label_loss"),
        ({"capacity": 2, "label_loss": 3}, TypeError, "label_loss"),
        ({"capacity": 2, "output_dtype": torch.int64}, TypeError, "output_dtype"),
    ],
)
def test_hyperparameters_are_validated(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        DER(MLP(), **kwargs)


# -- the contract ----------------------------------------------------------------------------------


class StoringDER(DER):
    """DER that offers each task's data (with the model's outputs) at consolidation, so the contract's
    training fills its buffer."""

    def consolidate(self, model, data=None, spec=None):
        x, y = default_collate([data[i] for i in range(len(data))])
        with torch.no_grad():
            self.observe(x, y, model(x))
        super().consolidate(model, data, spec)


def contract_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))


@pytest.mark.parametrize("beta", [0.0, 0.6])
def test_contract(beta) -> None:
    """Capacity and draw hold both tasks' 16 samples, so each draw is all of them (the value does not
    depend on its order): α · mean over them and their logits of (f − f_t)² (f_t the model at task t's
    consolidation) + β · the mean cross-entropy."""

    def reference(model, reg, inputs, tasks):
        x = torch.cat([t.batch[0] for t in tasks])
        y = torch.cat([t.batch[1] for t in tasks])
        stored = torch.cat([t.model(t.batch[0]).detach() for t in tasks])
        out = model(x)
        mse = ((out - stored) ** 2).sum() / out.numel()
        ce = -(out.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(out, 1)).mean()
        return reg.alpha * mse + reg.beta * ce

    check_regularizer(
        lambda m: StoringDER(m, capacity=16, alpha=0.9, beta=beta, batch_size=16),
        MLP(),
        contract_data(),
        reference=reference,
    )
