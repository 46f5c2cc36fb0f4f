"""What clreg's penalties added to ``.grad`` since the last optimizer step, for SI's path integral.

SI's path uses the task loss's gradient: the gradient at hand minus what the penalties added. Each
penalty records its contribution here while some SI tracker asks for it (and only then, so the hot
path pays nothing otherwise). Contributions from autograd (``backward``) are recorded as autograd
produced them, i.e. multiplied by any loss scale; those from an attached pre-hook are unscaled.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

_wanting: weakref.WeakSet = weakref.WeakSet()
_SCALED = "_clreg_added_scaled"
_UNSCALED = "_clreg_added"


_generation = [0]


def want(owner: object, on: bool = True) -> None:
    """Ask (or stop asking) penalties to record the gradients they add to ``owner.tracked_parameters()``,
    for as long as ``owner`` lives."""
    if on:
        _wanting.add(owner)
    else:
        _wanting.discard(owner)
    _generation[0] += 1


class Switch:
    """Whether a penalty over ``params`` must record: some live tracker shares a parameter with it.

    Cached per (parameter list, tracker set), so the hot path pays one comparison.
    """

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._on = False

    def __call__(self, params: Sequence[Tensor]) -> bool:
        if not _wanting:
            return False
        key = (_generation[0], id(params))
        if key != self._key:
            tracked = {id(p) for owner in list(_wanting) for p in owner.tracked_parameters()}
            self._on = any(id(p) in tracked for p in params)
            self._key = key
        return self._on


def _add(params: Sequence[Tensor], grads: Sequence[Tensor], attr: str) -> None:
    with torch.no_grad():
        for p, g in zip(params, grads):
            prev = getattr(p, attr, None)
            if prev is None:
                setattr(p, attr, g.detach().clone())
            else:
                prev.add_(g.to(prev.dtype))


def record_scaled(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """From a penalty's backward: the gradient as autograd accumulates it (loss scale included)."""
    _add(params, grads, _SCALED)


def record_unscaled(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """From an attached pre-hook: the gradient added to ``.grad`` (after any unscaling)."""
    _add(params, grads, _UNSCALED)


def take(params: Sequence[Tensor], loss_scale: float = 1.0) -> list[Tensor | None]:
    """Each parameter's recorded addition (unscaled), cleared; ``None`` where nothing was added."""
    out: list[Tensor | None] = []
    for p in params:
        scaled = p.__dict__.pop(_SCALED, None)
        unscaled = p.__dict__.pop(_UNSCALED, None)
        if scaled is not None and loss_scale != 1.0:
            scaled = scaled / loss_scale
        if scaled is None:
            out.append(unscaled)
        elif unscaled is None:
            out.append(scaled)
        else:
            out.append(scaled + unscaled)
    return out


def clear(params: Sequence[Tensor]) -> None:
    for p in params:
        p.__dict__.pop(_SCALED, None)
        p.__dict__.pop(_UNSCALED, None)
