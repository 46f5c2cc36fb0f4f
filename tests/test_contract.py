"""``clreg.testing.check_regularizer`` on every regularizer, each against its own reference written from
the definitions; and the contract catches broken regularizers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import clreg
from clreg.testing import TaskRecord, check_regularizer
from models import MLP


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def squared_distance(model: torch.nn.Module, weight: dict, anchor: dict) -> torch.Tensor:
    """Σ_i weight_i (θ_i − anchor_i)², differentiable in the model's parameters."""
    return sum((weight[n] * (p - anchor[n]) ** 2).sum() for n, p in model.named_parameters())


def per_sample_mean(task: TaskRecord, statistic) -> dict[str, torch.Tensor]:
    """The mean over the task's samples of ``statistic(model, x, y) -> {name: tensor}`` at the
    consolidated model, by a plain loop."""
    x, y = task.batch
    total: dict[str, torch.Tensor] = {}
    for i in range(len(x)):
        for n, v in statistic(task.model, x[i : i + 1], y[i]).items():
            total[n] = total.get(n, 0) + v / len(x)
    return total


def grads_of(model: torch.nn.Module, value: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters())
    return dict(zip(names, torch.autograd.grad(value, params, retain_graph=True)))


def exact_fisher(model, x, y) -> dict:
    """Σ_c p_c (∂ log p_c)²."""
    logp = F.log_softmax(model(x), 1)[0]
    out: dict = {}
    for c in range(logp.numel()):
        for n, g in grads_of(model, logp[c]).items():
            out[n] = out.get(n, 0) + logp[c].exp().detach() * g.square()
    return out


def empirical_fisher(model, x, y) -> dict:
    """(∂ log p_y)² with the true label."""
    return {n: g.square() for n, g in grads_of(model, F.log_softmax(model(x), 1)[0, y]).items()}


def mas_statistic(model, x, y) -> dict:
    """abs(∂‖f(x)‖²)."""
    return {n: g.abs() for n, g in grads_of(model, model(x).square().sum()).items()}


def ewc_reference(model, reg, inputs, tasks) -> torch.Tensor:
    """(λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)², task by task (no collapse)."""
    return (
        reg.lam / 2 * sum(squared_distance(model, per_sample_mean(t, exact_fisher), params_of(t.model)) for t in tasks)
    )


def decayed_sum(tasks, statistic, gamma: float) -> dict:
    """S ← γ S + (the task's per-sample mean of ``statistic``), over the tasks in order."""
    running: dict = {}
    for t in tasks:
        running = {n: gamma * running.get(n, 0) + v for n, v in per_sample_mean(t, statistic).items()}
    return running


def online_ewc_reference(model, reg, inputs, tasks) -> torch.Tensor:
    """F* ← γ F* + F_t, anchor θ* at the last consolidation, (λ/2) Σ F* (θ − θ*)²."""
    running = decayed_sum(tasks, empirical_fisher, reg.gamma)
    return reg.lam / 2 * squared_distance(model, running, params_of(tasks[-1].model))


def mas_reference(model, reg, inputs, tasks) -> torch.Tensor:
    """Ω = Σ_t mean_n abs(∂‖f(x_n)‖²), one anchor, λ Σ Ω (θ − θ*)²."""
    omega: dict = {}
    for t in tasks:
        omega = {n: omega.get(n, 0) + v for n, v in per_sample_mean(t, mas_statistic).items()}
    return reg.lam * squared_distance(model, omega, params_of(tasks[-1].model))


def si_reference(model, reg, inputs, tasks) -> torch.Tensor:
    """From the path: ω = −Σ_steps g·Δθ with g the task loss's gradient, Ω ← max(Ω + ω/(Δ² + ξ), 0) with
    Δ the task's displacement, then c Σ Ω (θ − θ*)²."""
    start = tasks[0].steps[0].before
    big = {n: torch.zeros_like(v) for n, v in start.items()}
    for t in tasks:
        end = params_of(t.model)
        for n in big:
            omega = -sum(s.grad[n] * (s.after[n] - s.before[n]) for s in t.steps)
            big[n] = (big[n] + omega / ((end[n] - start[n]) ** 2 + reg.xi)).clamp(min=0.0)
        start = end
    return reg.c * squared_distance(model, big, params_of(tasks[-1].model))


def lwf_reference(model, reg, inputs, tasks) -> torch.Tensor:
    """α T² KL(softmax(teacher/T) ‖ softmax(student/T)), summed over classes, averaged over the batch."""
    temp = reg.temperature
    with torch.no_grad():
        log_q = F.log_softmax(tasks[-1].model(inputs) / temp, 1)
    log_p = F.log_softmax(model(inputs) / temp, 1)
    return reg.alpha * temp**2 * (log_q.exp() * (log_q - log_p)).sum(1).mean()


def kfac_factors(model, x, y) -> dict:
    """For the MLP's two linear layers: ã ãᵀ (input with a trailing 1) and g gᵀ (g: the gradient of
    log p_y with respect to the layer's output), one sample."""
    lin0, lin2 = model.net[0], model.net[2]
    z1 = lin0(x)
    h = torch.tanh(z1)
    z2 = lin2(h)
    g1, g2 = torch.autograd.grad(F.log_softmax(z2, 1)[0, y], [z1, z2])
    out = {}
    for name, a, g in (("0", x, g1), ("2", h, g2)):
        a = torch.cat([a[0].detach(), torch.ones(1, dtype=a.dtype)])
        out[f"{name}.A"], out[f"{name}.G"] = torch.outer(a, a), torch.outer(g[0], g[0])
    return out


def kronecker_quadratic(model, factors: dict, anchor: dict) -> torch.Tensor:
    """Σ over the MLP's two layers of vec(Δ)ᵀ (A ⊗ G) vec(Δ), Δ = [W, b] − [W*, b*], vec stacking columns."""
    total = 0.0
    for name in ("0", "2"):
        lin = model.get_submodule(f"net.{name}")
        delta = torch.cat(
            [lin.weight - anchor[f"net.{name}.weight"], (lin.bias - anchor[f"net.{name}.bias"])[:, None]], 1
        )
        vec = delta.t().reshape(-1)
        total = total + vec @ torch.kron(factors[f"{name}.A"], factors[f"{name}.G"]) @ vec
    return total


def kfac_reference(model, reg, inputs, tasks) -> torch.Tensor:
    """A ← γA + mean ã ãᵀ, G ← γG + mean g gᵀ per layer, one anchor, (λ/2) Σ vec(Δ)ᵀ (A ⊗ G) vec(Δ)."""
    running = decayed_sum(tasks, kfac_factors, reg.gamma)
    return reg.lam / 2 * kronecker_quadratic(model, running, params_of(tasks[-1].model))


def kfac_per_task_reference(model, reg, inputs, tasks) -> torch.Tensor:
    """Each task its own factors and anchor: (λ/2) Σ_t vec(Δ_t)ᵀ (A_t ⊗ G_t) vec(Δ_t)."""
    terms = [kronecker_quadratic(model, per_sample_mean(t, kfac_factors), params_of(t.model)) for t in tasks]
    return reg.lam / 2 * sum(terms)


CASES = {
    "ewc": (lambda m: clreg.EWC(m, lam=3.0, estimator="exact"), ewc_reference, {}),
    "online_ewc": (lambda m: clreg.OnlineEWC(m, lam=2.0, gamma=0.7, estimator="empirical"), online_ewc_reference, {}),
    "si": (lambda m: clreg.SI(m, c=0.5, xi=0.1), si_reference, {}),
    "mas": (lambda m: clreg.MAS(m, lam=4.0), mas_reference, {}),
    "kfac_ewc": (lambda m: clreg.KFACEWC(m, lam=3.0, gamma=0.6, estimator="empirical"), kfac_reference, {}),
    "kfac_ewc_per_task": (
        lambda m: clreg.KFACEWC(m, lam=3.0, per_task=True, estimator="empirical"),
        kfac_per_task_reference,
        {},
    ),
    "lwf": (
        lambda m: clreg.LwF(m, temperature=2.0, alpha=1.5),
        lwf_reference,
        {"value_dtype": torch.float32, "atol": 1e-7, "rtol": 1e-5},
    ),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_every_regularizer_passes_the_contract(kind: str) -> None:
    make, reference, options = CASES[kind]
    torch.manual_seed(0)
    check_regularizer(make, MLP(), data(), clreg.TaskSpec(), reference=reference, **options)


class DoubledGradient(clreg.EWC):
    """The right value with twice its gradient."""

    def forward(self, model, inputs=None, outputs=None):
        value = super().forward(model, inputs, outputs)
        return 2 * value - value.detach()


class Forgetful(clreg.EWC):
    """A hyperparameter changed at consolidation outside the saved state."""

    def consolidate(self, model, data=None, spec=None) -> None:
        super().consolidate(model, data, spec)
        self.boost = 3.0

    @property
    def scale(self) -> float:
        return getattr(self, "boost", 1.0) * self.lam / 2


class IntZero(clreg.EWC):
    """The int 0 before consolidation."""

    def forward(self, model, inputs=None, outputs=None):
        return 0 if self._n_tasks_py == 0 else super().forward(model, inputs, outputs)


class Hookless(clreg.EWC):
    """An attached mode that adds nothing to the gradient."""

    def _pre_step(self, mask) -> None:
        return None


class Careless(clreg.LwF):
    """No check of the model it is given."""

    def _resolve(self, model):
        return []


@pytest.mark.parametrize(
    ("cls", "reference", "match"),
    [
        (DoubledGradient, ewc_reference, "DoubledGradient fails check 'gradient'"),
        (DoubledGradient, None, "DoubledGradient fails check 'finite difference'"),
        (Forgetful, ewc_reference, "Forgetful fails check 'reference'"),
        (Forgetful, None, "Forgetful fails check 'state round trip'"),
        (IntZero, None, r"IntZero fails check 'zero': the value before any consolidation is 0 \(int\)"),
        (Hookless, None, "Hookless fails check 'attached'"),
    ],
)
def test_the_contract_catches_a_broken_regularizer(cls, reference, match: str) -> None:
    torch.manual_seed(0)
    with pytest.raises(AssertionError, match=match):
        check_regularizer(
            lambda m: cls(m, lam=3.0, estimator="exact"), MLP(), data(), reference=reference, compile=False
        )


def test_the_contract_catches_a_wrong_reference_and_a_missing_shape_check() -> None:
    torch.manual_seed(0)
    with pytest.raises(AssertionError, match="EWC fails check 'reference'"):
        check_regularizer(
            lambda m: clreg.EWC(m, lam=3.0, estimator="exact"),
            MLP(),
            data(),
            reference=lambda *args: 1.01 * ewc_reference(*args),
            compile=False,
        )
    with pytest.raises(AssertionError, match=r"Careless fails check 'bad input': no ValueError .*net\.0\.weight"):
        check_regularizer(lambda m: Careless(m), MLP(), data(), value_dtype=torch.float32, compile=False)
