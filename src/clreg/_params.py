"""Choosing a model's parameters by name or predicate, and checking a model against the choice."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._sharding import describe, layout_of, reshard_all, shard_mesh

ParamSelector = Sequence[str] | Callable[[str, nn.Parameter], bool] | None

_WRAPPER_SEGMENTS = ("module", "_orig_mod")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return model


def canonical_name(name: str) -> str:
    """A parameter name without the ``module.`` and ``_orig_mod.`` segments wrappers add."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_SEGMENTS)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The wider of float32 and ``dtype``: the dtype state is kept in."""
    if dtype in (torch.float64,):
        return torch.float64
    return torch.float32


def reject_partitioned(named: Sequence[tuple[str, nn.Parameter]]) -> None:
    """A ValueError for parameters partitioned by DeepSpeed ZeRO-3 (each rank holds a slice, the
    parameter itself is empty outside a gather): a regularizer needs whole parameters or DTensor
    shards."""
    partitioned = [n for n, p in named if hasattr(p, "ds_status")]
    if partitioned:
        raise ValueError(
            f"parameter {partitioned[0]!r} is partitioned by DeepSpeed ZeRO-3 (each rank holds a slice): clreg's "
            "regularizers need whole parameters on every rank (ZeRO stage 1 or 2) or FSDP2's DTensor shards "
            "(torch.distributed.fsdp.fully_shard)"
        )


class ParamSet:
    """The parameters a regularizer acts on: canonical names, shapes, state dtypes and layouts.

    The resolved parameter list is cached per model (weakly) and per the model's class (``fully_shard``
    swaps it), so the hot path does not walk the model. Parameters sharded by FSDP2 (DTensors) must all
    be sharded over one mesh (``mesh``), or none (see :func:`clreg._sharding.shard_mesh`); a model
    resolved later must lay them out alike.
    """

    def __init__(self, model: nn.Module, select: ParamSelector = None) -> None:
        reshard_all(model)  # FSDP2's root keeps its own parameters unsharded after a forward
        named = [(canonical_name(n), p) for n, p in model.named_parameters()]
        if select is None:
            chosen = [(n, p) for n, p in named if p.requires_grad]
        elif callable(select):
            chosen = [(n, p) for n, p in named if p.requires_grad and select(n, p)]
        elif isinstance(select, (str, bytes)):
            raise TypeError("params must be a sequence of names or a predicate, not a single string")
        else:
            by_name = dict(named)
            wanted = [canonical_name(s) for s in select]
            unknown = [n for n in wanted if n not in by_name]
            if unknown:
                raise ValueError(f"unknown parameter name(s) {unknown}; the model has e.g. {list(by_name)[:8]}")
            chosen = [(n, by_name[n]) for n in wanted if by_name[n].requires_grad]
        if not chosen:
            raise ValueError("no trainable parameter was selected (all frozen, or the selection is empty)")
        reject_partitioned(chosen)
        self.names: list[str] = [n for n, _ in chosen]
        self.shapes: list[torch.Size] = [p.shape for _, p in chosen]
        self.dtypes: list[torch.dtype] = [p.dtype for _, p in chosen]
        self.mesh = shard_mesh([p for _, p in chosen], self.names)
        self.layouts = [layout_of(p) for _, p in chosen] if self.mesh is not None else [None] * len(chosen)
        self._cache: tuple[weakref.ref, type, list[nn.Parameter]] | None = None
        self._remember(model, [p for _, p in chosen])

    def __len__(self) -> int:
        return len(self.names)

    @property
    def sharded(self) -> bool:
        """True when the parameters are sharded by FSDP2 (DTensors)."""
        return self.mesh is not None

    def _remember(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        self._cache = (weakref.ref(model), type(model), params)

    def last(self) -> list[nn.Parameter]:
        """The parameters of the model last resolved (for optimizer hooks)."""
        if self._cache is None:
            raise ValueError("no model has been resolved yet")
        return self._cache[2]

    def resolve(self, model: nn.Module) -> list[nn.Parameter]:
        """This selection's parameters in ``model``, in order, with names, shapes and layouts checked."""
        if self._cache is not None and self._cache[0]() is model and self._cache[1] is type(model):
            return self._cache[2]
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected the model (an nn.Module), got {type(model).__name__}")
        reshard_all(model)
        by_name = {canonical_name(n): p for n, p in model.named_parameters()}
        params = []
        for name, shape in zip(self.names, self.shapes):
            p = by_name.get(name)
            if p is None:
                raise ValueError(
                    f"parameter {name!r} is missing from this model: it is not the model this regularizer was built on"
                )
            reject_partitioned([(name, p)])
            if p.shape != shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(p.shape)}, expected {tuple(shape)} "
                    "(the model changed since this regularizer was built)"
                )
            params.append(p)
        self._check_layouts(params)
        self._remember(model, params)
        return params

    def _check_layouts(self, params: list[nn.Parameter]) -> None:
        for name, p, want in zip(self.names, params, self.layouts):
            got = layout_of(p)
            if got != want:
                hint = (
                    "build the regularizer on the model as it is trained (after fully_shard), or load the full "
                    "state (clreg.distributed.full_state_dict) into one built on this model"
                )
                raise ValueError(f"parameter {name!r} is {describe(got)}, but this state is {describe(want)}: {hint}")

    def zeros(self, device: torch.device | str | None = None) -> list[Tensor]:
        """Zeros in the state dtype, one per parameter: sharded like the parameter where it is."""
        if self.mesh is not None:
            return [torch.zeros_like(p.detach(), dtype=state_dtype(p.dtype)) for p in self.last()]
        return [torch.zeros(s, dtype=state_dtype(d), device=device) for s, d in zip(self.shapes, self.dtypes)]


def check_covered(owner: str, names: Sequence[str], computed: Mapping[str, Any]) -> None:
    """A ValueError when an importance left out some of ``names``: parameters frozen after ``owner`` was
    built (the estimators take trainable parameters only)."""
    missing = [n for n in names if n not in computed]
    if missing:
        raise ValueError(
            f"{owner}.consolidate: {len(missing)} of its parameters no longer require grad (e.g. {missing[0]!r}), "
            "frozen after it was built: unfreeze them for consolidate, or build it over the trainable ones"
        )
