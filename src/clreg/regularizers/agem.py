r"""Averaged Gradient Episodic Memory (Chaudhry, Ranzato, Rohrbach & Elhoseiny, ICLR 2019, *Efficient
Lifelong Learning with A-GEM*).

A-GEM acts on the optimizer's step, not on the loss. Before each step it computes a **reference
gradient** :math:`g_{ref} = \nabla_\theta \ell_{ref}(\theta)`, the gradient of the loss on a draw from a
memory of past tasks' samples, and replaces the gradient at hand g when the two conflict
(:mod:`clreg.functional.agem`):

.. math::

    \tilde g = g - \frac{\min(g^\top g_{ref},\, 0)}{g_{ref}^\top g_{ref}} \, g_{ref} .

Conventions:

* **one vector**: g and :math:`g_{ref}` are the concatenation of the parameters this step updates
  (selected, held by the optimizer, with a ``.grad``); the dot products sum over all of them at once.
  A parameter whose ``.grad`` is ``None`` is not updated by the optimizer and is left out of both
  vectors, so :math:`\tilde g^\top g_{ref} = 0` holds over the step's parameters;
* **the gradient at hand** is ``.grad`` when the step pre-hook runs: after the backward (and DDP's
  all-reduce), after a GradScaler's unscale (``scaler.step`` unscales before it calls ``step()``; a
  step it skips for inf/NaN runs no hook and draws nothing) and after any clipping you do before
  ``step()`` (clipping sees the unprojected gradient; the projection never increases the norm, so a
  clipping bound still holds). Optimizer pre-hooks run in the order they were attached: a penalty
  attached before A-GEM has its gradient projected with the task's, one attached after it does not;
* **the reference loss** ``loss_fn`` is yours: a callable ``loss_fn(model, inputs, targets) -> scalar``
  called once on a mixed batch of ``sample_size`` samples (:meth:`~clreg.ReplayBuffer.sample_batch`),
  or a mapping ``{task: loss_fn}`` called per task on :meth:`~clreg.ReplayBuffer.sample`'s draw, the
  tasks' losses weighted by their share of the draw, :math:`\ell_{ref} = \sum_t (n_t / k)\, \ell_t` (the
  mean over the draw when each :math:`\ell_t` is a mean over its samples). The draw is moved to the
  parameters' device. ``model`` is the module A-GEM was built on without its DDP wrapper, run in its
  current mode (in training mode BatchNorm normalises the draw with its own statistics and updates
  its running statistics, as a training step on it would). The reference gradient comes from
  ``torch.autograd.grad`` on the step's parameters, so ``.grad`` is never touched, and no loss scaling
  is applied to it (the projection does not depend on :math:`g_{ref}`'s scale);
* **when**: a reference is drawn on the first step with a non-empty memory and then every
  ``reference_every`` steps (1, the paper's: every step); between draws the last one is reused (it is
  kept as state, so a checkpoint taken between draws resumes exactly). An empty memory (during the
  first task) means no projection and no draw: the step goes on with the gradient at hand;
* **the memory** is a :class:`~clreg.ReplayBuffer`, given (``memory=``: yours to fill, with any task
  keys; ``consolidate`` does not add to it) or A-GEM's own (``capacity_per_task=``: ``consolidate(model,
  data)`` stores a uniform random ``capacity_per_task`` of the task's samples under the task's index
  0, 1, …, seeded by ``seed``). Its samples, the draw counter and the cached reference are state:
  ``state_dict()`` → ``load_state_dict(strict=True)`` into a fresh instance resumes the same draws and
  projections.

A-GEM is not a penalty: ``agem(model)`` returns a zero tensor on the parameters' device (so it sits in
a :class:`~clreg.Compose` and in a loss without changing either) and it acts only when attached
(``attachable``; ``agem.attach(optimizer)``, or ``attach(optimizer, hook=False)`` and
:meth:`~clreg.Regularizer.pre_step` for a loop that runs the backward inside ``step(closure)``).
``Compose.attach`` attaches it with the other attachable members, in the members' order. It records
in its :class:`~clreg.GradientLedger` what it adds to ``.grad`` (the correction
:math:`-c\, g_{ref}`), as the penalties do, so an SI sharing the ledger integrates the task loss's
gradient g along the projected steps (``path_gradient="task"``: the path integral of the loss that is
learnt) and with ``path_gradient="total"`` the projected gradient the optimizer used.
Counters, as state: ``steps`` (hooked steps), ``draws`` (reference gradients computed on this rank),
``projections`` (steps whose gradient was projected).

Distributed: under DDP the gradient at hand is already averaged over ranks; each rank draws its own
``sample_size`` samples (the draw is seeded by ``seed``, the rank and the draw counter) and the
reference gradients are averaged over ranks (one all-reduce of P numbers per draw), so every rank
projects the same gradient: the reference of a draw of ``world × sample_size`` samples. Every rank
must step together (as DDP's ranks do). Under FSDP2 (``fully_shard``) the same holds shard by shard:
the reference comes from a backward through the sharded model (the gradient at hand set aside and put
back after it; FSDP2's reduce-scatter averages the ranks' draws into each rank's shard), the dot
products are summed over the mesh (one all-reduce of two numbers) and each rank projects its own
shards. Under FSDP2 ``reference_every`` must be 1 (the cached reference is not kept in shards).

Example:
    >>> import torch, torch.nn.functional as F
    >>> from clreg.regularizers.agem import AGEM
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)
    >>> agem = AGEM(model, loss_fn, capacity_per_task=8, sample_size=4).attach(opt)
    >>> for task in range(2):
    ...     x, y = torch.randn(16, 4), torch.full((16,), task)
    ...     for _ in range(3):
    ...         opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
    ...     agem.consolidate(model, torch.utils.data.TensorDataset(x, y))
    >>> len(agem.memory), int(agem.steps), int(agem.draws)   # task 0's steps had nothing to draw from
    (16, 6, 3)
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._params import ParamSelector, state_dtype
from .._sharding import local, local_all, sum_over_mesh
from ..data import batch_size_of, is_map_dataset, split_item, stable_seed, tree_index, tree_map, tree_to
from ..distributed import all_reduce_sum_, is_distributed, rank_and_world
from ..functional.agem import agem_coefficient, agem_dots, agem_project_
from ..replay import ReplayBuffer
from ..spec import TaskSpec
from .base import IntHyperparameter, Regularizer, check_int
from .ledger import GradientLedger

__all__ = ["AGEM", "ReferenceLoss"]

ReferenceLoss = Callable[[nn.Module, Any, Any], Tensor]
"""``loss_fn(model, inputs, targets) -> Tensor``: a scalar loss on a draw from the memory."""

SHARDED_CACHE = "A-GEM under FSDP2 needs reference_every=1: a cached reference gradient is not kept in shards"


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel (a forward through DDP would start its reducer)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _check_loss_fn(loss_fn: Any) -> ReferenceLoss | Mapping[Any, ReferenceLoss]:
    if isinstance(loss_fn, Mapping):
        if not loss_fn:
            raise ValueError("loss_fn as a mapping {task: loss_fn} is empty: give a loss for each task in the memory")
        bad = [k for k, f in loss_fn.items() if not callable(f)]
        if bad:
            raise TypeError(
                "loss_fn as a mapping must map each task to a callable loss_fn(model, inputs, targets); "
                f"task {bad[0]!r} has a {type(loss_fn[bad[0]]).__name__}"
            )
        return loss_fn
    if not callable(loss_fn):
        raise TypeError(
            "loss_fn must be a callable loss_fn(model, inputs, targets) or a mapping {task: callable}, "
            f"got {type(loss_fn).__name__}"
        )
    return loss_fn


def _checked_loss(loss: Any, where: str) -> Tensor:
    """``loss`` if it is a scalar tensor with a gradient, else a clear error."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{where} must return a scalar tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(
            f"{where} must return a scalar (0-d) tensor, got shape {tuple(loss.shape)}: reduce it (.mean())"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"{where} returned a loss without a gradient: compute it through the model it is given, "
            "with gradients enabled, from parameters that require grad"
        )
    return loss


def _memory_of(memory: ReplayBuffer | None, capacity_per_task: int | None, seed: int) -> tuple[ReplayBuffer, bool]:
    """The memory and whether A-GEM owns it (and fills it at ``consolidate``)."""
    if (memory is None) == (capacity_per_task is None):
        raise ValueError(
            "give exactly one of memory= (a clreg.ReplayBuffer you fill) and capacity_per_task= (A-GEM's own)"
        )
    if memory is not None:
        if not isinstance(memory, ReplayBuffer):
            raise TypeError(f"memory must be a clreg.ReplayBuffer, got {type(memory).__name__}")
        return memory, False
    return ReplayBuffer(check_int("capacity_per_task", capacity_per_task), policy="reservoir", seed=seed), True


def _detached(item: Any) -> Any:
    return tree_map(lambda t: t.detach().clone(), item)


def _reservoir(batches: Iterable[Any], capacity: int, generator: torch.Generator) -> list[tuple[Any, Any]]:
    """A uniform sample of at most ``capacity`` of the samples in an iterable of batches (one pass)."""
    kept: list[tuple[Any, Any]] = []
    seen = 0
    for batch in batches:
        x, y = split_item(batch)
        for i in range(batch_size_of(x)):
            j = seen if len(kept) < capacity else int(torch.randint(0, seen + 1, (1,), generator=generator))
            if j < capacity:
                item = (_detached(tree_index(x, i)), None if y is None else _detached(tree_index(y, i)))
                if j == len(kept):
                    kept.append(item)
                else:
                    kept[j] = item
            seen += 1
    return kept


def _task_samples(data: Any, capacity: int, seed: int, task: int) -> list[tuple[Any, Any]]:
    """This rank's offer of ``task``'s samples to the memory: of a ``Dataset``, a uniform ``capacity`` of its
    indices (the same on every rank) split over the ranks; of an iterable of batches (or one batch
    ``(inputs, targets)``), a uniform ``capacity`` of this rank's samples (the memory then keeps a uniform
    ``capacity`` of the ranks' offers)."""
    rank, world = rank_and_world()
    if is_map_dataset(data):
        g = torch.Generator().manual_seed(stable_seed(seed, "agem-memory", task))
        chosen = torch.randperm(len(data), generator=g)[:capacity].tolist()
        return [split_item(data[i]) for i in chosen[rank::world]]
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        data = [data]
    if isinstance(data, (Tensor, dict, str)) or not isinstance(data, Iterable):
        raise TypeError(
            "consolidate's data must be a map-style Dataset, a DataLoader, an iterable of batches or one batch "
            f"(inputs, targets); got {type(data).__name__}"
        )
    g = torch.Generator().manual_seed(stable_seed(seed, "agem-memory", task, rank))
    return _reservoir(data, capacity, g)


def _in_state_dtype(params: list[Tensor], grads: list[Tensor | None]) -> list[Tensor]:
    """Each gradient detached in its parameter's state dtype; zeros (laid out as the parameter) where None."""
    out = []
    for p, g in zip(params, grads):
        dtype = state_dtype(p.dtype)
        out.append(torch.zeros_like(p, dtype=dtype) if g is None else g.detach().to(dtype))
    return out


class AGEM(Regularizer):
    """A-GEM: the gradient projected away from a memory draw's gradient when they conflict.

    Args:
        model: the model (DDP-wrapped, sharded by FSDP2, or neither).
        loss_fn: the reference loss, ``loss_fn(model, inputs, targets) -> scalar`` on one mixed draw, or a
            mapping ``{task: loss_fn}`` applied per task (see the module).
        memory: a :class:`~clreg.ReplayBuffer` you fill (``consolidate`` leaves it alone), or
        capacity_per_task: the size of A-GEM's own memory per task, filled by ``consolidate``.
        sample_size: k, the samples drawn for one reference gradient (per rank).
        reference_every: draw a new reference every this many steps, reusing the last one in between.
        seed: seeds the draws (with the rank and the draw counter) and the choice of stored samples.
        params: the parameters to act on (names or a predicate; default: all trainable ones).

    Buffers: ``steps``, ``draws``, ``projections`` (counters), ``age`` (steps served by the current
    reference, 0 for none), ``reference`` (the cached reference gradient, one row per parameter once
    ``reference_every > 1``) and the memory's samples (``memory._extra_state``).
    """

    attachable = True
    hyperparameters = ("sample_size", "reference_every", "seed")

    def __init__(
        self,
        model: nn.Module,
        loss_fn: ReferenceLoss | Mapping[Any, ReferenceLoss],
        memory: ReplayBuffer | None = None,
        *,
        capacity_per_task: int | None = None,
        sample_size: int = 64,
        reference_every: int = 1,
        seed: int = 0,
        params: ParamSelector = None,
    ) -> None:
        super().__init__(model, params)
        self.loss_fn = loss_fn
        self.sample_size, self.reference_every, self.seed = sample_size, reference_every, seed
        self.memory, self.owns_memory = _memory_of(memory, capacity_per_task, self._seed)
        for name in ("steps", "draws", "projections", "age"):
            self.add_state(name, torch.zeros((), dtype=torch.int64))
        device = self._pset.last()[0].device
        empty = [
            torch.zeros((0, *s), dtype=state_dtype(d), device=device)
            for s, d in zip(self._pset.shapes, self._pset.dtypes)
        ]
        self.add_state("reference", dict(zip(self._pset.names, empty)), growable=True)
        self._model = weakref.ref(_unwrap_ddp(model))
        self._recording = self.ledger.switch()

    # -- settings ---------------------------------------------------------------------------------
    @property
    def loss_fn(self) -> ReferenceLoss | Mapping[Any, ReferenceLoss]:
        """The reference loss (not saved with the state: give it to the instance you load into)."""
        return self.__dict__["_loss_fn"]

    @loss_fn.setter
    def loss_fn(self, value: Any) -> None:
        self.__dict__["_loss_fn"] = _check_loss_fn(value)  # never registered as a submodule

    sample_size = IntHyperparameter(doc="k ≥ 1, the samples drawn per reference gradient (per rank).")
    seed = IntHyperparameter(0, doc="Seeds the draws and the choice of stored samples (≥ 0).")

    @property
    def reference_every(self) -> int:
        """A new reference gradient every this many steps (≥ 1; the last one is reused in between)."""
        return self._reference_every

    @reference_every.setter
    def reference_every(self, value: int) -> None:
        value = check_int("reference_every", value)
        if value > 1 and self._pset.sharded:
            raise ValueError(SHARDED_CACHE)
        self._reference_every = value

    def _ledger_changed(self, old: GradientLedger) -> None:
        self._recording = self.ledger.switch()

    def _remember(self, model: nn.Module) -> None:
        self._resolve(model)
        self._model = weakref.ref(_unwrap_ddp(model))

    # -- the interface ----------------------------------------------------------------------------
    def forward(self, model: nn.Module, inputs: Any = None, outputs: Any = None) -> Tensor:
        """Zero: A-GEM changes the step, not the loss (a zero tensor on the parameters' device)."""
        self._remember(model)
        self.last_value = self._zero()
        return self.last_value

    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        """End a task: with its own memory, store a uniform ``capacity_per_task`` of ``data``'s samples
        under the task's index (a given memory is left alone, ``data`` unused); the cached reference is
        dropped. ``spec`` is not used."""
        self._remember(model)
        if self.owns_memory:
            if data is None:
                raise ValueError("AGEM.consolidate needs the task's data to fill its memory (capacity_per_task=...)")
            cap = self.memory.capacity_per_task
            self.memory.add(self._n_tasks_py, _task_samples(data, cap, self._seed, self._n_tasks_py))
        self.age.zero_()
        self._bump_tasks()

    def attach(self, optimizer: torch.optim.Optimizer, scaler: Any = None, *, hook: bool = True) -> AGEM:
        """Project ``.grad`` before each ``optimizer.step()`` (a step pre-hook; with ``hook=False``, when
        the caller calls :meth:`~clreg.Regularizer.pre_step`). ``scaler`` is not needed: the hook runs
        after GradScaler's unscale."""
        self._register_pre_step(optimizer, hook)
        return self

    def state_bytes(self) -> int:
        """The buffers' bytes and the memory's samples'."""
        return super().state_bytes() + self.memory.state_bytes()

    # -- the step ---------------------------------------------------------------------------------
    def _pre_step(self, mask: list[bool]) -> None:
        self.steps += 1
        params = self._pset.last()
        idx = [i for i, (m, p) in enumerate(zip(mask, params)) if m and p.grad is not None]
        if not idx or len(self.memory) == 0:
            return
        reference = self._reference_now(mask)
        ps = [params[i] for i in idx]
        grads, refs = local_all([p.grad for p in ps]), local_all([reference[i] for i in idx])
        dots = agem_dots(grads, refs)
        if self._pset.sharded:
            dots = sum_over_mesh(dots, self._pset.mesh)
        dot, ref_sq = dots.tolist()
        if not math.isfinite(ref_sq):
            raise ValueError("A-GEM's reference gradient contains NaN or inf: check loss_fn and the memory's samples")
        c = agem_coefficient(dot, ref_sq)
        if c == 0.0:
            return
        if self._recording(params):
            added = [r.to(g.dtype) * -c for g, r in zip(grads, refs)]
            with torch.no_grad():
                torch._foreach_add_(grads, added)
            self.ledger.record_unscaled(ps, added)
        else:
            agem_project_(grads, refs, c)
        self.projections += 1

    def _reference_now(self, mask: list[bool]) -> list[Tensor]:
        """The reference for this step: the cached one while it has served fewer than ``reference_every``
        steps, else a fresh draw."""
        cached = self.reference.tensors
        if 0 < int(self.age) < self._reference_every and cached[0].shape[0] == 1:
            self.age += 1
            return [t[0] for t in cached]
        ref = self._fresh_reference(mask)
        self.age.fill_(1)
        if self._reference_every > 1:
            if cached[0].shape[0] == 0:
                self.reference.append(ref)
            else:
                self.reference.set([r[None] for r in ref])
        return ref

    def _fresh_reference(self, mask: list[bool]) -> list[Tensor]:
        """∇ of the reference loss on a new draw, one tensor per selected parameter in the state dtype
        (zeros where the optimizer does not hold it or the loss does not reach it), averaged over ranks."""
        model = self._model()
        if model is None:
            raise ValueError("the model this A-GEM was built on no longer exists: build it on the model you train")
        if self._pset.sharded:
            return self._sharded_reference(model, mask)
        params = self._pset.last()
        wanted = [i for i, (m, p) in enumerate(zip(mask, params)) if m and p.requires_grad]
        with torch.enable_grad():
            loss = self._reference_loss(model, params[0].device)
            grads = torch.autograd.grad(loss, [params[i] for i in wanted], allow_unused=True)
        by_index = dict(zip(wanted, grads))
        ref = _in_state_dtype(params, [by_index.get(i) for i in range(len(params))])
        if is_distributed():
            all_reduce_sum_(ref)
            torch._foreach_div_(ref, float(rank_and_world()[1]))
        return ref

    def _sharded_reference(self, model: nn.Module, mask: list[bool]) -> list[Tensor]:
        """Under FSDP2: ∇ of the reference loss by a backward through the sharded model, its reduce-scatter
        averaging the ranks' draws into each shard's ``.grad``; every parameter's gradient at hand is set
        aside before and put back after."""
        params = self._pset.last()
        held = {p: p.grad for p in model.parameters()}
        for p in held:
            p.grad = None
        try:
            with torch.enable_grad():
                self._reference_loss(model, local(params[0]).device).backward()
            ref = _in_state_dtype(params, [p.grad if m else None for m, p in zip(mask, params)])
        finally:
            for p, g in held.items():
                p.grad = g
        return ref

    def _reference_loss(self, model: nn.Module, device: torch.device) -> Tensor:
        """The reference loss on a new draw of ``sample_size`` samples (seeded by seed, rank and count)."""
        k = self._sample_size
        g = torch.Generator().manual_seed(stable_seed(self._seed, "agem", rank_and_world()[0], int(self.draws)))
        self.draws += 1
        loss_fn = self.loss_fn
        if not isinstance(loss_fn, Mapping):
            try:
                x, y, _ = self.memory.sample_batch(k, g)
            except ValueError as err:
                raise ValueError(
                    f"{err} (A-GEM: give loss_fn as a mapping {{task: loss_fn}} to draw per task)"
                ) from err
            return _checked_loss(loss_fn(model, tree_to(x, device), tree_to(y, device)), "loss_fn")
        parts = []
        for task, (x, y) in self.memory.sample(k, g).items():
            if task not in loss_fn:
                raise ValueError(
                    f"the memory holds task {task!r} but loss_fn has no loss for it (it has {list(loss_fn)})"
                )
            part = _checked_loss(loss_fn[task](model, tree_to(x, device), tree_to(y, device)), f"loss_fn[{task!r}]")
            parts.append(part * (batch_size_of(x) / k))
        return torch.stack(parts).sum()
