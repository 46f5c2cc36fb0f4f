"""O-LoRA over PEFT LoRA adapters: the value and its gradient against the definitions written here
(the paper's Σ‖A_t A_sᵀ‖²_F, the mean squared cosine of the principal angles from QR bases, with the
ridge written out, the mean squared cosine of row pairs from a double loop), with ranks that change
between tasks; orthogonal subspaces give 0 and identical ones the normalised form's maximum; what
λ₁ = 1 means (the same values across ranks, widths, layers and scales, the chance level of random
subspaces, the raw form's size at PEFT's initialisation); the attached mode against the definition's
gradient; clreg's contract; the state round trip and a state that does not add up; a tiny Llama's
attention projections; DDP and FSDP2 against one process; and the refusals."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

peft = pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clreg._sharding import full, is_sharded  # noqa: E402
from clreg.functional.olora import orthogonality  # noqa: E402
from clreg.integrations.peft import OLoRA  # noqa: E402
from clreg.testing import check_regularizer  # noqa: E402

NORMS = ["subspace", "cosine", None]
LAYERS = ["base_model.model.body", "base_model.model.head"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 10)
        self.mid = nn.Linear(10, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(torch.tanh(self.body(x)))))


def config(r: int = 2, targets: tuple[str, ...] = ("body", "head")) -> peft.LoraConfig:
    return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets))


def lora(r: int = 2, dtype: torch.dtype = torch.float64) -> nn.Module:
    return peft.get_peft_model(Net(), config(r)).to(dtype)


def new_task(model: nn.Module, name: str, r: int, seed: int, targets: tuple[str, ...] = ("body", "head")) -> None:
    """A new adapter for the next task, trained alone: the earlier ones stay active and frozen."""
    model.add_adapter(name, config(r, targets))
    model.to(next(model.parameters()).dtype)
    names = list(model.peft_config)
    model.base_model.set_adapter(names)
    model.set_requires_grad(names[:-1], False)
    randomize(model, name, seed)


def randomize(model: nn.Module, adapter: str, seed: int) -> None:
    """Random A and B (B is zero at PEFT's init; the L2 term should see it)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{adapter}." in f"{n}." and "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def downs(model: nn.Module, adapter: str) -> list[torch.Tensor]:
    """The adapter's lora_A weights, in the layers' order (the parameters themselves)."""
    params = dict(model.named_parameters())
    return [params[f"{layer}.lora_A.{adapter}.weight"] for layer in LAYERS]


def adapter_params(model: nn.Module, adapter: str) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if f".{adapter}." in f"{n}." and "lora_" in n]


# -- the definitions ---------------------------------------------------------------------------------


def overlap(a_t: torch.Tensor, a_s: torch.Tensor, normalize: str | None) -> torch.Tensor:
    """ρ(A_t, A_s) from its definition, for one layer and one earlier task."""
    if normalize is None:  # the paper: Σ_jk (O_st)_jk², O = A_t A_sᵀ in PEFT's layout
        return (a_t @ a_s.T).square().sum()
    if normalize == "cosine":  # the mean over row pairs of the squared cosine
        total = a_t.new_zeros(())
        for u in a_t:
            for v in a_s:
                total = total + (u @ v) ** 2 / ((u @ u) * (v @ v))
        return total / (a_t.shape[0] * a_s.shape[0])
    # the squared cosines of the principal angles are the squared singular values of Q_tᵀ Q_s
    # (orthonormal bases of the two row spaces, here from QR); their sum is ‖Q_tᵀ Q_s‖²_F
    q_t, q_s = torch.linalg.qr(a_t.T)[0], torch.linalg.qr(a_s.T)[0]
    return (q_t.T @ q_s).square().sum() / min(a_t.shape[0], a_s.shape[0])


def definition(current, earlier, normalize, lam1=1.0, lam2=0.0, theta=()) -> torch.Tensor:
    """λ₁ O + λ₂ ‖θ‖²: O summed over layers and earlier tasks (raw), or averaged over both."""
    per_layer = [[overlap(a_t, a_s, normalize) for a_s in past] for a_t, past in zip(current, earlier)]
    if normalize is None:
        orth = sum(sum(terms) for terms in per_layer)
    else:
        orth = sum(sum(terms) / len(terms) for terms in per_layer) / len(per_layer)
    return lam1 * orth + lam2 * sum(p.square().sum() for p in theta)


def three_tasks() -> tuple[nn.Module, OLoRA, list[list[torch.Tensor]]]:
    """Adapters of ranks 2, 3 and 1 (the rank changes between tasks); after two consolidations, with
    each task's A copied from the model as it was consolidated."""
    model = lora(r=2)
    randomize(model, "default", 1)
    reg = OLoRA(model, lam1=1.0, eps=1e-12)
    earlier = [[] for _ in LAYERS]
    for name, r, seed in (("t2", 3, 2), ("t3", 1, 3)):
        for past, a in zip(earlier, downs(model, _current_name(model))):
            past.append(a.detach().clone())
        reg.consolidate(model)
        new_task(model, name, r, seed)
    return model, reg, earlier


def _current_name(model: nn.Module) -> str:
    return next(n for n in model.peft_config if any(p.requires_grad for p in adapter_params(model, n)))


# -- value and gradient ------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", NORMS)
def test_value_and_gradient_against_the_definition(normalize) -> None:
    model, reg, earlier = three_tasks()
    reg.normalize, reg.lam1, reg.lam2 = normalize, 0.7, 0.3
    theta = adapter_params(model, "t3")
    value = reg(model)
    assert int(reg.n_tasks) == 2 and reg.param_names[0] == "base_model.model.body.lora_A.t3.weight"
    expected = definition(downs(model, "t3"), earlier, normalize, 0.7, 0.3, theta)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12)
    assert float(value.detach()) > 0.0
    grads = torch.autograd.grad(value, theta)
    for g, r, p in zip(grads, torch.autograd.grad(expected, theta), theta):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-11, msg=f"shape {tuple(p.shape)}")
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)  # nothing reaches the earlier adapters or the base


@pytest.mark.parametrize("normalize", NORMS)
def test_orthogonal_subspaces_give_zero(normalize) -> None:
    model = lora(r=2)
    basis = {w: torch.linalg.qr(torch.randn(w, w, dtype=torch.float64))[0].T for w in (6, 10)}  # orthonormal rows
    with torch.no_grad():
        for a in downs(model, "default"):
            a.copy_(torch.randn(2, 2, dtype=torch.float64) @ basis[a.shape[1]][:2])
    reg = OLoRA(model, normalize=normalize)
    reg.consolidate(model)
    new_task(model, "t2", 3, seed=5)
    with torch.no_grad():
        for a in downs(model, "t2"):  # another basis of rows 2..4: orthogonal to task 1's subspace
            a.copy_(torch.randn(3, 3, dtype=torch.float64) @ basis[a.shape[1]][2:5])
    value = reg(model)
    assert abs(float(value.detach())) < 1e-12
    for g in torch.autograd.grad(value, downs(model, "t2")):  # a minimum: no pull
        assert g.abs().max() < 1e-10


def in_span_of_task_1(r_1: int, mix: list[list[float]], seed: int) -> tuple[nn.Module, OLoRA, list[torch.Tensor]]:
    """Task 1's adapter (rank r_1, random) consolidated; task 2's A set to ``mix`` @ task 1's A at every
    layer (rank len(mix)): inside task 1's row space. Returns the model, the O-LoRA and task 1's A's."""
    model = lora(r=r_1)
    randomize(model, "default", seed)
    reg = OLoRA(model, eps=1e-12)
    reg.consolidate(model)
    old = [a.detach().clone() for a in downs(model, "default")]
    new_task(model, "t2", len(mix), seed=seed + 1)
    with torch.no_grad():
        for a, o in zip(downs(model, "t2"), old):
            a.copy_(torch.tensor(mix, dtype=torch.float64) @ o)
    return model, reg, old


def test_identical_subspaces_give_the_maximum_of_the_normalised_forms() -> None:
    model, reg, old = in_span_of_task_1(2, [[2.0, -1.0], [0.5, 3.0]], seed=7)  # another basis, same rows
    torch.testing.assert_close(reg(model), torch.tensor(1.0, dtype=torch.float64), rtol=1e-10, atol=0)
    reg.normalize = "cosine"  # basis-dependent: 1 only when all rows are parallel
    assert 0.0 < float(reg(model).detach()) < 1.0
    reg.normalize = None
    torch.testing.assert_close(reg(model), definition(downs(model, "t2"), [[o] for o in old], None))

    line = lora(r=1)  # rank 1: the current line lies in (is) the earlier line; both normalised forms give 1
    randomize(line, "default", 9)
    for normalize in ("subspace", "cosine"):
        reg = OLoRA(line, normalize=normalize, eps=1e-12)
        reg.consolidate(line)
        torch.testing.assert_close(reg(line), torch.tensor(1.0, dtype=torch.float64), rtol=1e-10, atol=0)
        with torch.no_grad():
            for a in downs(line, "default"):
                a.mul_(-3.0)  # scale and sign do not matter
        torch.testing.assert_close(reg(line), torch.tensor(1.0, dtype=torch.float64), rtol=1e-10, atol=0)


def test_a_subspace_inside_a_larger_one_gives_one_and_random_ones_lie_between() -> None:
    model, reg, _ = in_span_of_task_1(3, [[1.0, -2.0, 0.5]], seed=10)  # a line in task 1's 3-d subspace
    torch.testing.assert_close(reg(model), torch.tensor(1.0, dtype=torch.float64), rtol=1e-10, atol=0)
    randomize(model, "t2", 12)
    for normalize in ("subspace", "cosine"):
        reg.normalize = normalize
        assert 0.0 < float(reg(model).detach()) < 1.0


def test_the_normalised_forms_ignore_the_scale_of_a_and_the_raw_form_grows_with_its_square() -> None:
    model, reg, _ = three_tasks()
    values = {}
    for scale in (1.0, 10.0):
        with torch.no_grad():
            for a in downs(model, "t3"):
                a.mul_(scale)
        for normalize in NORMS:
            reg.normalize = normalize
            values[normalize, scale] = float(reg(model).detach())
    torch.testing.assert_close(values["subspace", 10.0], values["subspace", 1.0], rtol=1e-9, atol=0)
    torch.testing.assert_close(values["cosine", 10.0], values["cosine", 1.0], rtol=1e-9, atol=0)
    torch.testing.assert_close(values[None, 10.0], 100.0 * values[None, 1.0], rtol=1e-9, atol=0)


def test_the_l2_term_acts_from_the_first_task() -> None:
    model = lora()
    randomize(model, "default", 3)
    theta = adapter_params(model, "default")
    assert len(theta) == 4  # lora_A and lora_B of two layers
    reg = OLoRA(model, lam1=5.0, lam2=0.25)
    torch.testing.assert_close(reg(model), 0.25 * sum(p.square().sum() for p in theta))
    reg.lam2 = 0.0
    value = reg(model)
    assert value.shape == () and float(value) == 0.0 and not value.requires_grad


# -- the normalisation: what λ₁ = 1 means --------------------------------------------------------------


def test_the_normalised_value_is_the_same_across_ranks_widths_layers_and_scales() -> None:
    """Identical subspaces give 1, half-shared ones 1/2, orthogonal ones 0, whatever r, d, the number
    of layers and of earlier tasks, and the scale and basis of each A; the raw form moves with all."""
    raw = []
    for r, d in ((2, 8), (8, 64), (16, 512)):
        g = torch.Generator().manual_seed(r)
        rows = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].T  # orthonormal

        def span(*blocks: torch.Tensor, scale: float, g: torch.Generator = g) -> torch.Tensor:
            basis = torch.cat(blocks)  # another basis of these rows' span, at another scale
            return scale * torch.randn(len(basis), len(basis), generator=g, dtype=torch.float64) @ basis

        h = r // 2
        task_1 = span(rows[:r], scale=1.0)
        task_2 = span(rows[r : 2 * r], scale=3.0)
        same, apart = span(rows[:r], scale=40.0), span(rows[2 * r : 3 * r], scale=0.02)
        halfway = span(rows[:h], rows[3 * r : 3 * r + h], scale=7.0)  # half in task 1's subspace
        cases = {  # (current A per layer, earlier A's per layer): the value
            "same": ([same], [[task_1]], 1.0),
            "apart": ([apart], [[task_1]], 0.0),
            "halfway": ([halfway], [[task_1]], 0.5),
            "two layers": ([same, apart], [[task_1], [task_1]], 0.5),
            "two tasks": ([same], [[task_1, task_2]], 0.5),
        }
        for name, (current, past, expected) in cases.items():
            value = orthogonality(current, past, "subspace", eps=1e-12)
            # the ridge ε = 1e-12 lowers the value by a relative O(ε κ²), κ ≤ 1e3 for these random bases
            torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0, msg=name)
        raw.append(float(orthogonality([same], [[task_1]], None)))
    assert max(raw) / min(raw) > 100.0  # the paper's form of the same full overlap


@pytest.mark.parametrize(("a", "b", "d"), [(1, 4, 16), (4, 4, 64), (8, 2, 32)])
def test_random_subspaces_give_the_chance_level(a, b, d) -> None:
    """For uniformly random subspaces of dimensions a and b in R^d, E‖P_a P_b‖²_F = ab/d, so the
    subspace form's expectation is max(a, b)/d; two random directions have E cos² = 1/d."""
    g = torch.Generator().manual_seed(a * 100 + d)
    n = 300  # draws, as layers: the normalised forms average over layers
    current = [torch.randn(a, d, generator=g, dtype=torch.float64) for _ in range(n)]
    past = [[torch.randn(b, d, generator=g, dtype=torch.float64)] for _ in range(n)]
    subspace, cosine = (float(orthogonality(current, past, form, eps=1e-12)) for form in ("subspace", "cosine"))
    assert subspace == pytest.approx(max(a, b) / d, rel=0.1)
    assert cosine == pytest.approx(1 / d, rel=0.1)


@pytest.mark.parametrize(("a", "b", "d"), [(2, 4, 64), (8, 8, 256)])
def test_the_raw_form_at_peft_initialisation_is_ab_over_9d(a, b, d) -> None:
    """PEFT draws lora_A uniform in ±1/√d (variance 1/(3d)), so a dot product of two rows has variance
    1/(9d) and E‖A_t A_sᵀ‖²_F = ab/(9d): the raw form's size is set by the rank and the width."""
    model = peft.get_peft_model(nn.Sequential(nn.Linear(d, 2)), peft.LoraConfig(r=a, target_modules=["0"]))
    model.add_adapter("t2", peft.LoraConfig(r=b, target_modules=["0"]))
    layer = model.base_model.model[0]
    torch.manual_seed(0)
    values = []
    for _ in range(150):
        for adapter in ("default", "t2"):
            layer.reset_lora_parameters(adapter, True)
        a_t, a_s = layer.lora_A["t2"].weight.detach(), layer.lora_A["default"].weight.detach()
        values.append(float((a_t @ a_s.T).square().sum()))
    assert sum(values) / len(values) == pytest.approx(a * b / (9 * d), rel=0.12)


# -- the attached mode -------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", NORMS)
def test_attached_mode_adds_the_definitions_gradient_once_per_step(normalize) -> None:
    model, reg, earlier = three_tasks()
    reg.normalize, reg.lam1, reg.lam2 = normalize, 0.7, 0.3
    theta = adapter_params(model, "t3")
    expected = torch.autograd.grad(definition(downs(model, "t3"), earlier, normalize, 0.7, 0.3, theta), theta)

    class Tracker:  # stands for SI: asks the ledger for what the penalty adds to θ
        def tracked_parameters(self) -> list[torch.Tensor]:
            return theta

    tracker = Tracker()
    reg.ledger.register(tracker)
    opt = torch.optim.SGD(theta, lr=0.0)  # lr 0: θ stays, so each step adds the same gradient
    reg.attach(opt)
    task = [torch.full_like(p, 0.5) for p in theta]
    for p, t in zip(theta, task):
        p.grad = t.clone()
    theta[-1].grad = None  # no gradient: skipped
    value = reg(model)
    assert not value.requires_grad and float(value) > 0.0  # the value alone, for logging
    for step in (1, 2):
        opt.step()
        for p, t, e in zip(theta[:-1], task, expected):
            torch.testing.assert_close(p.grad, t + step * e, rtol=1e-9, atol=1e-12)
        assert theta[-1].grad is None
        for got, e in zip(reg.ledger.take(theta[:-1]), expected):
            torch.testing.assert_close(got, e, rtol=1e-9, atol=1e-12)
    reg.detach()
    opt.step()  # detached: nothing more
    torch.testing.assert_close(theta[0].grad, task[0] + 2 * expected[0], rtol=1e-9, atol=1e-12)


def test_the_subspace_forms_ridge_is_in_its_value_and_both_modes_gradients() -> None:
    """With a large ε the ridge δ = ε tr(A_t A_tᵀ)/r_t shows: ρ = tr((A_t A_tᵀ + δI)⁻¹ A_t Q_sᵀ Q_s
    A_tᵀ) / min(r_t, r_s), Q_s an orthonormal basis of A_s's rows, written here; autograd and attached
    agree."""
    model = lora(r=2)
    randomize(model, "default", 1)
    old = [a.detach().clone() for a in downs(model, "default")]
    reg = OLoRA(model, eps=0.3)
    reg.consolidate(model)
    new_task(model, "t2", 3, seed=2)
    current = downs(model, "t2")
    terms = []
    for a, a_s in zip(current, old):
        q_s = torch.linalg.qr(a_s.T)[0]  # d × 2
        gram = a @ a.T
        ridged = gram + 0.3 * gram.trace() / 3 * torch.eye(3, dtype=a.dtype)
        terms.append(torch.trace(torch.linalg.inv(ridged) @ (a @ q_s) @ (a @ q_s).T) / 2)
    expected = sum(terms) / len(terms)
    value = reg(model)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    reg.eps = 1e-12
    assert float(expected.detach()) < 0.9 * float(reg(model).detach())  # the ridge matters here
    reg.eps = 0.3
    reference = torch.autograd.grad(expected, current)
    for g, r in zip(torch.autograd.grad(value, current), reference):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    for a in current:
        a.grad = torch.zeros_like(a)
    reg.attach(torch.optim.SGD(current, lr=0.1), hook=False)
    reg.pre_step()
    for a, r in zip(current, reference):
        torch.testing.assert_close(a.grad, r, rtol=1e-9, atol=1e-12)


def test_an_attached_optimizer_of_an_earlier_task_is_an_error_at_its_step() -> None:
    model = lora()
    randomize(model, "default", 1)
    reg = OLoRA(model, lam2=0.1)
    opt = torch.optim.SGD(adapter_params(model, "default"), lr=0.1)
    reg.attach(opt)
    reg.consolidate(model)
    new_task(model, "t2", 2, seed=2)  # without detach() and a new optimizer
    model(torch.randn(3, 6, dtype=torch.float64)).sum().backward()
    with pytest.raises(ValueError, match="holds none of adapter 't2'"):
        opt.step()
    reg.detach()
    theta = adapter_params(model, "t2")
    before = [p.grad.clone() for p in theta]
    expected = torch.autograd.grad(reg(model), theta)
    reg.attach(torch.optim.SGD(theta, lr=0.1), hook=False)
    reg.pre_step()
    for p, b, e in zip(theta, before, expected):
        torch.testing.assert_close(p.grad, b + e, rtol=1e-9, atol=1e-12)


# -- the contract, a tiny Llama, dtypes ------------------------------------------------------------------


@pytest.mark.parametrize("normalize", NORMS)
def test_contract(normalize) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))

    def reference(model, reg, inputs, tasks):
        earlier = [[downs(task.model, "default")[i].detach() for task in tasks] for i in range(len(LAYERS))]
        return definition(downs(model, "default"), earlier, reg.normalize, reg.lam1)

    make = lambda m: OLoRA(m, lam1=1.5, normalize=normalize, eps=1e-12)  # noqa: E731
    check_regularizer(make, lora(dtype=torch.float32), data, reference=reference, compile=normalize == "subspace")


def test_tiny_llama_attention_projections() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj"]
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=4, target_modules=targets))
    reg = OLoRA(model, lam1=1.0, eps=1e-12)
    assert len(reg.layers) == 4 and all(p.endswith(("q_proj", "v_proj")) for p in reg.layers)
    tokens = torch.randint(0, 64, (2, 12))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # train task 1's adapter a little (B leaves zero)
        opt.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
    reg.consolidate(model)
    model.add_adapter("t2", peft.LoraConfig(r=8, target_modules=targets))
    model.base_model.set_adapter(["default", "t2"])
    model.set_requires_grad("default", False)
    params = dict(model.named_parameters())
    a_of = lambda adapter: [params[f"{p}.lora_A.{adapter}.weight"] for p in reg.layers]  # noqa: E731
    for normalize in NORMS:
        reg.normalize = normalize
        expected = definition(a_of("t2"), [[a.detach()] for a in a_of("default")], normalize)
        torch.testing.assert_close(reg(model), expected, rtol=1e-5, atol=1e-7)
    reg.normalize = "subspace"
    opt.zero_grad()
    loss = model(input_ids=tokens, labels=tokens).loss + reg(model)
    loss.backward()
    assert all(params[f"{p}.lora_A.t2.weight"].grad.abs().sum() > 0 for p in reg.layers)
    assert all(params[f"{p}.lora_A.default.weight"].grad is None for p in reg.layers)  # frozen: task 1's


def test_a_convolution_adapter_reads_its_a_flattened() -> None:
    base = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "3"])).double()
    randomize(model, "default", 1)
    reg = OLoRA(model, eps=1e-12)
    assert reg.widths == [2 * 3 * 3, 16]
    reg.consolidate(model)
    params = dict(model.named_parameters())
    a_of = lambda adapter: [params[f"base_model.model.{i}.lora_A.{adapter}.weight"] for i in (0, 3)]  # noqa: E731
    old = [a.detach().reshape(2, -1).clone() for a in a_of("default")]
    model.add_adapter("t2", peft.LoraConfig(r=3, target_modules=["0", "3"]))
    model.to(torch.float64)
    model.base_model.set_adapter(["default", "t2"])
    model.set_requires_grad("default", False)
    randomize(model, "t2", 2)
    params = dict(model.named_parameters())
    current = a_of("t2")
    assert current[0].shape == (3, 2, 3, 3)
    for normalize in NORMS:
        reg.normalize = normalize
        expected = definition([a.reshape(3, -1) for a in current], [[o] for o in old], normalize)
        value = reg(model)
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12)
        reference = torch.autograd.grad(expected, current)
        for a in current:
            a.grad = torch.zeros_like(a)
        reg.attach(torch.optim.SGD(current, lr=0.1), hook=False)
        reg.pre_step()  # the closed form, shaped as the convolution's A
        reg.detach()
        for a, r in zip(current, reference):
            torch.testing.assert_close(a.grad, r, rtol=1e-9, atol=1e-12)


def test_a_bf16_adapter_keeps_float32_state_and_value() -> None:
    model = lora(dtype=torch.bfloat16)
    reg = OLoRA(model)
    reg.consolidate(model)
    new_task(model, "t2", 2, seed=4)
    assert reg.past.tensors[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = reg(model)
    assert value.dtype == torch.float32 and 0.0 < float(value.detach()) < 1.0


# -- state -------------------------------------------------------------------------------------------


def test_state_round_trip_restores_value_gradient_and_hyperparameters() -> None:
    model, reg, _ = three_tasks()
    reg.lam1, reg.lam2, reg.normalize = 2.5, 0.1, "cosine"
    buf = io.BytesIO()
    torch.save(reg.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["past.base_model/model/body"].shape == (2 + 3, 6)  # ranks 2 and 3, stacked
    torch.testing.assert_close(state["ranks.ranks"], torch.tensor([[2, 2], [3, 3]]))

    again = OLoRA(model)  # other hyperparameters: the state brings its own
    again.load_state_dict(state, strict=True)
    assert (again.lam1, again.lam2, again.normalize, int(again.n_tasks)) == (2.5, 0.1, "cosine", 2)
    theta = adapter_params(model, "t3")
    a, b = reg(model), again(model)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    for u, v in zip(torch.autograd.grad(a, theta), torch.autograd.grad(b, theta)):
        torch.testing.assert_close(v, u, rtol=0, atol=0)

    other = peft.get_peft_model(Net(), config(2, ("body", "mid"))).double()
    with pytest.raises(ValueError, match=r"layer 'base_model\.model\.head' of width 10"):
        OLoRA(other).load_state_dict(state, strict=True)


def test_a_new_peft_model_on_merged_weights_continues_with_the_same_adapter_name() -> None:
    model = lora()
    randomize(model, "default", 1)
    old = [a.detach().clone() for a in downs(model, "default")]
    reg = OLoRA(model, normalize=None)
    reg.consolidate(model)
    # the other way to keep task 1's update: merge it into the base weights, then a fresh adapter
    model = peft.get_peft_model(model.merge_and_unload(), config(3)).double()
    randomize(model, "default", 2)
    torch.testing.assert_close(reg(model), definition(downs(model, "default"), [[o] for o in old], None))
    assert reg.param_names[0] == "base_model.model.body.lora_A.default.weight"


# -- refusals ----------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors() -> None:
    model = lora()
    with pytest.raises(ValueError, match="lam1 must be in"):
        OLoRA(model, lam1=-1.0)
    with pytest.raises(ValueError, match="lam2 must be in"):
        OLoRA(model, lam2=float("nan"))
    with pytest.raises(ValueError, match="eps must be in"):
        OLoRA(model, eps=0.0)
    with pytest.raises(ValueError, match="normalize must be one of"):
        OLoRA(model, normalize="frobenius")
    with pytest.raises(TypeError, match="adapter must be"):
        OLoRA(model, adapter=3)
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        OLoRA(model, adapter="nope")
    with pytest.raises(TypeError, match="PEFT LoRA layers"):
        OLoRA(Net())
    with pytest.raises(TypeError, match="PEFT LoRA layers"):
        OLoRA(peft.get_peft_model(Net(), peft.IA3Config(target_modules=["body"], feedforward_modules=[])))
    reg = OLoRA(model)
    with pytest.raises(ValueError, match="normalize must be one of"):
        reg.normalize = "l2"
    with pytest.raises(TypeError, match=r"attach expects a torch\.optim\.Optimizer"):
        reg.attach(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="holds none of this regularizer's parameters"):
        reg.attach(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))
    reg.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="already attached"):
        reg.attach(torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_state_whose_ranks_do_not_match_its_rows_is_refused() -> None:
    model, reg, _ = three_tasks()
    state = reg.state_dict()
    bad = {**state, "ranks.ranks": torch.tensor([[2, 2], [2, 3]])}  # task 2 had rank 3 at the body
    with pytest.raises(ValueError, match=r"5 rows of A at layer 'base_model\.model\.body', its ranks sum to 4"):
        OLoRA(model).load_state_dict(bad)
    with pytest.raises(ValueError, match=r"ranks of shape \(2, 2\) \(min 2\) for 3 tasks"):
        OLoRA(model).load_state_dict({**state, "n_tasks": torch.tensor(3)})
    with pytest.raises(ValueError, match="positive rank"):
        OLoRA(model).load_state_dict({**state, "ranks.ranks": torch.tensor([[2, 5], [3, 0]])})


def test_a_layer_without_room_for_an_orthogonal_adapter_warns() -> None:
    model = lora(r=3)
    randomize(model, "default", 1)
    reg = OLoRA(model)
    reg.consolidate(model)
    new_task(model, "t2", 3, seed=2)  # the body's 6 input dimensions: 3 + 3 fit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg(model)
    reg.consolidate(model)
    new_task(model, "t3", 1, seed=3)  # 6 of 6 taken: a line cannot be orthogonal to both planes
    with pytest.warns(UserWarning, match=r"span 6 of the 6 input dimensions of layer 'base_model\.model\.body'"):
        value = reg(model)
    assert float(value.detach()) > 0.0


def test_an_adapter_replaced_under_the_same_name_is_looked_up_again() -> None:
    model = lora()
    randomize(model, "default", 1)
    old = [a.detach().clone() for a in downs(model, "default")]
    reg = OLoRA(model, normalize=None)
    reg.consolidate(model)
    new_task(model, "t2", 2, seed=2)
    torch.testing.assert_close(reg(model), definition(downs(model, "t2"), [[o] for o in old], None))
    model.delete_adapter("t2")  # and again, with another rank: not the cached parameters
    new_task(model, "t2", 4, seed=3)
    assert downs(model, "t2")[0].shape == (4, 6)
    torch.testing.assert_close(reg(model), definition(downs(model, "t2"), [[o] for o in old], None))


def test_the_current_adapter_must_be_one_and_on_the_same_layers() -> None:
    model = lora()
    reg = OLoRA(model)
    reg.consolidate(model)
    model.add_adapter("t2", config())
    model.base_model.set_adapter(["default", "t2"])  # both train
    with pytest.raises(ValueError, match=r"several LoRA adapters train \(\['default', 't2'\]"):
        reg(model)
    reg.adapter = "t2"  # named: no ambiguity
    assert float(reg(model).detach()) > 0.0
    reg.adapter = None
    model.set_requires_grad(["default", "t2"], False)
    with pytest.raises(ValueError, match="no LoRA adapter of this model trains"):
        reg(model)

    fewer = lora()
    reg = OLoRA(fewer)
    reg.consolidate(fewer)
    new_task(fewer, "t2", 2, seed=1, targets=("body",))
    with pytest.raises(ValueError, match=r"layer 'base_model\.model\.head' has no LoRA adapter 't2'"):
        reg(fewer)
    more = lora()
    reg = OLoRA(more)
    reg.consolidate(more)
    new_task(more, "t2", 2, seed=1, targets=("body", "mid", "head"))
    with pytest.raises(ValueError, match=r"layer 'base_model\.model\.mid' is adapted by 't2'"):
        reg.consolidate(more)


# -- DDP and FSDP2 -----------------------------------------------------------------------------------


def _ddp_case(world: int, rank: int) -> dict[str, torch.Tensor]:
    """Task 1: one SGD step of the adapter "default" under DDP, each rank on its half of the batch, then
    consolidate; task 2: a new adapter under a new DDP wrapper, its gradient (task loss on this rank's
    half + penalty) in the autograd mode and attached. With world 1: the whole batch, no DDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = peft.get_peft_model(Net(), config(2)).float()
    randomize(model, "default", 1)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 6, generator=g), torch.tensor([0, 1, 2, 0])
    if world > 1:
        x, y = x[2 * rank : 2 * rank + 2], y[2 * rank : 2 * rank + 2]
    wrapped = DDP(model) if world > 1 else model
    reg = OLoRA(wrapped, lam1=0.7, lam2=0.3)
    assert reg.layers == LAYERS  # the wrapper's "module." is looked through
    opt = torch.optim.SGD(adapter_params(model, "default"), lr=0.5)
    (F.cross_entropy(wrapped(x), y) + reg(wrapped)).backward()
    opt.step()
    reg.consolidate(wrapped)  # task 1's A: the same on every rank, no communication
    new_task(model, "t2", 3, seed=2)
    wrapped = DDP(model) if world > 1 else model  # the trainable parameters changed: a new wrapper
    theta = adapter_params(model, "t2")
    out = {f"past/{i}": t.clone() for i, t in enumerate(reg.past.tensors)} | {"ranks": reg.ranks.tensors[0].clone()}
    for attached in (False, True):
        model.zero_grad()
        loss = F.cross_entropy(wrapped(x), y)
        if attached:
            reg.attach(torch.optim.SGD(theta, lr=0.1), hook=False)
            loss.backward()  # DDP averages the task's gradient; the penalty's is added after
            reg.pre_step()
            reg.detach()
        else:
            (loss + reg(wrapped)).backward()  # every rank's penalty gradient is the same: its average
        out.update({f"{attached}/{i}": p.grad.clone() for i, p in enumerate(theta)})
    return out


def _fsdp_case(world: int, per_layer: bool) -> dict[str, torch.Tensor]:
    """Task 1's adapter consolidated, then one step of task 2's (task loss + penalty) on the same batch
    on every rank, in the autograd mode and attached: the value, the gathered gradients of task 2's
    adapter and the state."""
    model = peft.get_peft_model(Net(), config(2)).float()
    model.add_adapter("t2", config(3))
    model.base_model.set_adapter(["default", "t2"])
    for name, seed in (("default", 1), ("t2", 2)):
        randomize(model, name, seed)
    model.set_requires_grad("t2", False)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        if per_layer:
            for layer in (model.base_model.model.body, model.base_model.model.head):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 6, generator=g), torch.tensor([0, 1, 2, 0, 1])
    out = {}
    for normalize in NORMS:
        reg = OLoRA(model, lam1=0.7, lam2=0.3, normalize=normalize)
        reg.consolidate(model)
        model.set_requires_grad("default", False)
        model.set_requires_grad("t2", True)
        theta = {n: p for n, p in model.named_parameters() if ".t2." in n}
        model.zero_grad()
        value = reg(model)
        (F.cross_entropy(model(x), y) + value).backward()
        out[f"{normalize}/value"] = value.detach()
        out[f"{normalize}/past"] = reg.past.tensors[1].clone()
        for n, p in theta.items():
            out[f"{normalize}/sharded/{n}"] = torch.tensor(is_sharded(p))
            out[f"{normalize}/grad/{n}"] = full(p.grad).detach()
        reg.attach(torch.optim.SGD(list(theta.values()), lr=0.1), hook=False)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        reg.pre_step()  # adds to each rank's shard of .grad
        reg.detach()
        for n, p in theta.items():
            out[f"{normalize}/attached/{n}"] = full(p.grad).detach()
        model.set_requires_grad("t2", False)
        model.set_requires_grad("default", True)
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = {f"ddp/{key}": v for key, v in _ddp_case(2, rank).items()}
        result.update({f"{k}/{key}": v for k in (False, True) for key, v in _fsdp_case(2, k).items()})
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_give_the_single_process_state_value_and_gradients(tmp_path) -> None:
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("FSDP2 (fully_shard) is not available")
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import test_olora as t; "
        "t._worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    init = str(tmp_path / "init")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), init, str(tmp_path)], env=env) for r in range(2)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    single = {f"ddp/{key}": v for key, v in _ddp_case(1, 0).items()}
    single.update({f"{k}/{key}": v for k in (False, True) for key, v in _fsdp_case(1, k).items()})
    for key, grad in single.items():  # attached == autograd, single process
        if "/attached/" in key:
            torch.testing.assert_close(grad, single[key.replace("/attached/", "/grad/")], rtol=1e-5, atol=1e-6)
        elif key.startswith("ddp/True/"):
            torch.testing.assert_close(grad, single[key.replace("/True/", "/False/")], rtol=1e-5, atol=1e-6)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for i in range(len(LAYERS)):  # DDP: the same state on every rank
        assert torch.equal(ranks[0][f"ddp/past/{i}"], ranks[1][f"ddp/past/{i}"])
    for result in ranks:
        assert sorted(result) == sorted(single)
        for key, expected in single.items():
            if "/sharded/" in key:
                assert bool(result[key]) and not bool(expected), key  # the A's and B's were DTensors
            else:
                torch.testing.assert_close(result[key], expected, rtol=1e-5, atol=1e-6, msg=key)
