"""clreg against Avalanche's own EWC plugin (runs where avalanche-lib is installed: ``pip install
clreg[avalanche]``; skipped otherwise). These pin down the conversion the conventions page gives:
Avalanche's importance is clreg's ``batched`` Fisher at its batch size, and its penalty has no ½."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import clreg
from clreg.functional import fisher_diagonal

plugins = pytest.importorskip("avalanche.training.plugins", reason="avalanche-lib is not installed")


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    return model, x, y


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_avalanche_importance_is_the_batched_fisher(batch_size: int) -> None:
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    data = TensorDataset(x, y, torch.zeros(len(y), dtype=torch.long))
    imp = plugins.EWCPlugin(ewc_lambda=1.0).compute_importances(
        model, torch.nn.CrossEntropyLoss(), opt, data, torch.device("cpu"), batch_size
    )
    ours = fisher_diagonal(model, TensorDataset(x, y), estimator="batched", batch_size=batch_size)
    for name, value in ours.items():
        torch.testing.assert_close(value, imp[name].data, rtol=1e-5, atol=1e-9)
    if batch_size > 1:  # and it is not the per-sample Fisher
        per_sample = fisher_diagonal(model, TensorDataset(x, y), estimator="empirical")
        assert sum(v.sum() for v in ours.values()) < 0.9 * sum(v.sum() for v in per_sample.values())


def test_avalanche_penalty_is_clreg_ewc_with_twice_the_lambda() -> None:
    model, x, y = _setup(1)
    lam_av, batch_size = 0.7, 8
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    data = TensorDataset(x, y, torch.zeros(len(y), dtype=torch.long))
    plugin = plugins.EWCPlugin(ewc_lambda=lam_av)
    strategy = SimpleNamespace(
        model=model, optimizer=opt, device=torch.device("cpu"), _criterion=torch.nn.CrossEntropyLoss(),
        clock=SimpleNamespace(train_exp_counter=0), experience=SimpleNamespace(dataset=data),
        train_mb_size=batch_size, loss=None,
    )  # fmt: skip
    plugin.after_training_exp(strategy)
    ewc = clreg.EWC(model, lam=2 * lam_av, estimator="batched")
    ewc.consolidate(model, DataLoader(TensorDataset(x, y), batch_size=batch_size))
    with torch.no_grad():  # move away from the anchor
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    strategy.clock.train_exp_counter = 1
    strategy.loss = torch.zeros(())
    plugin.before_backward(strategy)
    torch.testing.assert_close(ewc(model), strategy.loss, rtol=1e-5, atol=1e-8)
    assert float(strategy.loss.detach()) > 0


def _agem_step_both(seed: int) -> int:
    """Avalanche's AGEMPlugin and clreg.AGEM on the same model, memory draw and batch: the gradient the
    optimizer steps with is the same (the plugin's draw is pinned to the draw clreg makes of its whole
    memory; both reference losses are the mean cross-entropy over the draw)."""
    model, x, y = _setup(seed)
    mem_x, mem_y = x[:8], (y[:8] + 1) % 3  # other labels: the two gradients tend to conflict
    task_x, task_y = x[8:24], y[8:24]

    twin = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.0)
    plugin = plugins.AGEMPlugin(patterns_per_experience=8, sample_size=8)
    plugin.buffers = [TensorDataset(mem_x, mem_y)]  # non-empty: the plugin projects
    plugin.sample_from_memory = lambda: (mem_x, mem_y, torch.zeros(8, dtype=torch.long))
    strategy = SimpleNamespace(
        model=twin, optimizer=twin_opt, device=torch.device("cpu"), _criterion=torch.nn.CrossEntropyLoss()
    )
    plugin.before_training_iteration(strategy)
    torch.nn.functional.cross_entropy(twin(task_x), task_y).backward()
    plugin.after_backward(strategy)
    theirs = [p.grad.clone() for p in twin.parameters()]

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    memory = clreg.ReplayBuffer(8)
    memory.add(0, (mem_x, mem_y))
    loss_fn = lambda m, a, b: torch.nn.functional.cross_entropy(m(a), b)  # noqa: E731
    agem = clreg.AGEM(model, loss_fn, memory=memory, sample_size=8).attach(opt)
    ours: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, a, k: ours.append([p.grad.clone() for p in model.parameters()]))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(task_x), task_y).backward()
    opt.step()
    for a, b in zip(ours[0], theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    return int(agem.projections)


def test_agem_projects_as_avalanches_plugin() -> None:
    """Over six seeds the gradients agree, with and without a projection (both cases occur)."""
    projected = [_agem_step_both(seed) for seed in range(6)]
    assert 0 < sum(projected) < len(projected), projected
