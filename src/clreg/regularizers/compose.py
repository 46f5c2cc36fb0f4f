"""``Compose``: several regularizers as one.

Example:
    >>> import torch, clreg
    >>> model = torch.nn.Linear(4, 3)
    >>> reg = clreg.Compose(clreg.EWC(model, lam=1.0), clreg.LwF(model))
    >>> x = torch.randn(2, 4)
    >>> reg(model, inputs=x, outputs=model(x)).item()   # nothing consolidated yet
    0.0
    >>> sorted(reg.last_values)
    ['ewc', 'lwf']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..spec import TaskSpec
from .base import Regularizer
from .ledger import GradientLedger

__all__ = ["Compose"]


class Compose(nn.Module):
    """The sum of its members: ``forward`` adds their values, ``consolidate`` hands each the same data
    and spec, ``attach`` attaches those that can be, and ``last_values`` holds each member's last
    value (for logging), keyed by its lower-case class name (``ewc``, ``lwf``, ``ewc_1`` …).

    The members share one :class:`~clreg.GradientLedger` (the first member's, given at construction
    to every member, nested ``Compose`` included), so an SI member's path excludes exactly what the
    other members' penalties add to ``.grad``. ``compose.ledger = ...`` gives all of them another one.
    """

    def __init__(self, *regularizers: Regularizer) -> None:
        super().__init__()
        if not regularizers:
            raise ValueError("Compose needs at least one regularizer")
        for r in regularizers:
            if not isinstance(r, (Regularizer, Compose)):
                raise TypeError(f"Compose takes clreg regularizers, got {type(r).__name__}")
        self.members = nn.ModuleList(regularizers)
        self.names: list[str] = []
        for r in regularizers:
            base = type(r).__name__.lower()
            name, k = base, 1
            while name in self.names:
                name, k = f"{base}_{k}", k + 1
            self.names.append(name)
        self.ledger = regularizers[0].ledger

    @property
    def ledger(self) -> GradientLedger:
        """The ledger every member holds."""
        return self._ledger

    @ledger.setter
    def ledger(self, ledger: GradientLedger) -> None:
        if not isinstance(ledger, GradientLedger):
            raise TypeError(f"ledger must be a clreg.GradientLedger, got {type(ledger).__name__}")
        self._ledger = ledger
        for r in self.members:
            r.ledger = ledger

    def __getitem__(self, key: int | str) -> Regularizer:
        if isinstance(key, str):
            return self.members[self.names.index(key)]  # type: ignore[return-value]
        return self.members[key]  # type: ignore[return-value]

    def forward(self, model: nn.Module, inputs: Any = None, outputs: Any = None) -> Tensor:
        values = [r(model, inputs=inputs, outputs=outputs) for r in self.members]
        total = values[0]
        for v in values[1:]:
            total = total + v
        return total

    @property
    def last_value(self) -> Tensor:
        """The sum of the members' last values."""
        return sum((r.last_value for r in self.members), torch.zeros(()))

    @property
    def last_values(self) -> dict[str, float]:
        """Each member's last value, as floats."""
        return {n: float(r.last_value) for n, r in zip(self.names, self.members)}

    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        for r in self.members:
            r.consolidate(model, data, spec)

    def attach(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> Compose:
        """Attach every member with a closed-form gradient; LwF stays in the autograd mode.
        ``scaler`` goes to SI members (see :meth:`clreg.SI.attach`)."""
        from .lwf import LwF
        from .si import SI

        for r in self.members:
            if isinstance(r, (SI, Compose)):
                r.attach(optimizer, scaler=scaler)
            elif not isinstance(r, LwF):
                r.attach(optimizer)
        return self

    def detach(self) -> None:
        for r in self.members:
            r.detach()
