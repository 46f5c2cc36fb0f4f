"""What every regularizer shares: a zero tensor before consolidation, range errors on hyperparameters."""

from __future__ import annotations

import pytest
import torch

import clreg
from models import MLP


def test_zero_before_consolidation_and_range_errors() -> None:
    model = MLP()
    for reg in (clreg.EWC(model), clreg.OnlineEWC(model), clreg.MAS(model), clreg.SI(model), clreg.LwF(model)):
        v = reg(model, inputs=torch.randn(2, 4))
        assert isinstance(v, torch.Tensor) and v.shape == () and v.item() == 0.0
    with pytest.raises(ValueError, match="lam must be in"):
        clreg.EWC(model, lam=-1.0)
    with pytest.raises(ValueError, match="gamma must be in"):
        clreg.OnlineEWC(model, gamma=1.5)
    with pytest.raises(ValueError, match="xi must be in"):
        clreg.SI(model, xi=0.0)
    with pytest.raises(ValueError, match="c must be in"):
        clreg.SI(model, c=-0.1)
    with pytest.raises(ValueError, match="temperature must be in"):
        clreg.LwF(model, temperature=0.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        clreg.LwF(model, alpha=-1)
    with pytest.raises(ValueError, match="clamp must be one of"):
        clreg.SI(model, clamp="always")
    with pytest.raises(ValueError, match="estimator must be one of"):
        clreg.EWC(model, estimator="fast")
    with pytest.raises(ValueError, match="weight must be >= 0"):
        clreg.TaskSpec(weight=-1.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        clreg.OutputSpec(kind="logits")
    ewc = clreg.EWC(model, lam=1.0)
    with pytest.raises(ValueError, match="lam must be in"):
        ewc.lam = float("nan")
