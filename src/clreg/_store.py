"""A module that keeps one buffer per parameter name, so its tensors are in ``state_dict``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ._sharding import local, local_all


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes held by ``tensors`` on this rank (elements times element size; a sharded tensor's local
    shard)."""
    return sum(local(t).numel() * t.element_size() for t in tensors)


def buffer_key(name: str) -> str:
    """Buffer names cannot hold dots: ``layer.0.weight`` is stored as ``layer/0/weight``."""
    return name.replace(".", "/")


class TensorStore(nn.Module):
    """An ordered set of named buffers, read as a list in the order they were given."""

    def __init__(self, names: Sequence[str], tensors: Sequence[Tensor], persistent: bool = True) -> None:
        super().__init__()
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

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    def set(self, tensors: Sequence[Tensor]) -> None:
        """Copy ``tensors`` in place (dtypes and devices kept; sharded stores copy the local shards of
        tensors sharded alike)."""
        tensors = list(tensors)
        if len(tensors) != len(self.tensors):
            raise ValueError(f"expected {len(self.tensors)} tensors, got {len(tensors)}")
        if tensors:
            with torch.no_grad():
                torch._foreach_copy_(local_all(self.tensors), local_all(tensors))

    def __len__(self) -> int:
        return len(self.names)

    def extra_repr(self) -> str:
        return f"{len(self.names)} tensors"
