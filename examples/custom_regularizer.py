"""A regularizer of your own, declared like clreg's, and checked by clreg's contract.

python examples/custom_regularizer.py          # a few seconds on a CPU
python examples/custom_regularizer.py --smoke  # the same: the contract is small

``L2Anchor`` keeps the parameters near those at the last consolidation, λ Σ (θ − θ*)². It inherits
the quadratic machinery (the closed-form gradient, the attached mode, the ledger SI reads), declares
its hyperparameter for the checkpoint, and passes :func:`clreg.testing.check_regularizer` against a
reference written from its definition.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import TensorDataset

import clreg
from clreg.testing import check_regularizer


class L2Anchor(clreg.QuadraticPenalty):
    """λ Σ_i (θ_i − θ*_i)², θ* the parameters at the last consolidation."""

    hyperparameters = ("lam",)  # saved with the state, set through the property on load

    def __init__(self, model: torch.nn.Module, lam: float = 1.0, *, params=None) -> None:
        super().__init__(model, params)  # declares importance, anchor and offset with add_state
        self.lam = lam

    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"lam must be >= 0, got {value}")
        self._lam = float(value)

    @property
    def scale(self) -> float:
        return self._lam

    def consolidate(self, model: torch.nn.Module, data=None, spec=None) -> None:
        params = self._resolve(model)
        with torch.no_grad():
            for importance in self.importance.tensors:
                importance.fill_(1.0)
            self.anchor.set([p.detach() for p in params])
        self._bump_tasks()
        self._state_changed()


def reference(model, reg, inputs, tasks) -> torch.Tensor:
    """λ Σ (θ − θ*)² with θ* the model at the last consolidation, in plain PyTorch."""
    anchor = dict(tasks[-1].model.named_parameters())
    return reg.lam * sum(((p - anchor[n].detach()) ** 2).sum() for n, p in model.named_parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    check_regularizer(lambda m: L2Anchor(m, lam=0.5), model, data, reference=reference)
    print("L2Anchor passes the clreg.testing contract")


if __name__ == "__main__":
    main()
