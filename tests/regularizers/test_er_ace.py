"""ER-ACE: the asymmetric cross-entropy against the masked softmax written here by hand, its
gradients against autograd of that reference, the module's replay term on the drawn samples (read from
a hook on the model), state round trips and bad inputs."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset, default_collate

from clreg import OutputSpec
from clreg.functional.logit_replay import asymmetric_cross_entropy, present_classes
from clreg.regularizers.er_ace import ERACE
from clreg.testing import check_regularizer
from models import MLP, PixelModel


def masked_ce_by_hand(z: torch.Tensor, y: torch.Tensor, kept: set[int]) -> torch.Tensor:
    """−log(e^{z_y} / Σ_{c ∈ kept} e^{z_c}) for one row of logits z."""
    return -(z[y] - torch.log(sum(torch.exp(z[c]) for c in sorted(kept))))


def ace_by_hand(logits: torch.Tensor, labels: torch.Tensor, extra: set[int] = frozenset()) -> torch.Tensor:
    """The mean over the samples of the cross-entropy over the batch's classes (and ``extra``)."""
    kept = set(labels.tolist()) | set(extra)
    return sum(masked_ce_by_hand(logits[i], labels[i], kept) for i in range(len(labels))) / len(labels)


def test_equals_the_masked_softmax_by_hand_with_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, requires_grad=True)
    labels = torch.tensor([1, 3, 3, 1, 1, 3])
    got = asymmetric_cross_entropy(logits, labels)
    expected = ace_by_hand(logits, labels)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    (g_got,) = torch.autograd.grad(got, logits, retain_graph=True)
    (g_ref,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-6, atol=1e-7)
    assert torch.all(g_got[:, [0, 2, 4]] == 0)  # absent classes are untouched by the incoming batch


@pytest.mark.parametrize("present", [[0], torch.tensor([0, 4]), torch.tensor([True, False, False, False, False])])
def test_present_classes_join_the_labels_classes(present) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([2, 2, 3, 2])
    p = torch.as_tensor(present)
    extra = set(p.nonzero().flatten().tolist()) if p.dtype == torch.bool else set(p.tolist())
    got = asymmetric_cross_entropy(logits, labels, present=present)
    expected = ace_by_hand(logits, labels, extra)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(
        torch.autograd.grad(got, logits, retain_graph=True)[0], torch.autograd.grad(expected, logits)[0]
    )


def test_every_class_present_is_the_plain_cross_entropy() -> None:
    logits = torch.randn(5, 3)
    labels = torch.tensor([0, 1, 2, 1, 0])
    torch.testing.assert_close(asymmetric_cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    torch.testing.assert_close(  # classes 0 and 1 in the batch, class 2 given as present
        asymmetric_cross_entropy(logits[:2], labels[:2], present=[2]), F.cross_entropy(logits[:2], labels[:2])
    )


def test_dense_logits_with_ignore_index_by_hand() -> None:
    """(B, C, H, W): the classes present over every non-ignored pixel; the mean over those pixels."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 3, 3), generator=g)
    labels[:, 0] = 255
    labels[0, 1, 1] = 3  # class 3 appears once
    kept = set(labels[labels != 255].tolist())
    total, count = 0.0, 0
    for b, i, j in itertools.product(range(2), range(3), range(3)):
        if labels[b, i, j] != 255:
            total = total + masked_ce_by_hand(logits[b, :, i, j], labels[b, i, j], kept)
            count += 1
    got = asymmetric_cross_entropy(logits, labels, ignore_index=255)
    torch.testing.assert_close(got, total / count, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        torch.autograd.grad(got, logits, retain_graph=True)[0],
        torch.autograd.grad(total / count, logits)[0],
        rtol=1e-6,
        atol=1e-7,
    )


def test_token_logits_with_classes_last() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, generator=g)
    labels = torch.tensor([[0, 5, -100], [5, 5, 2]])
    kept = {0, 2, 5}
    rows = [(b, t) for b in range(2) for t in range(3) if labels[b, t] != -100]
    expected = sum(masked_ce_by_hand(logits[b, t], labels[b, t], kept) for b, t in rows) / len(rows)
    torch.testing.assert_close(asymmetric_cross_entropy(logits, labels, class_dim=-1), expected)


def test_nothing_to_count_is_zero_without_nan() -> None:
    logits = torch.randn(2, 3, requires_grad=True)
    value = asymmetric_cross_entropy(logits, torch.full((2,), -100))
    assert value.item() == 0.0
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.all(grad == 0)


def test_low_precision_logits_compute_in_float32() -> None:
    logits = torch.randn(4, 3).bfloat16()
    labels = torch.tensor([0, 1, 0, 1])
    value = asymmetric_cross_entropy(logits, labels)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ace_by_hand(logits.float(), labels))


def test_present_classes_mask() -> None:
    mask = present_classes(torch.tensor([[1, 255], [4, 1]]), 5, ignore_index=255)
    assert mask.tolist() == [False, True, False, False, True]


def test_functional_bad_inputs() -> None:
    logits = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"expected \(3,\)"):
        asymmetric_cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        asymmetric_cross_entropy(logits, torch.zeros(3, dtype=torch.long), present=[7])
    with pytest.raises(ValueError, match="ints"):
        asymmetric_cross_entropy(logits, torch.zeros(3, dtype=torch.long), present=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="mask must have shape"):
        asymmetric_cross_entropy(logits, torch.zeros(3, dtype=torch.long), present=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="class dimension"):
        asymmetric_cross_entropy(torch.randn(3), torch.zeros(3, dtype=torch.long))


# -- the module ------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, model: nn.Module) -> None:
        self.calls: list = []
        model.register_forward_pre_hook(lambda m, args: self.calls.append(args[0]))


def test_incoming_loss_on_a_selected_output_equals_the_function() -> None:
    model = MLP()
    er_ace = ERACE(model, capacity=4, output=OutputSpec(select="cls", target="y"))
    out = {"cls": torch.randn(5, 3), "other": torch.zeros(1)}
    y = {"y": torch.tensor([2, 0, 2, 2, 0])}
    torch.testing.assert_close(er_ace.incoming_loss(out, y), ace_by_hand(out["cls"], y["y"]))


def test_replay_term_is_the_plain_cross_entropy_of_the_drawn_samples() -> None:
    torch.manual_seed(0)
    model = MLP()
    er_ace = ERACE(model, capacity=6, batch_size=4, seed=2)
    offered = {}
    for k in range(3):
        x = torch.randn(4, 4)
        x[:, 0] = torch.arange(4 * k, 4 * k + 4).float()
        y = torch.randint(0, 3, (4,))
        offered.update({int(x[i, 0]): (x[i], y[i]) for i in range(4)})
        er_ace.observe(x, y)
    rec = Recorder(model)
    value = er_ace(model)
    rows = [round(v) for v in rec.calls[0][:, 0].tolist()]
    assert len(set(rows)) == 4 and set(rows) <= set(offered)
    every = set(range(3))
    expected = sum(masked_ce_by_hand(model(offered[r][0][None])[0], offered[r][1], every) for r in rows) / 4
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    params = list(model.parameters())
    for a, b in zip(
        torch.autograd.grad(value, params, retain_graph=True), torch.autograd.grad(expected, params, retain_graph=True)
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_dense_replay_with_ignore_index() -> None:
    model = PixelModel()
    er_ace = ERACE(model, capacity=3, batch_size=3, output=OutputSpec(ignore_index=255))
    x = torch.randn(3, 2, 2, 2)
    y = torch.randint(0, 3, (3, 2, 2))
    y[:, 0, 0] = 255
    er_ace.observe(x, y)
    rec = Recorder(model)
    value = er_ace(model)
    order = [next(i for i in range(3) if torch.equal(x[i], r)) for r in rec.calls[0]]
    torch.testing.assert_close(value, F.cross_entropy(model(x[order]), y[order], ignore_index=255))


def test_empty_buffer_is_a_zero_tensor_without_a_forward() -> None:
    model = MLP()
    er_ace = ERACE(model, capacity=3)
    rec = Recorder(model)
    value = er_ace(model)
    assert value.shape == () and value.item() == 0.0 and not rec.calls


def test_state_round_trip() -> None:
    model = MLP()
    er_ace = ERACE(model, capacity=5, batch_size=2, seed=4)
    for _ in range(3):
        er_ace.observe(torch.randn(3, 4), torch.randint(0, 3, (3,)))
    er_ace(model)
    buf = io.BytesIO()
    torch.save(er_ace.state_dict(), buf)
    buf.seek(0)
    fresh = ERACE(MLP(), capacity=1)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert fresh.batch_size == 2 and fresh.buffer.seen == 9 and len(fresh.buffer) == 5
    assert torch.equal(fresh.buffer.stored("labels"), er_ace.buffer.stored("labels"))
    torch.testing.assert_close(fresh(model), er_ace(model), rtol=0, atol=0)


def test_module_bad_inputs() -> None:
    model = MLP()
    with pytest.raises(ValueError, match="softmax"):
        ERACE(model, capacity=2, output=OutputSpec(kind="sigmoid"))
    with pytest.raises(ValueError, match="channels"):
        ERACE(model, capacity=2, output=OutputSpec(channels=(0, 1)))
    with pytest.raises(ValueError, match="batch_size"):
        ERACE(model, capacity=2, batch_size=0)
    with pytest.raises(ValueError, match="capacity"):
        ERACE(model, capacity=0)
    with pytest.raises(TypeError, match="transform must be callable"):
        ERACE(model, capacity=2, transform=3)
    er_ace = ERACE(model, capacity=2)
    with pytest.raises(TypeError, match="cannot be attached"):
        er_ace.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="labels"):
        er_ace.observe(torch.randn(2, 4), None)
    with pytest.raises(ValueError, match="2 samples in the batch, but labels"):
        er_ace.observe(torch.randn(2, 4), torch.zeros(3, dtype=torch.long))
    er_ace.buffer.observe(torch.randn(2, 4))  # filled behind ER-ACE's back: no labels stored
    with pytest.raises(ValueError, match="ER-ACE: the buffer holds no labels"):
        er_ace(model)


# -- the contract ----------------------------------------------------------------------------------


class StoringERACE(ERACE):
    """ER-ACE that offers each task's data at consolidation, so the contract's training fills it."""

    def consolidate(self, model, data=None, spec=None):
        x, y = default_collate([data[i] for i in range(len(data))])
        self.observe(x, y)
        super().consolidate(model, data, spec)


def test_contract() -> None:
    """The draw holds all 16 stored samples: the value is the plain mean cross-entropy over them."""

    def reference(model, reg, inputs, tasks):
        x = torch.cat([t.batch[0] for t in tasks])
        y = torch.cat([t.batch[1] for t in tasks])
        z = model(x)
        return -(z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z, 1)).mean()

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    check_regularizer(lambda m: StoringERACE(m, capacity=16, batch_size=16), MLP(), data, reference=reference)
