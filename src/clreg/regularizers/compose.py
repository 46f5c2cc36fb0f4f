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

Members by name or by capability, without naming a class:
    >>> reg = clreg.Compose(clreg.EWC(model), clreg.Compose(clreg.SI(model), clreg.LwF(model)))
    >>> [type(r).__name__ for r in reg.members_that("attachable")]
    ['EWC', 'SI']
    >>> reg.members_that("tracks_path") == [reg[1]["si"]]
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..spec import TaskSpec
from .base import CAPABILITIES, Regularizer
from .ledger import GradientLedger

__all__ = ["Compose"]


class Compose(nn.Module):
    """The sum of its members: ``forward`` adds their values, ``consolidate`` hands each the same data
    and spec, ``attach`` attaches those that can be, and ``last_values`` holds each member's last
    value (for logging), keyed by its lower-case class name (``ewc``, ``lwf``, ``ewc_1`` …).

    The members share one :class:`~clreg.GradientLedger` (the first member's, given at construction
    to every member, nested ``Compose`` included), so an SI member's path excludes exactly what the
    other members' penalties add to ``.grad``. ``compose.ledger = ...`` gives all of them another one.

    A member is reached by name (``reg["si"]``; the names are in ``reg.names``) or by what it can do:
    ``reg.members_that("tracks_path")`` (the members that follow an optimizer's path, SI) or
    ``reg.members_that("attachable")`` (those with a closed-form gradient), so a caller never needs
    to import a regularizer class to find one. ``members`` holds the members as given.
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
        """A member by position or by name (``reg["si"]``, see :attr:`names`)."""
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

    def state_bytes(self) -> int:
        """The members' :meth:`~clreg.Regularizer.state_bytes`, summed."""
        return sum(r.state_bytes() for r in self.members)

    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        for r in self.members:
            r.consolidate(model, data, spec)

    def members_that(self, capability: str) -> list[Regularizer]:
        """The members (nested ``Compose`` looked through, in order) whose class has ``capability``,
        one of :data:`~clreg.regularizers.base.CAPABILITIES`: ``"attachable"`` or ``"tracks_path"``."""
        if capability not in CAPABILITIES:
            raise ValueError(f"capability must be one of {CAPABILITIES}, got {capability!r}")
        found: list[Regularizer] = []
        for r in self.members:
            if isinstance(r, Compose):
                found += r.members_that(capability)
            elif getattr(type(r), capability):
                found.append(r)
        return found

    def attach(self, optimizer: torch.optim.Optimizer, scaler: Any = None, *, hook: bool = True) -> Compose:
        """Attach every ``attachable`` member (LwF stays in the autograd mode); ``scaler`` goes to
        each (see :meth:`clreg.SI.attach`); with ``hook=False`` the caller adds the gradients with
        :meth:`pre_step`."""
        for r in self.members_that("attachable"):
            r.attach(optimizer, scaler=scaler, hook=hook)
        return self

    def pre_step(self) -> None:
        """Every attached member's :meth:`~clreg.Regularizer.pre_step`, in the members' order."""
        for r in self.members_that("attachable"):
            if r.attached:
                r.pre_step()

    def autograd_value(self, model: nn.Module, inputs: Any = None, outputs: Any = None) -> Tensor:
        """The sum of the members that are not attached (LwF …): the part of the value a loop adds to
        its loss when the others are attached."""
        values = [r.autograd_value(model, inputs, outputs) for r in self.members]  # zero for attached members
        return sum(values[1:], values[0])

    def track(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> Compose:
        """Path tracking alone (:meth:`clreg.SI.track`) for every member that ``tracks_path``; a
        ValueError when none does."""
        trackers = self.members_that("tracks_path")
        if not trackers:
            raise ValueError(f"no member of this Compose tracks an optimizer's path (members: {self.names})")
        for r in trackers:
            r.track(optimizer, scaler=scaler)
        return self

    def detach(self) -> None:
        for r in self.members:
            r.detach()
