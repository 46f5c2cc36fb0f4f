"""A teacher kept as a regularizer's state: the model at the last consolidation, its parameters and
buffers saved as buffers of the regularizer and run through the user's own module (never a copy).

The helper a distillation regularizer holds (:class:`~clreg.LwF`,
:class:`~clreg.regularizers.feature_distillation.FeatureDistillation`): it knows the names of the
parameters and buffers the teacher keeps, builds the zero templates the regularizer declares with
``add_state``, copies the model into them at a consolidation and runs the model on them in eval mode
without gradients: through :func:`torch.func.functional_call`, or, for a model sharded by FSDP2,
through its own forward with the teacher's shards copied into its parameters for the call
(:func:`~clreg._sharding.swapped_into`), since FSDP's hooks put back the parameters
``functional_call`` would replace.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor, nn

from .._params import canonical_name, unwrap_model
from .._sharding import fsdp_modules, reshard_all, swapped_into
from .._store import TensorStore
from ..data import call_model, functional_call_model
from ..functional._per_sample import eval_mode

__all__ = ["TEACHER_PARAMS", "Teacher"]

TEACHER_PARAMS = ("all", "selected")
"""What a teacher copies: every parameter, or the regularizer's selected ones."""


class Teacher:
    """The names a teacher keeps on ``model`` (DDP / compiled wrappers looked through).

    Args:
        owner: the regularizer's class name, for messages.
        model: the model the regularizer is built on.
        selected: ``None``: every parameter; else the canonical names of the only parameters copied,
            the others read from the model at each call, so they must not train (a ValueError if one
            requires grad).
    """

    def __init__(self, owner: str, model: nn.Module, selected: Collection[str] | None = None) -> None:
        self.owner = owner
        inner = unwrap_model(model)
        reshard_all(inner)
        named_p = list(inner.named_parameters())
        if selected is not None:
            named_p = self._selected_only(named_p, set(selected))
        self.strict = selected is None
        self.p_names = [n for n, _ in named_p]
        self.b_names = [n for n, _ in inner.named_buffers()]

    def _selected_only(self, named: list[tuple[str, Tensor]], chosen: set[str]) -> list[tuple[str, Tensor]]:
        live = [n for n, p in named if canonical_name(n) not in chosen and p.requires_grad]
        if live:
            raise ValueError(
                f"{self.owner}(teacher_params='selected'): {len(live)} parameters outside the selection train "
                f"(e.g. {live[0]!r}), and the teacher would read them from the trained model: freeze them or select them"
            )
        return [(n, p) for n, p in named if canonical_name(n) in chosen]

    def templates(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Zeros like the kept parameters and buffers (a sharded parameter's are sharded alike), keyed by
        canonical name: the defaults of the regularizer's two states."""
        inner = unwrap_model(model)
        params, buffers = dict(inner.named_parameters()), dict(inner.named_buffers())
        return (
            {canonical_name(n): torch.zeros_like(params[n].detach()) for n in self.p_names},
            {canonical_name(n): torch.zeros_like(buffers[n]) for n in self.b_names},
        )

    def snapshot(self, model: nn.Module, params: TensorStore, buffers: TensorStore) -> None:
        """Copy ``model``'s parameters and buffers into the stores; a ValueError when the model is not
        the one the teacher was built on."""
        inner = unwrap_model(model)
        reshard_all(inner)  # FSDP2: the parameters as shards (the root keeps its own whole after a forward)
        own_p, own_b = dict(inner.named_parameters()), dict(inner.named_buffers())
        kept = set(self.p_names)
        names = list(own_p) if self.strict else [n for n in own_p if n in kept]
        if names != self.p_names or list(own_b) != self.b_names:
            raise ValueError(
                f"{self.owner}.consolidate: the model's parameters or buffers differ from the model "
                f"{self.owner} was built on"
            )
        for name, dst in zip(self.p_names, params.tensors):
            if own_p[name].shape != dst.shape:
                raise ValueError(f"{self.owner}.consolidate: parameter {name!r} changed shape")
        with torch.no_grad():
            params.set([own_p[n].detach() for n in self.p_names])
            buffers.set([own_b[n] for n in self.b_names])

    def __call__(self, model: nn.Module, params: TensorStore, buffers: TensorStore, inputs: Any) -> Any:
        """The teacher's outputs on ``inputs``: ``model`` run in eval mode without gradients on the
        stores' values (each module's mode restored after)."""
        inner = unwrap_model(model)
        p = dict(zip(self.p_names, params.tensors))
        b = dict(zip(self.b_names, buffers.tensors))
        if fsdp_modules(inner):
            with torch.no_grad(), eval_mode(inner), swapped_into(inner, p, b):
                return call_model(inner, inputs)
        with torch.no_grad(), eval_mode(inner):
            return functional_call_model(inner, {**p, **b}, inputs, strict=self.strict)
