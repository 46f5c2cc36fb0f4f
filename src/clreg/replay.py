"""``ReplayBuffer``: a bounded memory of raw samples per task, checkpointable, global across ranks.

A replay buffer is data, not a penalty. ``add(task, samples)`` stores samples of a task (at the end
of the task, or reservoir-style during it); ``sample(k)`` draws k samples in all, split evenly over the
stored tasks (the first ``k % n_tasks`` tasks in insertion order get one more), and returns
``{task: (inputs, targets)}`` so the loop applies each task's own loss; ``sample_batch(k)`` returns the
same draw as one mixed batch ``(inputs, targets, tasks)``. Samples are kept as the data set gives
them; targets may be any pytree of tensors, including variable-length ones (boxes): those are returned
as lists when their shapes differ.

Under torch.distributed, ``add`` gathers every rank's samples (in rank order) before selecting, so the
buffer is identical on every rank; ``sample`` draws per rank (seeded by ``seed``, the rank and the
number of draws so far), so ranks replay different samples.

Example:
    >>> import torch, clreg
    >>> buf = clreg.ReplayBuffer(capacity_per_task=2, seed=0)
    >>> buf.add("seg", [(torch.zeros(3), torch.tensor(1)), (torch.ones(3), torch.tensor(2))])
    >>> x, y = buf.sample(2)["seg"]
    >>> x.shape, y.shape
    (torch.Size([2, 3]), torch.Size([2]))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._store import FORMAT_VERSION, tensor_bytes
from .data import batch_size_of, is_map_dataset, stable_seed, tree_index, tree_leaves, tree_map
from .distributed import all_gather_objects, rank_and_world

__all__ = ["ReplayBuffer"]

_POLICIES = ("reservoir", "first")


def _to_cpu(tree: Any) -> Any:
    return tree_map(lambda t: t.detach().cpu().clone(), tree)


def _collate(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, Tensor):
        if all(isinstance(t, Tensor) and t.shape == first.shape for t in items):
            return torch.stack(items)
        return list(items)
    if isinstance(first, dict):
        return {k: _collate([it[k] for it in items]) for k in first}
    if isinstance(first, tuple):
        return tuple(_collate([it[i] for it in items]) for i in range(len(first)))
    if isinstance(first, (int, float, bool)):
        return torch.tensor(items)
    return list(items)


def _paths_and_leaves(tree: Any, path: str = "") -> list[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf of ``tree``, in :func:`tree_map`'s order; a path reads ``['boxes'][0]``."""
    if isinstance(tree, dict):
        return [pl for k, v in tree.items() for pl in _paths_and_leaves(v, f"{path}[{k!r}]")]
    if isinstance(tree, (list, tuple)):
        return [pl for i, v in enumerate(tree) for pl in _paths_and_leaves(v, f"{path}[{i}]")]
    return [(path, tree)]


def _check_rows(n: int, targets: Any) -> None:
    """A ValueError unless every tensor of ``targets`` has ``n`` rows, one per input of a batch."""
    for path, leaf in _paths_and_leaves(targets):
        if not isinstance(leaf, Tensor) or (leaf.dim() > 0 and leaf.shape[0] == n):
            continue
        where = f"target{path}" if path else "the target tensor"
        got = f"{leaf.shape[0]} targets ({where} has {leaf.shape[0]} rows)" if leaf.dim() else f"{where} is 0-d"
        raise ValueError(
            f"add(): {n} inputs but {got}; a batch (inputs, targets) needs one row per input in every "
            "tensor of the target"
        )


def _pair(i: int, it: Any) -> tuple[Any, Any]:
    """Sample ``i`` as ``(input, target)``: a pair as it is, an input tensor with target None."""
    if isinstance(it, (tuple, list)) and len(it) == 2:
        return it[0], it[1]
    if isinstance(it, Tensor):
        return it, None
    what = f"a {type(it).__name__}"
    if isinstance(it, (tuple, list)):
        what += f" of {len(it)} item" + ("" if len(it) == 1 else "s")
    raise TypeError(f"add(): each sample must be a pair (input, target) or an input tensor; sample {i} is {what}")


def _leaf_kinds(tree: Any, shapes: bool) -> tuple[tuple[str, Any], ...]:
    """Each leaf's path with its shape (``shapes``) or kind: the structure of one sample."""
    return tuple(
        (path, (tuple(v.shape) if shapes else "tensor") if isinstance(v, Tensor) else type(v).__name__)
        for path, v in _paths_and_leaves(tree)
    )


def _show(kinds: tuple[tuple[str, Any], ...]) -> str:
    return ", ".join(f"{path}{' ' if path else ''}{kind}" for path, kind in kinds)


def _mixed_inputs(drawn: list[tuple[Any, list[tuple[Any, Any]]]]) -> Any:
    """The drawn inputs of every task collated as one batch; a ValueError where their shapes differ by task."""
    shapes = {t: {_leaf_kinds(x, True) for x, _ in samples} for t, samples in drawn}
    structures = {_leaf_kinds(x, False) for _, samples in drawn for x, _ in samples}
    fixed = {next(iter(s)) for s in shapes.values() if len(s) == 1}
    if len(fixed) > 1 or len(structures) > 1:
        shown = "; ".join(f"task {t!r} " + " | ".join(sorted(map(_show, s))[:3]) for t, s in shapes.items())
        raise ValueError(
            "sample_batch(): the tasks' inputs differ in shape or structure, so they cannot form one batch "
            f"(per-sample shapes: {shown}); draw one batch per task with sample(k)"
        )
    return _collate([x for _, samples in drawn for x, _ in samples])


def _mixed_targets(targets: list[Any]) -> Any:
    """The targets collated as one batch; a list of them where their structure differs (None: no targets)."""
    if all(y is None for y in targets):
        return None
    if len({_leaf_kinds(y, False) for y in targets}) > 1:
        return list(targets)
    return _collate(targets)


def _samples_of(samples: Any) -> list[tuple[Any, Any]]:
    """A list of (input, target) from a Dataset, an iterable of samples, or one batch ``(x, y)``."""
    if is_map_dataset(samples):
        items = [samples[i] for i in range(len(samples))]
    elif isinstance(samples, tuple) and len(samples) == 2 and isinstance(samples[0], Tensor):
        x, y = samples
        n = batch_size_of(x)
        _check_rows(n, y)
        items = [(x[i], tree_index(y, i)) for i in range(n)]
    elif isinstance(samples, Iterable) and not isinstance(samples, (Tensor, dict, str)):
        items = list(samples)
    else:
        raise TypeError(
            "add() takes a Dataset, an iterable of (input, target) samples or one batch (inputs, targets); "
            f"got {type(samples).__name__}"
        )
    return [_pair(i, it) for i, it in enumerate(items)]


class ReplayBuffer(nn.Module):
    """At most ``capacity_per_task`` samples per task.

    Args:
        capacity_per_task: the bound per task (e.g. 10 images per past task).
        policy: ``"reservoir"`` (a uniform sample of everything offered, across calls) or ``"first"``
            (the first samples offered).
        seed: seeds the reservoir and the draws.
    """

    format_version = FORMAT_VERSION

    def __init__(self, capacity_per_task: int, policy: str = "reservoir", seed: int = 0) -> None:
        super().__init__()
        if not isinstance(capacity_per_task, int) or capacity_per_task < 1:
            raise ValueError(f"capacity_per_task must be an int >= 1, got {capacity_per_task!r}")
        if policy not in _POLICIES:
            raise ValueError(f"policy must be one of {_POLICIES}, got {policy!r}")
        self.capacity_per_task = capacity_per_task
        self.policy = policy
        self.seed = int(seed)
        self._memory: dict[Any, list[tuple[Any, Any]]] = {}
        self._seen: dict[Any, int] = {}
        self._draws = 0

    @property
    def tasks(self) -> list[Any]:
        return list(self._memory)

    def __len__(self) -> int:
        return sum(len(v) for v in self._memory.values())

    def samples(self, task: Any) -> list[tuple[Any, Any]]:
        """The stored samples of ``task`` (a copy of the list)."""
        if task not in self._memory:
            raise KeyError(f"no samples stored for task {task!r}; stored: {self.tasks}")
        return list(self._memory[task])

    def add(self, task: Any, samples: Any) -> None:
        """Offer ``samples`` of ``task``; the buffer keeps what its policy selects.

        ``samples``: a Dataset or an iterable of ``(input, target)`` pairs or input tensors, or one batch
        ``(inputs, targets)`` whose target tensors (any pytree) have one row per input.
        """
        if not isinstance(task, (str, int)):
            raise TypeError(f"task must be a str or an int, got {type(task).__name__}")
        local = [(_to_cpu(x), _to_cpu(y)) for x, y in _samples_of(samples)]
        offered = [s for part in all_gather_objects(local) for s in part]
        mem = self._memory.setdefault(task, [])
        seen = self._seen.get(task, 0)
        g = torch.Generator().manual_seed(stable_seed(self.seed, str(task), seen))
        for s in offered:
            if len(mem) < self.capacity_per_task:
                mem.append(s)
            elif self.policy == "reservoir":
                j = int(torch.randint(0, seen + 1, (1,), generator=g))
                if j < self.capacity_per_task:
                    mem[j] = s
            seen += 1
        self._seen[task] = seen

    def sample(self, k: int, generator: torch.Generator | None = None) -> dict[Any, tuple[Any, Any]]:
        """k samples in all, split evenly over the stored tasks: ``{task: (inputs, targets)}``.

        Within a task, samples are drawn without replacement when enough are stored, else with.
        """
        out: dict[Any, tuple[Any, Any]] = {}
        for t, drawn in self._draw(k, generator):
            xs, ys = [x for x, _ in drawn], [y for _, y in drawn]
            out[t] = (_collate(xs), None if ys[0] is None else _collate(ys))
        return out

    def sample_batch(self, k: int, generator: torch.Generator | None = None) -> tuple[Any, Any, list[Any]]:
        """The draw of ``sample(k)`` as one mixed batch: ``(inputs, targets, tasks)``.

        The same samples as ``sample(k, generator)`` (the same split over tasks, the same use of the
        generator), concatenated in the stored tasks' order; ``tasks[i]`` is the task of row ``i``.
        Targets are collated as ``sample``'s are (a leaf whose shapes differ is a list); targets that
        differ in structure across tasks (a tensor here, a dict there) come as a list with one target per
        row, None for rows of a task stored without targets. Inputs whose shapes differ across tasks
        cannot form one batch: a ValueError.

        Example:
            >>> import torch, clreg
            >>> buf = clreg.ReplayBuffer(capacity_per_task=4, seed=0)
            >>> buf.add("a", (torch.zeros(4, 3), torch.zeros(4).long()))
            >>> buf.add("b", (torch.ones(4, 3), torch.ones(4).long()))
            >>> x, y, tasks = buf.sample_batch(3)
            >>> x.shape, y.tolist(), tasks
            (torch.Size([3, 3]), [0, 0, 1], ['a', 'a', 'b'])
        """
        drawn = self._draw(k, generator)
        tasks = [t for t, samples in drawn for _ in samples]
        targets = [y for _, samples in drawn for _, y in samples]
        return _mixed_inputs(drawn), _mixed_targets(targets), tasks

    def _draw(self, k: int, generator: torch.Generator | None) -> list[tuple[Any, list[tuple[Any, Any]]]]:
        """``[(task, samples)]``: k stored samples in all, split evenly over the tasks in their order."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        tasks = [t for t, m in self._memory.items() if m]
        if not tasks:
            raise ValueError("the replay buffer is empty: add samples before sampling")
        if generator is None:
            rank, _ = rank_and_world()
            generator = torch.Generator().manual_seed(stable_seed(self.seed, rank, self._draws))
            self._draws += 1
        base, extra = divmod(k, len(tasks))
        out: list[tuple[Any, list[tuple[Any, Any]]]] = []
        for i, t in enumerate(tasks):
            n = base + (1 if i < extra else 0)
            if n == 0:
                continue
            mem = self._memory[t]
            if n <= len(mem):
                idx = torch.randperm(len(mem), generator=generator)[:n].tolist()
            else:
                idx = torch.randint(0, len(mem), (n,), generator=generator).tolist()
            out.append((t, [mem[j] for j in idx]))
        return out

    # -- state ------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "type": type(self).__name__,
            "capacity_per_task": self.capacity_per_task,
            "policy": self.policy,
            "seed": self.seed,
            "tasks": list(self._memory),
            "memory": [[list(s) for s in self._memory[t]] for t in self._memory],
            "seen": [self._seen.get(t, 0) for t in self._memory],
            "draws": self._draws,
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("type") != type(self).__name__:
            raise ValueError("not a ReplayBuffer state")
        if state.get("format_version") != self.format_version:
            raise ValueError(
                f"ReplayBuffer state has format version {state.get('format_version')}, this clreg reads {self.format_version}"
            )
        self.capacity_per_task = int(state["capacity_per_task"])
        self.policy = state["policy"]
        self.seed = int(state["seed"])
        self._memory = {t: [(s[0], s[1]) for s in mem] for t, mem in zip(state["tasks"], state["memory"])}
        self._seen = dict(zip(state["tasks"], state["seen"]))
        self._draws = int(state["draws"])

    def state_bytes(self) -> int:
        """Bytes of the stored tensors."""
        return tensor_bytes(t for mem in self._memory.values() for s in mem for t in tree_leaves(s))
