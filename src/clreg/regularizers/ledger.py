"""``GradientLedger``: what clreg's quadratic penalties added to ``.grad``, for SI's path integral.

SI (with ``path_gradient="task"``, the default) integrates the task loss's gradient: the gradient at
hand minus exactly what the penalties added to it. A ledger is the channel between the two sides:
SI registers with it as a *tracker* of its parameters, and each penalty that holds the same ledger
records what it adds to those parameters (and only then, so the hot path pays nothing otherwise):

* from its autograd backward, as autograd produced it, i.e. multiplied by any loss scale
  (:meth:`GradientLedger.record_scaled`);
* from its attached step pre-hook, as added to ``.grad`` after any unscaling
  (:meth:`GradientLedger.record_unscaled`).

SI then takes the records of its parameters (:meth:`GradientLedger.take`) on each optimizer step.
A tracker that follows a GradScaler sets it as the ledger's ``scaler``: scaled records made before the
scaler's last ``update()`` belong to a step it skipped (its ``.grad`` was zeroed, no hook ran) and are
dropped, not carried into the next step.
Every regularizer holds a ledger (``reg.ledger``, a fresh one by default); :class:`~clreg.Compose`
gives all its members one; regularizers built apart share one when the same ledger is set on each.
A penalty and an SI with different ledgers do not see each other: SI's path then includes that
penalty's gradient.

Example:
    >>> import torch, clreg
    >>> model = torch.nn.Linear(2, 1)
    >>> ewc, si = clreg.EWC(model, lam=1.0), clreg.SI(model)
    >>> ewc.ledger is si.ledger                 # built apart: separate ledgers
    False
    >>> ewc.ledger = si.ledger                  # now EWC records what it adds, and SI subtracts it
    >>> ewc.ledger.trackers == [si]
    True
    >>> reg = clreg.Compose(clreg.EWC(model), clreg.SI(model))
    >>> reg["ewc"].ledger is reg["si"].ledger   # a Compose shares one among its members
    True
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["GradientLedger", "RecordSwitch", "Tracker"]


class Tracker(Protocol):
    """What a ledger asks of a tracker (SI): the parameters whose path it integrates."""

    def tracked_parameters(self) -> Sequence[Tensor]: ...


_Book = dict[int, tuple["weakref.ref[Tensor]", Tensor]]


class GradientLedger:
    """Records, per parameter, the gradient clreg's penalties added since the tracker last took it.

    Records are keyed by the parameter's ``id`` inside the ledger (never stored on the parameter) and
    checked against a weak reference to it, so a freed parameter's record never reaches another one.
    Trackers are held weakly: a tracker that is garbage collected stops asking.
    """

    def __init__(self) -> None:
        self._trackers: dict[int, weakref.ref[Tracker]] = {}
        self._generation = 0
        self._scaled: _Book = {}
        self._unscaled: _Book = {}
        self.scaler: Any = None  # the GradScaler the trackers follow, if any
        self._scaled_window: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"GradientLedger({len(self._trackers)} tracker(s), {len(self._scaled) + len(self._unscaled)} record(s))"

    # -- trackers ---------------------------------------------------------------------------------
    @property
    def trackers(self) -> list[Tracker]:
        """The live trackers, in the order they registered."""
        return [t for t in (r() for r in self._trackers.values()) if t is not None]

    @property
    def generation(self) -> int:
        """A counter that changes whenever the set of trackers does (for the penalties' cached check)."""
        return self._generation

    def register(self, tracker: Tracker) -> None:
        """Ask the penalties holding this ledger to record what they add to ``tracker.tracked_parameters()``,
        for as long as ``tracker`` lives or until :meth:`unregister`."""
        key, me = id(tracker), weakref.ref(self)

        def forget(_ref: weakref.ref) -> None:
            ledger = me()
            if ledger is not None:
                ledger._forget(key)

        self._trackers[key] = weakref.ref(tracker, forget)
        self._generation += 1

    def unregister(self, tracker: Tracker) -> None:
        """Stop asking on behalf of ``tracker`` (a no-op if it never registered)."""
        self._forget(id(tracker))

    def _forget(self, key: int) -> None:
        if self._trackers.pop(key, None) is not None:
            self._generation += 1

    def wants(self, params: Sequence[Tensor]) -> bool:
        """Whether some live tracker tracks one of ``params`` (uncached; see :class:`RecordSwitch`)."""
        tracked = {id(p) for t in self.trackers for p in t.tracked_parameters()}
        return any(id(p) in tracked for p in params)

    def switch(self) -> RecordSwitch:
        """A cached :meth:`wants` for one penalty."""
        return RecordSwitch(self)

    # -- records ----------------------------------------------------------------------------------
    def record_scaled(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """From a penalty's backward: the gradient as autograd accumulates it (loss scale included).
        Records from before the scaler's last ``update()`` (a skipped step's) are dropped first."""
        window = self._window()
        if _after(window, self._scaled_window):
            self._scaled.clear()
        self._scaled_window = window
        _add(self._scaled, params, grads)

    def _window(self) -> tuple[int, int] | None:
        """Which of the scaler's steps a record belongs to: its scale tensor and that tensor's version,
        bumped in place by every ``update()`` (no device sync); ``None`` without an enabled scaler."""
        scaler = self.scaler
        scale = getattr(scaler, "_scale", None)
        if scale is None or not scaler.is_enabled():
            return None
        return id(scale), scale._version

    def record_unscaled(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """From an attached pre-hook: the gradient added to ``.grad`` (after any unscaling)."""
        _add(self._unscaled, params, grads)

    def take(self, params: Sequence[Tensor], loss_scale: float = 1.0) -> list[Tensor | None]:
        """Each parameter's recorded addition, unscaled (the scaled records divided by ``loss_scale``),
        and cleared; ``None`` where nothing was added."""
        out: list[Tensor | None] = []
        stale = _after(self._window(), self._scaled_window)
        for p in params:
            scaled, unscaled = _pop(self._scaled, p), _pop(self._unscaled, p)
            if stale:
                scaled = None
            if scaled is not None and loss_scale != 1.0:
                scaled = scaled / loss_scale
            if scaled is None:
                out.append(unscaled)
            elif unscaled is None:
                out.append(scaled)
            else:
                out.append(scaled + unscaled)
        return out

    def clear(self, params: Sequence[Tensor]) -> None:
        """Drop the records of ``params``."""
        for p in params:
            _pop(self._scaled, p)
            _pop(self._unscaled, p)


def _after(now: tuple[int, int] | None, recorded: tuple[int, int] | None) -> bool:
    """Whether records made in window ``recorded`` are from before the scaler's last update (unknown
    windows, without a scaler at either time, count as current)."""
    return now is not None and recorded is not None and now != recorded


def _add(book: _Book, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for p, g in zip(params, grads):
            prev = _get(book, p)
            if prev is None:
                book[id(p)] = (weakref.ref(p), g.detach().clone())
            else:
                prev.add_(g.to(prev.dtype))


def _get(book: _Book, p: Tensor) -> Tensor | None:
    entry = book.get(id(p))
    return entry[1] if entry is not None and entry[0]() is p else None


def _pop(book: _Book, p: Tensor) -> Tensor | None:
    entry = book.pop(id(p), None)
    return entry[1] if entry is not None and entry[0]() is p else None


class RecordSwitch:
    """Whether a penalty over ``params`` must record in ``ledger``: some live tracker shares a parameter
    with it. Cached per (tracker set, parameter list), so the hot path pays one comparison."""

    __slots__ = ("_key", "_on", "ledger")

    def __init__(self, ledger: GradientLedger) -> None:
        self.ledger = ledger
        self._key: tuple[int, int] | None = None
        self._on = False

    def __call__(self, params: Sequence[Tensor]) -> bool:
        ledger = self.ledger
        if not ledger._trackers:
            return False
        key = (ledger._generation, id(params))
        if key != self._key:
            self._on = ledger.wants(params)
            self._key = key
        return self._on
