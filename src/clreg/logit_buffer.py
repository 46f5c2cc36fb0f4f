r"""``LogitBuffer``: a reservoir of samples with their labels and the model's outputs at insertion.

The memory of DER / DER++ (Buzzega et al., NeurIPS 2020), also used by ER-ACE without outputs. One
**global** capacity M (not per task), filled by **reservoir sampling** over the whole stream of samples
offered (Vitter's algorithm R, the paper's policy): the n-th sample offered (counting from 0) is stored
in slot n while n < M, and afterwards replaces slot j, with j drawn uniformly from {0, …, n}, when
j < M. After N samples every one of them is in the buffer with probability M / N.

Per sample the buffer keeps what :meth:`~LogitBuffer.observe` is given, each a pytree of tensors with
one row per sample (a tensor, or a dict / tuple / list of them):

* ``inputs`` as given, in their dtype: what the loop passes is what is replayed, so pass the
  non-augmented inputs if the replay should re-augment them (DER's ``transform``);
* ``labels`` as given (optional);
* ``outputs`` (optional), detached, in the wider of float32 and their dtype (bfloat16 logits are kept
  as float32), or in ``output_dtype`` when given (e.g. ``torch.bfloat16`` to halve the memory).

The first call fixes the structure, per-sample shapes and dtypes; a later batch with another
structure or shape is a ``ValueError`` naming the leaf (a later dtype is cast to the first). The
memory is allocated at the first call, ``capacity`` rows per leaf, on ``device`` (the CPU by
default: ``.to()`` does not move it; draws are moved to the device asked for).

:meth:`~LogitBuffer.sample` draws ``min(k, len(buffer))`` stored samples uniformly **without
replacement**, seeded by ``seed``, the rank and the number of draws so far (or a generator given).

Under ``torch.distributed`` the buffer is global, identical on every rank: ``observe`` gathers the
ranks' batch sizes, every rank takes the same reservoir decisions over the global stream (the ranks'
batches in rank order), and only the samples that enter the buffer are gathered: two object
gathers per ``observe``. It equals the buffer of one process offered the concatenated batches. A batch
refused on one rank (or first batches that differ between ranks) is a ``ValueError`` on every rank,
so none is left waiting in a collective. ``sample`` draws per rank, so ranks replay different
samples.

``state_dict()`` holds the stored rows (``inputs.0``, ``labels.0``, ``outputs.0``, … one key per
leaf) and, in its extra state, the structure, the counts and the seed: ``load_state_dict(strict=True)``
into a fresh buffer restores it exactly, and the next offers and draws continue as they would have.

Example:
    >>> import torch
    >>> from clreg.logit_buffer import LogitBuffer
    >>> buf = LogitBuffer(capacity=4, seed=0)
    >>> x, y = torch.randn(6, 3), torch.arange(6)
    >>> buf.observe(x, y, outputs={"cls": torch.randn(6, 5)})
    >>> len(buf), buf.seen
    (4, 6)
    >>> draw = buf.sample(3)
    >>> draw.inputs.shape, draw.labels.shape, draw.outputs["cls"].shape
    (torch.Size([3, 3]), torch.Size([3]), torch.Size([3, 5]))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ._store import FORMAT_VERSION
from .data import stable_seed
from .distributed import all_gather_objects, rank_and_world

__all__ = ["GROUPS", "Draw", "LogitBuffer", "cast_like", "reservoir_slots"]

GROUPS = ("inputs", "labels", "outputs")
"""What a buffer keeps per sample, in this order."""


class Draw(NamedTuple):
    """A draw from a :class:`LogitBuffer`: the stored pytrees (``None`` for a group not stored) and the
    slots drawn."""

    inputs: Any
    labels: Any
    outputs: Any
    index: Tensor


@dataclass(frozen=True)
class _Layout:
    """The structure of one group: its pytree spec, and each leaf's per-sample shape and dtype."""

    tree: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    def to_config(self) -> dict[str, Any]:
        return {"tree": self.tree, "shapes": [list(s) for s in self.shapes], "dtypes": [str(d) for d in self.dtypes]}

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> _Layout:
        dtypes = tuple(getattr(torch, d.removeprefix("torch.")) for d in c["dtypes"])
        return cls(c["tree"], tuple(tuple(s) for s in c["shapes"]), dtypes)


def reservoir_slots(seen: int, n: int, capacity: int, generator: torch.Generator) -> dict[int, int]:
    """Algorithm R over the stream positions ``seen … seen + n - 1``: ``{slot: position}`` of the
    positions that end in the buffer (a later position overwrites an earlier one in the same slot).
    Position p < capacity takes slot p; a later one slot ⌊u (p + 1)⌋ with u uniform in [0, 1) (float64,
    so uniform to within p · 2⁻⁵³), kept when it is < capacity. Draws n numbers whatever happens."""
    u = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
    final: dict[int, int] = {}
    for i, ui in enumerate(u):
        p = seen + i
        slot = p if p < capacity else int(ui * (p + 1))
        if slot < capacity:
            final[slot] = p
    return final


class _Group(NamedTuple):
    """One group of a batch, flattened: its leaves, its pytree spec and each leaf's path."""

    leaves: list[Tensor]
    spec: Any
    paths: list[str]


def _flatten(tree: Any, group: str, n: int | None) -> _Group:
    """``tree`` flattened; a ValueError unless every leaf is a tensor with ``n`` rows (``n=None``: the
    first leaf's) and there is one at least."""
    leaves, spec = pytree.tree_flatten(tree)
    paths = _paths(tree, group, len(leaves))
    if not leaves:
        raise ValueError(f"observe(): {group} holds no tensor")
    for path, v in zip(paths, leaves):
        if not isinstance(v, Tensor) or v.dim() == 0:
            got = "a 0-d tensor" if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(
                f"observe(): every leaf of {group} must be a tensor with one row per sample; {path} is {got}"
            )
        n = v.shape[0] if n is None else n
        if v.shape[0] != n:
            raise ValueError(
                f"observe(): {n} samples in the batch, but {path} has {v.shape[0]} rows (shape {tuple(v.shape)})"
            )
    return _Group(leaves, spec, paths)


def cast_like(tree: Any, like: Any) -> Any:
    """``tree`` with each floating leaf cast to the dtype of the floating leaf of ``like`` at the same
    place (the current batch's inputs): a replayed batch is fed as the current one is. Unchanged when
    ``like`` is ``None`` or has another structure."""
    if like is None:
        return tree
    leaves, spec = pytree.tree_flatten(tree)
    ref, ref_spec = pytree.tree_flatten(like)
    if ref_spec != spec:
        return tree
    cast = [
        t.to(r.dtype)
        if isinstance(t, Tensor) and isinstance(r, Tensor) and t.is_floating_point() and r.is_floating_point()
        else t
        for t, r in zip(leaves, ref)
    ]
    return pytree.tree_unflatten(cast, spec)


def _paths(tree: Any, group: str, n: int) -> list[str]:
    """Each leaf's path for messages (``outputs['cls']``); ``group leaf i`` for a node type that pytree
    cannot name."""
    try:
        return [f"{group}{pytree.keystr(p)}" for p, _ in pytree.tree_flatten_with_path(tree)[0]]
    except ValueError:
        return [f"{group} leaf {i}" for i in range(n)]


def _stored_dtype(group: str, t: Tensor, output_dtype: torch.dtype | None) -> torch.dtype:
    if group != "outputs" or not t.is_floating_point():
        return t.dtype
    return output_dtype if output_dtype is not None else torch.promote_types(t.dtype, torch.float32)


def _raise_for_other_ranks(gathered: list[tuple[int, str | None, Any]]) -> None:
    """A ValueError when another rank's batch was refused, or when the ranks' first batches differ in
    structure, per-sample shapes or dtypes (every rank raises alike)."""
    for rank, (_, message, _) in enumerate(gathered):
        if message is not None:
            raise ValueError(f"observe(): rank {rank} refused its batch: {message}")
    layouts = [lay for _, _, lay in gathered]
    for rank, lay in enumerate(layouts[1:], start=1):
        if lay != layouts[0]:
            raise ValueError(
                f"observe(): the first batch differs between ranks: rank 0 offers {layouts[0]}, rank {rank} {lay}"
            )


class LogitBuffer(nn.Module):
    """At most ``capacity`` samples, each with its input, label and outputs at insertion (see the module).

    Args:
        capacity: M ≥ 1, the global bound (not per task).
        seed: seeds the reservoir and the draws.
        device: where the samples are kept (default the CPU).
        output_dtype: the dtype of stored floating outputs; default the wider of float32 and theirs.
    """

    format_version = FORMAT_VERSION

    def __init__(
        self,
        capacity: int,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        output_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if output_dtype is not None and not (isinstance(output_dtype, torch.dtype) and output_dtype.is_floating_point):
            raise TypeError(f"output_dtype must be a floating torch.dtype or None, got {output_dtype!r}")
        self.capacity, self.seed = capacity, int(seed)
        self.storage_device = torch.device(device)
        self.output_dtype = output_dtype
        self._seen = self._draws = 0
        self._layouts: dict[str, _Layout | None] = {}
        self._data: dict[str, list[Tensor]] = {}

    # -- reading --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return min(self._seen, self.capacity)

    @property
    def seen(self) -> int:
        """How many samples were offered in all (over every rank)."""
        return self._seen

    def stores(self, group: str) -> bool:
        """Whether the samples carry ``group`` (``"inputs"``, ``"labels"`` or ``"outputs"``)."""
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
        return self._layouts.get(group) is not None

    def stored(self, group: str) -> Any:
        """Every stored sample's ``group`` (a pytree of tensors, rows in slot order), or ``None``."""
        if not self.stores(group):
            return None
        return self._unflatten(group, [t[: len(self)] for t in self._data[group]])

    # -- offering -------------------------------------------------------------------------------------
    def observe(
        self, inputs: Any, labels: Any = None, outputs: Any = None, *, check: Callable[[], None] | None = None
    ) -> None:
        """Offer a batch: each sample enters the reservoir (see the module) with its labels and
        outputs (detached), all with one row per sample. ``check``, where given, is called first and
        may raise a ``ValueError`` (the caller's own check of the batch). Under torch.distributed a
        bad batch on any rank (or a first batch whose structure differs between ranks) is a
        ``ValueError`` on every rank, so no rank is left waiting in a collective."""
        batch, layouts, error = self._validated(inputs, labels, outputs, check)
        n = 0 if batch is None else batch["inputs"].leaves[0].shape[0]  # type: ignore[union-attr]
        first = None if layouts is None else {g: None if v is None else v.to_config() for g, v in layouts.items()}
        gathered = all_gather_objects((n, None if error is None else str(error), first))
        if error is not None:
            raise error
        _raise_for_other_ranks(gathered)
        if layouts is not None:
            self._layouts = layouts
            self._make_storage()
        sizes = [int(s) for s, _, _ in gathered]
        rank, _ = rank_and_world()
        offset, total = sum(sizes[:rank]), sum(sizes)
        g = torch.Generator().manual_seed(stable_seed(self.seed, "reservoir", self._seen))
        final = reservoir_slots(self._seen, total, self.capacity, g)
        mine = [(slot, p - self._seen - offset) for slot, p in final.items() if 0 <= p - self._seen - offset < n]
        for slots, rows in all_gather_objects(self._rows(batch, mine)):  # type: ignore[arg-type]
            self._write(slots, rows)
        self._seen += total

    def _validated(
        self, inputs: Any, labels: Any, outputs: Any, check: Callable[[], None] | None
    ) -> tuple[dict[str, _Group | None] | None, dict[str, _Layout | None] | None, ValueError | None]:
        """The flattened batch, the layouts it sets (first offer only, else ``None``) and the error, if
        any, instead of raising it (the ranks share it first)."""
        try:
            if check is not None:
                check()
            batch = self._flatten_batch(inputs, labels, outputs)
            if self._layouts:
                self._check_layout(batch)
                return batch, None, None
            return batch, self._layouts_of(batch), None
        except ValueError as err:
            return None, None, err

    def _flatten_batch(self, inputs: Any, labels: Any, outputs: Any) -> dict[str, _Group | None]:
        if inputs is None:
            raise ValueError("observe(): the batch's inputs are needed")
        first = _flatten(inputs, "inputs", None)
        n = first.leaves[0].shape[0]
        batch: dict[str, _Group | None] = {"inputs": first}
        for group, tree in (("labels", labels), ("outputs", outputs)):
            batch[group] = None if tree is None else _flatten(tree, group, n)
        return batch

    def _layouts_of(self, batch: dict[str, _Group | None]) -> dict[str, _Layout | None]:
        layouts: dict[str, _Layout | None] = {}
        for group, b in batch.items():
            layouts[group] = None
            if b is not None:
                shapes = tuple(tuple(t.shape[1:]) for t in b.leaves)
                dtypes = tuple(_stored_dtype(group, t, self.output_dtype) for t in b.leaves)
                layouts[group] = _Layout(pytree.treespec_dumps(b.spec), shapes, dtypes)
        return layouts

    def _make_storage(self) -> None:
        self._data = {
            g: [
                torch.zeros((self.capacity, *s), dtype=d, device=self.storage_device)
                for s, d in zip(lay.shapes, lay.dtypes)
            ]
            for g, lay in self._layouts.items()
            if lay is not None
        }

    def _check_layout(self, batch: dict[str, _Group | None]) -> None:
        for group, b in batch.items():
            layout = self._layouts[group]
            if (layout is None) != (b is None):
                stored = "without" if layout is None else "with"
                given = "has no" if b is None else "has"
                raise ValueError(
                    f"observe(): the buffer's samples were stored {stored} {group}, and this batch {given} "
                    f"{group}: offer every batch alike"
                )
            if b is None or layout is None:
                continue
            if pytree.treespec_dumps(b.spec) != layout.tree:
                raise ValueError(
                    f"observe(): {group} has another structure than the stored samples' "
                    f"({b.spec} vs {self._tree(group)})"
                )
            for path, t, shape in zip(b.paths, b.leaves, layout.shapes):
                if tuple(t.shape[1:]) != shape:
                    raise ValueError(
                        f"observe(): {path} has per-sample shape {tuple(t.shape[1:])}, the stored samples {shape}"
                    )

    def _rows(self, batch: dict[str, _Group | None], mine: list[tuple[int, int]]) -> tuple[Tensor, dict]:
        """The slots this rank fills and its rows for them, on the storage device (detached)."""
        slots = torch.tensor([s for s, _ in mine], dtype=torch.int64)
        local = [i for _, i in mine]
        rows: dict[str, list[Tensor]] = {}
        for group, b in batch.items():
            if b is None:
                continue
            dtypes = self._layouts[group].dtypes  # type: ignore[union-attr]
            idx = torch.tensor(local, dtype=torch.int64, device=b.leaves[0].device)
            rows[group] = [t.detach().index_select(0, idx).to(self.storage_device, d) for t, d in zip(b.leaves, dtypes)]
        return slots, rows

    def _write(self, slots: Tensor, rows: dict[str, list[Tensor]]) -> None:
        if slots.numel() == 0:
            return
        at = slots.to(self.storage_device)
        for group, leaves in rows.items():
            for dst, src in zip(self._data[group], leaves):
                dst.index_copy_(0, at, src.to(self.storage_device, dst.dtype))

    # -- drawing --------------------------------------------------------------------------------------
    def sample(self, k: int, generator: torch.Generator | None = None, device: Any = None) -> Draw:
        """``min(k, len(self))`` stored samples, uniformly without replacement, moved to ``device``
        (default: the storage device). A ValueError when nothing is stored."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if len(self) == 0:
            raise ValueError("the buffer is empty: observe() a batch before sampling")
        if generator is None:
            rank, _ = rank_and_world()
            generator = torch.Generator().manual_seed(stable_seed(self.seed, "draw", rank, self._draws))
            self._draws += 1
        index = torch.randperm(len(self), generator=generator)[:k]
        at = index.to(self.storage_device)
        out = {}
        for group in GROUPS:
            if not self.stores(group):
                out[group] = None
                continue
            leaves = [t.index_select(0, at) for t in self._data[group]]
            if device is not None:
                leaves = [t.to(device, non_blocking=True) for t in leaves]
            out[group] = self._unflatten(group, leaves)
        return Draw(out["inputs"], out["labels"], out["outputs"], index)

    def _tree(self, group: str) -> Any:
        return pytree.treespec_loads(self._layouts[group].tree)  # type: ignore[union-attr]

    def _unflatten(self, group: str, leaves: list[Tensor]) -> Any:
        return pytree.tree_unflatten(leaves, self._tree(group))

    # -- state ----------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "type": type(self).__name__,
            "capacity": self.capacity,
            "seed": self.seed,
            "seen": self._seen,
            "draws": self._draws,
            "layouts": {g: None if lay is None else lay.to_config() for g, lay in self._layouts.items()},
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("type") != type(self).__name__:
            raise ValueError(f"not a {type(self).__name__} state")
        if state.get("format_version") != self.format_version:
            raise ValueError(
                f"{type(self).__name__} state has format version {state.get('format_version')}, "
                f"this clreg reads {self.format_version}"
            )
        self.capacity, self.seed = int(state["capacity"]), int(state["seed"])
        self._seen, self._draws = int(state["seen"]), int(state["draws"])
        layouts = state["layouts"]
        self._layouts = {g: None if layouts[g] is None else _Layout.from_config(layouts[g]) for g in layouts}
        self._make_storage()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        n = len(self)
        for group, leaves in self._data.items():
            for i, t in enumerate(leaves):
                destination[f"{prefix}{group}.{i}"] = t if n == self.capacity else t[:n].clone()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        ours = {k for k in state_dict if k.startswith(prefix) and k[len(prefix) :].split(".")[0] in GROUPS}
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        expected = set()
        for group, leaves in self._data.items():
            for i, dst in enumerate(leaves):
                key = f"{prefix}{group}.{i}"
                expected.add(key)
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                self._load_leaf(key, state_dict[key], dst, error_msgs)
        unexpected_keys.extend(sorted(ours - expected))

    def _load_leaf(self, key: str, src: Any, dst: Tensor, error_msgs: list[str]) -> None:
        n = len(self)
        if not isinstance(src, Tensor) or tuple(src.shape) != (n, *dst.shape[1:]):
            got = tuple(src.shape) if isinstance(src, Tensor) else type(src).__name__
            error_msgs.append(f"size mismatch for {key}: {got} in the state, {(n, *dst.shape[1:])} expected")
            return
        with torch.no_grad():
            dst[:n].copy_(src)

    def state_bytes(self) -> int:
        """Bytes held by the memory (``capacity`` rows per leaf, allocated at the first offer)."""
        return sum(t.numel() * t.element_size() for leaves in self._data.values() for t in leaves)

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, stored={len(self)}, seen={self._seen}, device={self.storage_device}"
