"""A module that keeps one buffer per parameter name, so its tensors are in ``state_dict``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ._sharding import describe, layout_of, local, local_all, shard_like


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes held by ``tensors`` on this rank (elements times element size; a sharded tensor's local
    shard)."""
    return sum(local(t).numel() * t.element_size() for t in tensors)


ROOT_KEY = "<root>"
"""The key of the model's root module, whose name is empty (a model that is one ``nn.Linear``)."""

FORMAT_VERSION = 1
"""The version of the state format that regularizers and buffers write (``format_version`` in their state)."""


def buffer_key(name: str) -> str:
    """A buffer name for a parameter's or module's name: buffer names cannot hold dots or be empty, so
    ``layer.0.weight`` is stored as ``layer/0/weight`` and the root module ``""`` as ``<root>``.

    Example:
        >>> buffer_key("layer.0.weight"), buffer_key("")
        ('layer/0/weight', '<root>')
    """
    if not isinstance(name, str):
        raise TypeError(f"a state name must be a str, got {type(name).__name__}")
    return name.replace(".", "/") if name else ROOT_KEY


class TensorStore(nn.Module):
    """An ordered set of named buffers, read as a list in the order they were given."""

    def __init__(
        self, names: Sequence[str], tensors: Sequence[Tensor], persistent: bool = True, growable: bool = False
    ) -> None:
        super().__init__()
        self.growable = growable  # the leading dimension may differ on load (one row per task, say)
        self.names = list(names)
        self._keys = [buffer_key(n) for n in self.names]
        for key, t in zip(self._keys, tensors):
            self.register_buffer(key, t, persistent=persistent)
        self._refresh()

    def _refresh(self) -> None:
        self.tensors: list[Tensor] = [self._buffers[k] for k in self._keys]  # type: ignore[misc]

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._refresh()
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        state_dict = self._laid_out(state_dict, prefix)
        self._refresh()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()

    def _laid_out(self, state_dict: Mapping[str, Tensor], prefix: str) -> Mapping[str, Tensor]:
        """``state_dict`` with each whole tensor meant for a sharded buffer cut to this rank's shard (the
        full form loads into a sharded regularizer); a ValueError where the layouts cannot meet."""
        changed = {}
        for key in self._keys:
            ours, theirs = self._buffers.get(key), state_dict.get(prefix + key)
            if ours is None or not isinstance(theirs, Tensor):
                continue
            mine, given = layout_of(ours), layout_of(theirs)
            if self.growable and mine is None and given is None and theirs.shape[1:] == ours.shape[1:]:
                self._buffers[key] = ours.new_empty(theirs.shape)  # this state's number of rows
                continue
            if mine == given:
                continue
            name = self.names[self._keys.index(key)]
            if given is not None:
                raise ValueError(
                    f"state {prefix + key!r} (parameter {name!r}) was saved {describe(given)}, but this regularizer's "
                    f"state is {describe(mine)}: save the full form (clreg.distributed.full_state_dict) to change "
                    "the sharding"
                )
            if tuple(theirs.shape) == tuple(ours.shape):
                changed[prefix + key] = shard_like(theirs.to(ours.dtype), ours)
        return {**state_dict, **changed} if changed else state_dict

    def set(self, tensors: Sequence[Tensor]) -> None:
        """Copy ``tensors`` in place (dtypes and devices kept; sharded stores copy the local shards of
        tensors sharded alike)."""
        tensors = list(tensors)
        if len(tensors) != len(self.tensors):
            raise ValueError(f"expected {len(self.tensors)} tensors, got {len(tensors)}")
        if tensors:
            with torch.no_grad():
                torch._foreach_copy_(local_all(self.tensors), local_all(tensors))

    def append(self, tensors: Sequence[Tensor]) -> None:
        """Add one row to each tensor of a growable store: ``t ← cat([t, new[None]])``."""
        if not self.growable:
            raise TypeError("append needs a growable store")
        for key, t in zip(self._keys, tensors, strict=True):
            old = self._buffers[key]
            self._buffers[key] = torch.cat([old, t.detach().to(old.dtype, copy=True)[None]])
        self._refresh()

    def __len__(self) -> int:
        return len(self.names)

    def extra_repr(self) -> str:
        return f"{len(self.names)} tensors"
