"""The curvature engine: per-layer statistics of per-sample gradients from one batched forward and a
few batched backward passes, instead of one backward per sample.

For each chunk of samples the engine runs the model once with every covered layer tapped (its input
kept, its output kept in the graph), evaluates the estimator's per-sample objective on each sample's
slice of the output (the same objective functions as the per-sample path, so the same labels and
draws), and for each of the objective's K values per sample backpropagates
:math:`\\sum_n \\sqrt{w_{n,k}}\\, v_{n,k}` to the layers' outputs only. Samples are independent (the model
is in eval mode), so each sample's slice of a layer's output gradient is that sample's own, and the
layer rules (:mod:`~clreg.functional.curvature.layers`) turn (input, output gradient) into the sum
over samples of squared per-sample gradients and into Kronecker factors. ``exact`` (K = C, weights
p) backpropagates the columns √p_c (e_c − p) of the softmax output Hessian's square root: one batched
backward per class. Parameters outside the covered layers (other layer types, weights shared between
layers, a BatchNorm in training mode) take the per-sample path, restricted to them.

Under FSDP2 (``fully_shard``) the same passes run through FSDP's own forward and backward, which
gather one FSDP module's parameters at a time; no parameter gradient is formed. Each layer's statistic
of this rank's samples is formed whole, one parameter at a time, and reduce-scattered at once into
this rank's shard of the sum (:func:`~clreg._sharding.reduce_to_shard`), so a rank holds its shards of
the sums and one parameter's whole statistic at most. Every rank takes the same number of steps (a
rank whose share of the data is done repeats a chunk whose statistics it drops), since each forward
and backward is a collective. The per-sample path cannot run on sharded parameters: a parameter
without a layer rule is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..._params import ParamSelector, ParamSet, canonical_name, state_dtype, unwrap_model
from ..._sharding import base_type, fsdp_modules, in_lockstep, is_sharded, local, reduce_to_shard, wrap_like
from ...data import Chunk, call_model, iter_chunks, stand_in_chunk, tree_index, tree_map, tree_slice, tree_to
from ...distributed import all_reduce_sum_
from .._per_sample import Objective, PerSampleEngine, ProgressFn, eval_mode, model_device
from .layers import Call, LayerRule, rule_for

__all__ = ["CurvatureEngine", "CurvatureSums"]

_CHUNK = 32


@dataclass
class CurvatureSums:
    """Sums over samples, before the division by the sample count ``n``: the squared per-sample
    gradients by parameter name, and the Kronecker factors (A, G) by layer name."""

    diagonal: dict[str, Tensor]
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    n: int = 0
    fallback: list[str] = field(default_factory=list)  # the parameters that took the per-sample path


@dataclass
class _Layer:
    name: str  # the module's canonical name
    rule: LayerRule
    params: dict[str, str]  # attribute ("weight", "bias") -> canonical parameter name, the selected ones
    calls: list[Call] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


def _affine_output_taps(module: nn.Module, layer: _Layer) -> list[Any]:
    """Hooks that keep the layer's input and the tensor its affine map produces (a clone goes on, so
    an in-place activation downstream cannot touch the kept one)."""
    inputs: list[Tensor] = []

    def keep_input(m: nn.Module, args: tuple) -> None:
        inputs.append(args[0].detach())

    def keep_output(out: Tensor) -> Tensor:
        layer.calls.append(Call(inputs.pop(), out))
        layer.outputs.append(out)
        return out.clone()

    handles = [module.register_forward_pre_hook(keep_input)]
    drop = getattr(module, "drop", None)
    if base_type(module) not in _PLAIN_TYPES and isinstance(drop, nn.Module):  # a BatchNorm with its activation
        handles.append(drop.register_forward_pre_hook(lambda m, args: (keep_output(args[0]),)))
    else:
        handles.append(module.register_forward_hook(lambda m, args, out: keep_output(out)))
    return handles


_PLAIN_TYPES = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
)


class CurvatureEngine:
    """Per-layer curvature of ``model`` over the selected parameters.

    Args:
        model: the model (wrappers looked through); it runs in eval mode.
        params: parameter names or a predicate, as everywhere in clreg.
        kfac: also form Kronecker factors for the layers that have them.
        max_factor: a layer whose A or G would be larger than this many rows gets no factors (its
            diagonal is still formed).
    """

    def __init__(
        self, model: nn.Module, params: ParamSelector = None, *, kfac: bool = False, max_factor: int | None = None
    ) -> None:
        self.model = unwrap_model(model)
        self.pset = ParamSet(self.model, params)
        self.kfac, self.max_factor = kfac, max_factor
        self.layers, self.fallback = self._cover()
        self.device = model_device(self.model)
        self.fsdp = bool(fsdp_modules(self.model))
        self._like = {n: p for n, p in zip(self.pset.names, self.pset.last()) if is_sharded(p)}
        if self.fsdp or self._like:
            self._check_shardable()

    def _check_shardable(self) -> None:
        """A ValueError where sharded parameters cannot be covered layer by layer."""
        if not self.fsdp:
            raise ValueError(
                "the model's parameters are DTensors but no module of it was passed to fully_shard: clreg forms "
                "importances of sharded parameters under FSDP2 only"
            )
        if self.fallback:
            owner = {
                canonical_name(f"{m}.{a}" if m else a): base_type(mod).__name__
                for m, mod in self.model.named_modules()
                for a, _ in mod.named_parameters(recurse=False)
            }
            name = self.fallback[0]
            raise ValueError(
                f"under FSDP2 importances are formed layer by layer, and parameter {name!r} (of a {owner.get(name)}; "
                f"{len(self.fallback)} such) has no layer rule (Linear, Conv2d, BatchNorm, LayerNorm, GroupNorm, "
                "Embedding, each parameter owned by one layer): leave it out with params=..."
            )

    def _cover(self) -> tuple[list[_Layer], list[str]]:
        selected = set(self.pset.names)
        owners: dict[int, int] = {}
        for m in self.model.modules():
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        layers, covered = [], set()
        for name, m in self.model.named_modules():
            rule = rule_for(m)
            own = {a: p for a, p in m.named_parameters(recurse=False) if owners[id(p)] == 1}  # shared: per sample
            if rule is None or not own:
                continue
            chosen = {a: canonical_name(f"{name}.{a}" if name else a) for a in rule.names if own.get(a) is not None}
            chosen = {a: n for a, n in chosen.items() if n in selected}
            if chosen:
                layers.append(_Layer(canonical_name(name), rule, chosen))
                covered |= set(chosen.values())
        return layers, [n for n in self.pset.names if n not in covered]

    def _wants_factors(self, layer: _Layer) -> bool:
        if not (self.kfac and layer.rule.kfac and "weight" in layer.params):
            return False
        w = layer.rule.module.weight
        rows = max(w.shape[0], w.shape[1:].numel() + (layer.rule.module.bias is not None))
        return self.max_factor is None or rows <= self.max_factor

    def zeros(self) -> CurvatureSums:
        """Zero sums: of a sharded parameter, this rank's shard (a plain tensor until :meth:`run` ends)."""
        diag = {}
        for layer in self.layers:
            for attr, name in layer.params.items():
                p = self._like.get(name, None)
                if p is not None:
                    diag[name] = torch.zeros(local(p).shape, dtype=state_dtype(p.dtype), device=p.device)
                    continue
                p = getattr(layer.rule.module, attr)
                diag[name] = torch.zeros(p.shape, dtype=state_dtype(p.dtype), device=p.device)
        return CurvatureSums(diag)

    def _chunks(self, data: Any, chunk_size: int, max_samples: int | None) -> Iterator[tuple[Chunk, bool]]:
        """(chunk, whether it counts): every chunk of this rank's share; under FSDP, in lockstep with the
        other ranks (see :func:`~clreg._sharding.in_lockstep`)."""
        chunks = iter_chunks(data, chunk_size, max_samples)
        if not self.fsdp:
            return ((ch, True) for ch in chunks)
        return in_lockstep(chunks, lambda: stand_in_chunk(data))

    @contextlib.contextmanager
    def _tapped(self) -> Iterator[None]:
        handles = [h for layer in self.layers for h in _affine_output_taps(layer.rule.module, layer)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for layer in self.layers:
                layer.calls, layer.outputs = [], []

    def _chunk(self, ch: Chunk, objective: Objective, extra: Any, sums: CurvatureSums, reduce: str, keep: bool) -> None:
        x, y = tree_to(ch.inputs, self.device), tree_to(ch.targets, self.device)
        e = tree_to(extra(ch), self.device) if extra is not None else None
        with self._tapped(), torch.enable_grad():
            out = call_model(self.model, x)
            self._check_sample_dims(ch.keys.numel())
            values, weights = _per_sample_values(objective, out, y, e, ch.keys.numel())
            outs = [o for layer in self.layers for o in layer.outputs]
            for k in range(values.shape[1]):
                seed = (values[:, k] * weights[:, k].detach().clamp(min=0).sqrt()).sum()
                grads = torch.autograd.grad(seed, outs, retain_graph=k + 1 < values.shape[1], allow_unused=True)
                self._accumulate(outs, grads, sums, reduce, keep, first_pass=k == 0)

    def _check_sample_dims(self, n: int) -> None:
        """Every tapped call's input and output lead with the chunk's samples (the rules read them so)."""
        for layer in self.layers:
            for c in layer.calls:
                if c.x.shape[0] != n or c.g.shape[0] != n:
                    raise SampleLayoutError(
                        f"layer {layer.name!r} ran on an input of shape {tuple(c.x.shape)} and gave {tuple(c.g.shape)} "
                        f"for a chunk of {n} samples: the curvature engine reads the first dimension as the sample; "
                        "use engine='per_sample' for a model that lays samples out otherwise"
                    )

    def _accumulate(
        self,
        outs: list[Tensor],
        grads: tuple,
        sums: CurvatureSums,
        reduce: str = "square",
        keep: bool = True,
        first_pass: bool = True,
    ) -> None:
        """Add each layer's statistic (``reduce``: see :data:`_STATISTICS`) of this pass to the sums, and
        its Kronecker factors (see :meth:`_add_factors`); with ``keep`` False (a rank repeating a chunk),
        zeros, through the same collectives."""
        by_tensor = {id(o): g for o, g in zip(outs, grads)}
        statistic = _STATISTICS[reduce]
        for layer in self.layers:
            calls = []
            for c in layer.calls:  # c.g holds the call's output until its gradient replaces it
                g = by_tensor[id(c.g)]
                calls.append(Call(c.x, torch.zeros_like(c.g) if g is None else g))
            if self.fsdp:
                calls = [_widened(c) for c in calls]
            for attr, name in layer.params.items():
                s = sums.diagonal[name]
                like = self._like.get(name)
                stat = statistic(layer.rule, calls, attr)
                if like is None:
                    if keep:
                        s.add_(stat.to(s.dtype))
                else:
                    s.add_(reduce_to_shard((stat if keep else torch.zeros_like(stat)).to(s.dtype), like))
            if keep and reduce == "square" and self._wants_factors(layer):
                self._add_factors(layer, calls, sums, first_pass)

    def _add_factors(self, layer: _Layer, calls: list[Call], sums: CurvatureSums, first_pass: bool) -> None:
        """Add this pass's G (one pass per class of ``exact``, per draw of ``mc``, each weighted) and, on
        a chunk's first pass only, its A: A is a statistic of the inputs, one term per sample whatever
        the number of passes."""
        g = layer.rule.grad_factor(calls).double()
        if not first_pass:
            sums.factors[layer.name][1].add_(g)
            return
        a = layer.rule.input_factor(calls).double()
        if layer.name in sums.factors:
            sa, sg = sums.factors[layer.name]
            sa.add_(a)
            sg.add_(g)
        else:
            sums.factors[layer.name] = (a, g)

    def run(
        self,
        data: Any,
        objective: Objective,
        *,
        k: int = 1,
        extra: Callable[[Chunk], Any] | None = None,
        chunk_size: int | None = None,
        max_samples: int | None = None,
        progress: ProgressFn | None = None,
        vectorize: bool = True,
        check: Callable[[Chunk], None] | None = None,
        reduce: str = "square",
    ) -> CurvatureSums:
        """The sums over ``data`` (all-reduced under torch.distributed; of parameters sharded by FSDP2,
        DTensors sharded like them); the fallback parameters' statistics come from the per-sample path,
        restricted to them. ``reduce``: ``"square"`` sums squared per-sample gradients (the Fisher),
        ``"abs"`` their absolute values (MAS; no factors)."""
        if reduce not in ("square", "abs"):
            raise ValueError(f"reduce must be 'square' or 'abs', got {reduce!r}")
        sums = self.zeros()
        count = 0
        with eval_mode(self.model):
            for ch, keep in self._chunks(data, chunk_size or _CHUNK, max_samples):
                if keep and check is not None:
                    check(ch)
                self._chunk(ch, objective, extra, sums, reduce, keep)
                if keep:
                    count += int(ch.keys.numel())
                    if progress is not None:
                        progress(count, None)
        total = torch.tensor([float(count)], dtype=torch.float64, device=self.device)
        factors = [t for pair in sums.factors.values() for t in pair]
        plain = [t for n, t in sums.diagonal.items() if n not in self._like]  # the shards are summed already
        all_reduce_sum_([*plain, *factors, total])
        sums.n = round(total.item())
        if sums.n == 0:
            raise ValueError("the data gave no samples: cannot estimate an importance from empty data")
        self._wrap_shards(sums.diagonal)
        if self.fallback:
            per_sample = PerSampleEngine(self.model, self.fallback, vectorize=vectorize)
            rest, _ = per_sample.run(data, objective, reduce=reduce, k=k, extra=extra, chunk_size=chunk_size,
                                     max_samples=max_samples, check=check)  # fmt: skip
            sums.diagonal.update(rest)
            sums.fallback = list(self.fallback)
        return sums

    def _wrap_shards(self, diagonal: dict[str, Tensor]) -> None:
        for name, like in self._like.items():
            if name in diagonal:
                diagonal[name] = wrap_like(diagonal[name], like)

    def run_batched(
        self,
        data: Any,
        batch_loss: Callable[[Any, Any], Tensor],
        batch_size: int,
        *,
        max_samples: int | None = None,
        progress: ProgressFn | None = None,
        check: Callable[[Chunk], None] | None = None,
    ) -> tuple[dict[str, Tensor], int]:
        """(Σ over batches of the squared gradient of ``batch_loss(outputs, targets)``, the number of
        batches over every rank): the ``batched`` estimator layer by layer, each batch's gradient
        formed from its layers' inputs and output gradients (for FSDP2, where no rank may form another
        rank's batch gradient). ``batch_size`` as :func:`~clreg.data.iter_chunks` takes it."""
        sums = self.zeros()
        count = 0
        with eval_mode(self.model):
            for ch, keep in self._chunks(data, batch_size, max_samples):
                if keep and check is not None:
                    check(ch)
                x, y = tree_to(ch.inputs, self.device), tree_to(ch.targets, self.device)
                with self._tapped(), torch.enable_grad():
                    loss = batch_loss(call_model(self.model, x), y)
                    outs = [o for layer in self.layers for o in layer.outputs]
                    grads = torch.autograd.grad(loss, outs, allow_unused=True)
                    self._accumulate(outs, grads, sums, "batch", keep)
                count += keep
                if keep and progress is not None:
                    progress(count, None)
        total = torch.tensor([float(count)], dtype=torch.float64, device=self.device)
        all_reduce_sum_([*(t for n, t in sums.diagonal.items() if n not in self._like), total])
        n = round(total.item())
        if n == 0:
            raise ValueError("the data gave no batches: cannot estimate a Fisher from empty data")
        self._wrap_shards(sums.diagonal)
        return sums.diagonal, n


_STATISTICS: dict[str, Callable[[LayerRule, list[Call], str], Tensor]] = {
    "square": lambda rule, calls, attr: rule.square_sum(calls, attr),
    "abs": lambda rule, calls, attr: rule.abs_sum(calls, attr),
    "batch": lambda rule, calls, attr: rule.batch_grad(calls, attr).square(),
}
"""What a pass adds per parameter: Σ_n g_n² (the Fisher), Σ_n abs(g_n) (MAS), (Σ_n g_n)² (``batched``)."""


def _widened(c: Call) -> Call:
    """A call's half-precision tensors (FSDP's mixed precision) in float32, for the statistics."""
    wide = lambda t: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t  # noqa: E731
    return Call(wide(c.x), wide(c.g))


class SampleLayoutError(ValueError):
    """A covered layer's input or output does not lead with the chunk's samples."""


def _per_sample_values(objective: Objective, out: Any, y: Any, e: Any, batch: int) -> tuple[Tensor, Tensor]:
    """(B, K) values and weights: the per-sample objective on each sample's slice of the output. The
    output is split once (``Tensor.split``), so the backward joins the samples' gradients in one pass
    instead of one zero-filled output-sized gradient per sample."""
    pieces: dict[int, tuple[Tensor, ...]] = {}
    tree_map(lambda t: pieces.setdefault(id(t), t.split(1)), out)
    values, weights = [], []
    for i in range(batch):
        yi = None if y is None else tree_slice(y, slice(i, i + 1))
        ei = None if e is None else tree_index(e, i)
        v, w = objective(tree_map(lambda t, i=i: pieces[id(t)][i], out), yi, ei)
        values.append(v.reshape(-1))
        weights.append(w.reshape(-1))
    return torch.stack(values), torch.stack(weights)
