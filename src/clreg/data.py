"""Reading the data that ``consolidate`` and the Fisher estimators take.

Accepted:
  * a map-style ``Dataset`` whose items are ``(input, target)`` or ``input``: clreg loads it itself in
    chunks, and under torch.distributed each rank takes a strided share (no padding). Each sample is
    keyed by its index, so Monte-Carlo draws depend neither on batching nor on the number of ranks;
  * a ``DataLoader`` or any iterable of batches ``(inputs, targets)`` or ``inputs``: each rank reads
    its own iterable; samples are keyed by ``(rank, position in this rank's stream)``.

Inputs given as a :class:`KeywordInputs` (a dict) are passed to the model as keyword arguments,
``model(**inputs)``, as a Hugging Face model takes ``input_ids`` and ``attention_mask``; any other
input is passed as the one positional argument, ``model(inputs)``.

``max_samples`` is global: with a Dataset the first ``max_samples`` indices are used; with an
iterable each rank reads at most its share (``max_samples // world``, one more on the first
``max_samples % world`` ranks).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, default_collate

from .distributed import rank_and_world, shard

__all__ = [
    "Chunk",
    "KeywordInputs",
    "batch_size_of",
    "call_model",
    "functional_call_model",
    "iter_chunks",
    "stable_seed",
    "stand_in_chunk",
    "tree_index",
    "tree_leaves",
    "tree_map",
    "tree_slice",
    "tree_to",
    "tree_unsqueeze",
]


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed mixed from ints and strings, the same in every process (unlike ``hash``)."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        v = zlib.crc32(part.encode()) if isinstance(part, str) else int(part)
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class Chunk:
    """A batch of samples with their keys (int64, one per sample) for seeded draws."""

    inputs: Any
    targets: Any
    keys: Tensor


class KeywordInputs(dict):
    """A batch's inputs that the model takes as keyword arguments: ``model(**inputs)``.

    Example:
        >>> import torch
        >>> class Net(torch.nn.Module):
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return input_ids * attention_mask
        >>> x = KeywordInputs(input_ids=torch.ones(2, 3), attention_mask=torch.zeros(2, 3))
        >>> call_model(Net(), x).sum().item()
        0.0
    """


pytree.register_pytree_node(
    KeywordInputs,
    lambda d: (list(d.values()), list(d.keys())),
    lambda values, keys: KeywordInputs(zip(keys, values)),
    serialized_type_name="clreg.data.KeywordInputs",
)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for :class:`KeywordInputs`, else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, KeywordInputs) else model(inputs)


def functional_call_model(model: nn.Module, params: Any, inputs: Any, *, strict: bool = False) -> Any:
    """:func:`torch.func.functional_call` of ``model`` on ``inputs``, called as :func:`call_model` does."""
    if isinstance(inputs, KeywordInputs):
        return functional_call(model, params, (), dict(inputs), strict=strict)
    return functional_call(model, params, (inputs,), strict=strict)


def tree_map(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """``fn`` applied to every tensor in ``tree``: dicts, lists and tuples are rebuilt (a dict as a dict,
    a :class:`KeywordInputs` as one, a list or tuple as ``type(tree)(...)``), anything else is returned
    unchanged.

    Example:
        >>> import torch
        >>> tree_map(lambda t: t * 2, {"a": torch.ones(1), "b": (torch.zeros(1), "tag")})
        {'a': tensor([2.]), 'b': (tensor([0.]), 'tag')}
    """
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        mapped = {k: tree_map(fn, v) for k, v in tree.items()}
        return KeywordInputs(mapped) if isinstance(tree, KeywordInputs) else mapped
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def tree_leaves(tree: Any) -> list[Tensor]:
    """The tensors in ``tree``, in the order :func:`tree_map` visits them (other leaves are left out)."""
    leaves: list[Tensor] = []
    tree_map(leaves.append, tree)
    return leaves


def tree_to(tree: Any, device: torch.device) -> Any:
    """Every tensor moved to ``device`` (non-blocking)."""
    return tree_map(lambda t: t.to(device, non_blocking=True), tree)


def tree_unsqueeze(tree: Any) -> Any:
    """Every tensor with a new leading dimension of size 1."""
    return tree_map(lambda t: t.unsqueeze(0), tree)


def tree_index(tree: Any, i: int) -> Any:
    """Every tensor indexed by ``i`` along its first dimension."""
    return tree_map(lambda t: t[i], tree)


def tree_slice(tree: Any, sl: slice) -> Any:
    """Every tensor sliced by ``sl`` along its first dimension."""
    return tree_map(lambda t: t[sl], tree)


def batch_size_of(tree: Any) -> int:
    if isinstance(tree, Tensor):
        if tree.dim() == 0:
            raise ValueError("a batch must have a leading batch dimension; got a 0-d tensor")
        return tree.shape[0]
    if isinstance(tree, dict) and tree:
        return batch_size_of(next(iter(tree.values())))
    if isinstance(tree, (list, tuple)) and tree:
        return batch_size_of(tree[0])
    raise TypeError(f"cannot find the batch size of {type(tree).__name__}")


def split_item(item: Any) -> tuple[Any, Any]:
    """``(input, target)`` of an item or batch given as ``(x, y)``, ``(x,)`` or ``x``."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    if isinstance(item, (tuple, list)) and len(item) == 1:
        return item[0], None
    if isinstance(item, Tensor):
        return item, None
    raise TypeError(
        "expected items or batches of the form (input, target) or input (a tensor), "
        f"got {type(item).__name__}" + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
    )


def is_map_dataset(data: Any) -> bool:
    return (
        isinstance(data, Dataset)
        and not isinstance(data, DataLoader)
        and hasattr(data, "__len__")
        and hasattr(data, "__getitem__")
    )


def iter_chunks(data: Any, chunk_size: int, max_samples: int | None = None) -> Iterator[Chunk]:
    """Chunks of at most ``chunk_size`` samples of this rank's share of ``data``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    if is_map_dataset(data):
        n = len(data)
        if max_samples is not None:
            n = min(n, max_samples)
        idx = list(shard(n))
        for start in range(0, len(idx), chunk_size):
            keys = idx[start : start + chunk_size]
            items = [split_item(data[i]) for i in keys]
            inputs = default_collate([x for x, _ in items])
            targets = None if items[0][1] is None else default_collate([y for _, y in items])
            yield Chunk(inputs, targets, torch.tensor(keys, dtype=torch.int64))
        return
    if isinstance(data, (Tensor, dict)) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a map-style Dataset, a DataLoader or an iterable of batches, got {type(data).__name__}"
        )
    rank, world = rank_and_world()
    limit = None
    if max_samples is not None:
        limit = max_samples // world + (1 if rank < max_samples % world else 0)
    seen = 0
    for batch in data:
        x, y = split_item(batch)
        b = batch_size_of(x)
        for start in range(0, b, chunk_size):
            take = min(chunk_size, b - start)
            if limit is not None:
                take = min(take, limit - seen)
            if take <= 0:
                return
            sl = slice(start, start + take)
            keys = torch.arange(seen, seen + take, dtype=torch.int64) + rank * (1 << 40)
            yield Chunk(tree_slice(x, sl), None if y is None else tree_slice(y, sl), keys)
            seen += take
        if limit is not None and seen >= limit:
            return


def stand_in_chunk(data: Any) -> Chunk | None:
    """A chunk of the global first sample of a ``Dataset`` (every rank can read it), or ``None`` for an
    iterable of batches: what a rank with no samples of its own runs when every rank must take a step."""
    if not is_map_dataset(data) or len(data) == 0:
        return None
    x, y = split_item(data[0])
    return Chunk(default_collate([x]), None if y is None else default_collate([y]), torch.zeros(1, dtype=torch.int64))
