r"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): their layout, their local
shards and the sums over ranks.

Under FSDP2 a parameter is a ``DTensor`` sharded over a device mesh: rank r holds the chunk
:math:`\theta^{(r)}` of it (``to_local()``). clreg keeps the state of a sharded parameter sharded the
same way (a ``DTensor`` with the parameter's mesh and placements), runs every element-wise pass on the
local shards, and turns a sum over a parameter's elements into a sum over ranks of the local sums,

.. math:: \sum_i f(\theta_i) = \sum_r \sum_{i \in r} f(\theta^{(r)}_i),

so each rank gets the full value. A list of tensors is either all sharded, over one 1-D mesh of every
rank with ``Shard`` placements (FSDP2's layout), or not at all: anything else is a ``ValueError``
naming the tensor (:func:`shard_mesh`).

Nothing here imports ``torch.distributed.tensor`` (a second of start-up): a tensor can only be a
``DTensor`` once that module is loaded, so its absence means nothing is sharded.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "Layout",
    "any_rank",
    "base_type",
    "fsdp_modules",
    "full",
    "in_lockstep",
    "is_sharded",
    "layout_of",
    "local",
    "local_all",
    "reduce_to_shard",
    "reshard_all",
    "shard_like",
    "shard_mesh",
    "sum_over_mesh",
    "swapped_into",
    "wrap_like",
]


def _dtensor_type() -> type | None:
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _fsdp_module_type() -> type | None:
    mod = sys.modules.get("torch.distributed.fsdp")
    return getattr(mod, "FSDPModule", None)


def is_sharded(t: Any) -> bool:
    """True for a ``DTensor`` (a parameter sharded by FSDP2, or state sharded like one)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (a view: in-place changes reach it); any other tensor itself."""
    return t.to_local() if is_sharded(t) else t


def local_all(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`local` of each tensor."""
    cls = _dtensor_type()
    if cls is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, cls) else t for t in tensors]


def full(t: Tensor) -> Tensor:
    """The whole tensor: a ``DTensor`` gathered from every rank (a collective), any other as it is."""
    return t.full_tensor() if is_sharded(t) else t


class Layout:
    """Where a sharded tensor lives: its device mesh and placements (compared by value)."""

    __slots__ = ("mesh", "placements")

    def __init__(self, mesh: Any, placements: Sequence[Any]) -> None:
        self.mesh, self.placements = mesh, tuple(placements)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.mesh == other.mesh and self.placements == other.placements

    def __hash__(self) -> int:
        return hash(self.placements)

    def __repr__(self) -> str:
        ranks = self.mesh.mesh.tolist()
        return f"sharded over the {self.mesh.device_type} mesh of ranks {ranks} as {list(self.placements)}"


def layout_of(t: Tensor) -> Layout | None:
    """The layout of a ``DTensor``; ``None`` for a plain tensor."""
    return Layout(t.device_mesh, t.placements) if is_sharded(t) else None


def describe(layout: Layout | None) -> str:
    return "not sharded" if layout is None else repr(layout)


def shard_mesh(tensors: Sequence[Tensor], names: Sequence[str] | None = None) -> Any:
    """The one mesh the tensors are sharded over, or ``None`` when none is a ``DTensor``.

    A ValueError names the first tensor that breaks FSDP2's layout: a mix of sharded and plain
    tensors, several meshes, a mesh of more than one dimension (HSDP, tensor parallelism) or not of
    every rank, or a placement other than ``Shard``.
    """
    cls = _dtensor_type()
    if cls is None or not any(isinstance(t, cls) for t in tensors):
        return None
    label = list(names) if names is not None else [f"#{i}" for i in range(len(tensors))]
    first = next(i for i, t in enumerate(tensors) if isinstance(t, cls))
    mesh = tensors[first].device_mesh
    for name, t in zip(label, tensors):
        if not isinstance(t, cls):
            raise ValueError(
                f"parameter {name!r} is not sharded but {label[first]!r} is ({describe(layout_of(tensors[first]))}): "
                "clreg takes parameters that are all sharded by fully_shard or none; apply fully_shard to the "
                "root module too (it takes the parameters no inner call took), or select one kind with params=..."
            )
        if t.device_mesh != mesh:
            raise ValueError(
                f"parameter {name!r} is {describe(layout_of(t))} and {label[first]!r} is "
                f"{describe(layout_of(tensors[first]))}: clreg takes parameters sharded over one mesh"
            )
        bad = [p for p in t.placements if not p.is_shard()]
        if bad:
            raise ValueError(
                f"parameter {name!r} is {describe(layout_of(t))}: clreg supports FSDP2's Shard placements, not {bad[0]}"
            )
    if mesh.ndim != 1:
        raise ValueError(
            f"parameters sharded over a {mesh.ndim}-D mesh (HSDP or FSDP with tensor parallelism) are not "
            "supported: clreg supports FSDP2 over a 1-D mesh"
        )
    if dist.is_initialized() and mesh.size() != dist.get_world_size():
        raise ValueError(
            f"parameters sharded over {mesh.size()} of the {dist.get_world_size()} ranks: clreg shards the data "
            "over every rank, so the mesh must hold every rank"
        )
    return mesh


# -- sums over ranks --------------------------------------------------------------------------------


def _group(mesh: Any) -> Any:
    return mesh.get_group()


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum over the mesh's ranks of each rank's partial value. Backward: the gradient as it
    is, since every rank's loss holds the whole sum and backpropagates into its own shard alone."""

    @staticmethod
    def forward(ctx, partial: Tensor, mesh: Any) -> Tensor:
        total = partial.detach().clone()
        dist.all_reduce(total, group=_group(mesh))
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output, None


def sum_over_mesh(partial: Tensor, mesh: Any) -> Tensor:
    """Σ over the ranks of ``mesh`` of ``partial`` (a new tensor; differentiable, with the gradient of
    each rank's own term); ``partial`` itself when ``mesh`` is ``None``."""
    if mesh is None:
        return partial
    return _SumOverRanks.apply(partial, mesh)


def any_over_mesh(flags: Tensor, mesh: Any) -> Tensor:
    """Element-wise logical OR of integer ``flags`` over the ranks of ``mesh`` (in place)."""
    if mesh is not None:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=_group(mesh))
    return flags


# -- moving between local shards, whole tensors and partial sums ------------------------------------


def wrap_like(local_t: Tensor, like: Tensor) -> Tensor:
    """``local_t``, this rank's shard, as a ``DTensor`` laid out as ``like`` (no communication)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local_t, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """A ``DTensor`` laid out as ``like`` whose shards are cut from ``whole``, a tensor every rank holds in
    full (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    if tuple(whole.shape) != tuple(like.shape):
        raise ValueError(f"a tensor of shape {tuple(whole.shape)} cannot be sharded as one of {tuple(like.shape)}")
    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def reduce_to_shard(partial: Tensor, like: Tensor) -> Tensor:
    """This rank's shard (laid out as ``like``) of the sum over ranks of ``partial``, a whole-shaped
    tensor each rank holds its own term of: one reduce-scatter."""
    from torch.distributed.tensor import DTensor, Partial

    mesh = like.device_mesh
    summed = DTensor.from_local(partial, mesh, [Partial()] * mesh.ndim, run_check=False)
    return summed.redistribute(mesh, like.placements).to_local()


# -- FSDP modules -----------------------------------------------------------------------------------


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` was applied to, in ``model.modules()`` order."""
    cls = _fsdp_module_type()
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


def base_type(m: nn.Module) -> type:
    """The module's own class: ``fully_shard`` swaps ``Linear`` for a subclass ``FSDPLinear``."""
    cls = _fsdp_module_type()
    if cls is None or not isinstance(m, cls):
        return type(m)
    return next(b for b in type(m).__mro__ if not issubclass(b, cls))


def reshard_all(model: nn.Module) -> None:
    """Free every unsharded parameter of ``model``'s FSDP modules: the next use all-gathers from the
    shards again. (The root module keeps its own parameters unsharded between forward and backward.)"""
    for m in fsdp_modules(model):
        m.reshard()


@contextlib.contextmanager
def swapped_into(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> Iterator[None]:
    """Run ``model`` (an FSDP2 model) on other values of its parameters and buffers, by name.

    ``functional_call`` cannot do it: FSDP's pre-forward hook puts its own all-gathered parameters back
    on the modules. So the given values are copied into the model's shards for the duration, after
    every FSDP module is resharded so that each forward gathers them, and the model's own values are
    copied back, resharded again, on exit: a backward that follows gathers the model's own parameters.
    Buffers (which FSDP leaves alone) are swapped as objects, never written, since a graph may hold
    them. Costs a copy of this rank's shards.
    """
    reshard_all(model)
    own = dict(model.named_parameters())
    targets = [local(own[n]) for n in params]
    with torch.no_grad():
        stash = [t.clone() for t in targets]
        if targets:
            torch._foreach_copy_(targets, local_all(list(params.values())))
    kept = _set_buffers(model, buffers)
    try:
        yield
    finally:
        _set_buffers(model, kept)
        reshard_all(model)
        with torch.no_grad():
            if targets:
                torch._foreach_copy_(targets, stash)


def _set_buffers(model: nn.Module, buffers: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Put ``buffers`` on the model by name; returns the ones they replaced."""
    old = {}
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        old[name] = module._buffers[attr]
        module._buffers[attr] = value
    return old


T = TypeVar("T")


def in_lockstep(items: Iterator[T], stand_in: Callable[[], T | None]) -> Iterator[tuple[T, bool]]:
    """``(item, True)`` for each of this rank's items, then ``(filler, False)`` until every rank is done.

    Under FSDP each forward and backward is a collective, so every rank must take as many steps as the
    rank with the most data; samples stay sharded without padding: a rank whose share is done repeats
    its last item (or ``stand_in()``, when it had none) and drops what that step gives. One all-reduce
    of two integers per step. A ValueError on every rank when one of them has nothing to repeat.
    """
    last: T | None = None
    while True:
        item = next(items, None)
        if item is not None:
            last = item
        filler = item if item is not None else (last if last is not None else stand_in())
        state = 2 if item is not None else (1 if filler is not None else 0)
        flags = torch.tensor([state, -state], dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        most, least = int(flags[0]), -int(flags[1])
        if most < 2:
            return
        if least == 0:
            raise ValueError(NO_SAMPLES)
        yield filler, item is not None  # type: ignore[misc]


NO_SAMPLES = (
    "a rank has no samples of its own: under FSDP every rank takes part in each forward, so each needs at least "
    "one batch; pass a Dataset (clreg shards it) or give every rank some data"
)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on some rank (one all-reduce; ``flag`` itself in a single process): every rank
    gets the same answer, so every rank can raise alike before a collective it would otherwise miss."""
    t = torch.tensor([int(flag)], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
