"""What every regularizer shares: a zero tensor before consolidation, range errors on hyperparameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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


@pytest.mark.parametrize("cls", [clreg.EWC, clreg.OnlineEWC, clreg.MAS])
def test_a_parameter_frozen_after_the_regularizer_was_built_is_named_at_consolidate(cls) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    data = torch.utils.data.TensorDataset(torch.randn(6, 3), torch.randint(0, 2, (6,)))
    reg = cls(model)
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"1 of its parameters no longer require grad \(e.g. '0.weight'\)"):
        reg.consolidate(model, data)
    model[0].weight.requires_grad_(True)
    reg.consolidate(model, data)
    assert int(reg.n_tasks) == 1


class _PartitionedStatus:
    """What DeepSpeed ZeRO-3 hangs on each parameter it partitions (``param.ds_status``)."""


@pytest.mark.parametrize(
    "make", [lambda m: clreg.EWC(m, lam=1.0), lambda m: clreg.SI(m, c=1.0), lambda m: clreg.MAS(m, lam=1.0)]
)
def test_parameters_partitioned_by_zero3_are_refused_by_name(make) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].weight.ds_status = _PartitionedStatus()
    with pytest.raises(ValueError, match=r"parameter '1\.weight' is partitioned by DeepSpeed ZeRO-3"):
        make(model)
    del model[1].weight.ds_status
    reg = make(model)  # built on whole parameters, then partitioned in place
    model[0].bias.ds_status = _PartitionedStatus()
    other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    other.load_state_dict(model.state_dict())
    other[0].bias.ds_status = _PartitionedStatus()
    with pytest.raises(ValueError, match=r"parameter '0\.bias' is partitioned by DeepSpeed ZeRO-3"):
        reg._pset.resolve(other)
