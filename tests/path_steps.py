"""A training loop's steps for the path trackers' tests (SI, RWalk), in each of the three ways to give
them the path: ``"attach"``, ``"track"`` or ``"update"``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def follow(reg: Any, opt: torch.optim.Optimizer, mode: str, scaler: Any = None) -> None:
    """Start following ``opt``'s path: ``attach`` or ``track`` it (``"update"`` needs nothing)."""
    if mode == "attach":
        reg.attach(opt, scaler=scaler)
    elif mode == "track":
        reg.track(opt, scaler=scaler)


def path_step(
    reg: Any,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    mode: str,
    loss_fn: Callable[[Any], torch.Tensor],
    batches: Sequence[tuple[Any, float]],
    *,
    scaler: Any = None,
    also: Sequence[Any] = (),
) -> None:
    """One optimizer step on Σ w · (loss_fn(batch) + reg(model) unless attached + each of ``also``'s values),
    one backward per (batch, w) (scaled by ``scaler`` if given), then the step and, in the ``"update"``
    mode, ``reg.update`` (before ``scaler.update()``)."""
    opt.zero_grad()
    for batch, w in batches:
        loss = w * loss_fn(batch)
        if mode != "attach":
            loss = loss + w * reg(model)
        for other in also:
            loss = loss + w * other(model)
        (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.step(opt)
        if mode == "update":
            reg.update(model, scaler=scaler)
        scaler.update()
    else:
        opt.step()
        if mode == "update":
            reg.update(model)
