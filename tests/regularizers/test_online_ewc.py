"""OnlineEWC: γ = 0 is EWC on the last task, γ decays the running Fisher; it takes EWC's Fisher options as
they are, validated once."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import clreg
from clreg.regularizers.ewc import FisherOptions
from models import MLP, classification, train_a_bit


def test_online_ewc_passes_every_fisher_option_to_ewc() -> None:
    model = MLP()
    calls = []
    reg = clreg.OnlineEWC(
        model, 2.0, 0.5, estimator="exact", mc_samples=3, max_samples=7, chunk_size=2, seed=4,
        params=["net.0.weight"], progress=lambda done, total: calls.append(done),
    )  # fmt: skip
    assert reg.lam == 2.0 and reg.gamma == 0.5 and reg.param_names == ["net.0.weight"]
    assert reg.fisher_options == FisherOptions("exact", 3, 7, 2, 4, reg.fisher_options.progress)
    assert clreg.OnlineEWC(model).fisher_options == clreg.EWC(model).fisher_options == FisherOptions()
    with pytest.raises(TypeError, match="estimater"):
        clreg.OnlineEWC(model, estimater="exact")
    with pytest.raises(TypeError, match="lam"):
        clreg.OnlineEWC(model, 1.0, 1.0, lam=2.0)


def test_fisher_options_are_frozen_and_validated() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        FisherOptions().seed = 3
    for kw, match in [
        ({"estimator": "fast"}, "estimator must be one of"),
        ({"mc_samples": 0}, "mc_samples must be an int >= 1"),
        ({"max_samples": 0}, "max_samples must be an int >= 1 or None"),
        ({"chunk_size": 1.5}, "chunk_size must be an int >= 1 or None"),
    ]:
        with pytest.raises(ValueError, match=match):
            clreg.OnlineEWC(MLP(), **kw)
    with pytest.raises(TypeError, match="seed must be an int"):
        clreg.EWC(MLP(), seed="0")
    with pytest.raises(TypeError, match="progress must be callable"):
        FisherOptions(progress=3)


def test_online_ewc_gamma_zero_is_ewc_on_last_task_and_gamma_decays() -> None:
    torch.manual_seed(1)
    model = MLP()
    online = clreg.OnlineEWC(model, lam=3.0, gamma=0.0, estimator="exact")
    decayed = clreg.OnlineEWC(model, lam=3.0, gamma=0.5, estimator="exact")
    fishers = []
    for t in range(2):
        data = classification(t)
        train_a_bit(model, data)
        online.consolidate(model, data)
        decayed.consolidate(model, data)
        fishers.append(clreg.functional.fisher_diagonal(model, data, estimator="exact"))
    last = clreg.EWC(model, lam=3.0, estimator="exact")
    last.consolidate(model, data)
    train_a_bit(model, classification(5))
    torch.testing.assert_close(online(model), last(model))
    for name, big in zip(decayed.param_names, decayed.importance.tensors):
        torch.testing.assert_close(big, 0.5 * fishers[0][name] + fishers[1][name])
