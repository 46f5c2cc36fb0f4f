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
