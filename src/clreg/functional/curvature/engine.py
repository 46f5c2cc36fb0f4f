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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..._params import ParamSelector, ParamSet, canonical_name, state_dtype, unwrap_model
from ...data import Chunk, call_model, iter_chunks, tree_index, tree_slice, tree_to
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
    if type(module) not in _PLAIN_TYPES and isinstance(drop, nn.Module):  # a BatchNorm with its activation
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
        rows = max(w.shape[0], w[0].numel() + (layer.rule.module.bias is not None))
        return self.max_factor is None or rows <= self.max_factor

    def zeros(self) -> CurvatureSums:
        diag = {}
        for layer in self.layers:
            for attr, name in layer.params.items():
                p = getattr(layer.rule.module, attr)
                diag[name] = torch.zeros(p.shape, dtype=state_dtype(p.dtype), device=p.device)
        return CurvatureSums(diag)

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

    def _chunk(self, ch: Chunk, objective: Objective, extra: Any, sums: CurvatureSums) -> None:
        x, y = tree_to(ch.inputs, self.device), tree_to(ch.targets, self.device)
        e = tree_to(extra(ch), self.device) if extra is not None else None
        with self._tapped(), torch.enable_grad():
            out = call_model(self.model, x)
            values, weights = _per_sample_values(objective, out, y, e, ch.keys.numel())
            outs = [o for layer in self.layers for o in layer.outputs]
            for k in range(values.shape[1]):
                seed = (values[:, k] * weights[:, k].detach().clamp(min=0).sqrt()).sum()
                grads = torch.autograd.grad(seed, outs, retain_graph=k + 1 < values.shape[1], allow_unused=True)
                self._accumulate(outs, grads, sums)

    def _accumulate(self, outs: list[Tensor], grads: tuple, sums: CurvatureSums) -> None:
        by_tensor = {id(o): g for o, g in zip(outs, grads)}
        for layer in self.layers:
            calls = []
            for c in layer.calls:  # c.g holds the call's output until its gradient replaces it
                g = by_tensor[id(c.g)]
                calls.append(Call(c.x, torch.zeros_like(c.g) if g is None else g))
            for attr, name in layer.params.items():
                s = sums.diagonal[name]
                s.add_(layer.rule.square_sum(calls, attr).to(s.dtype))
            if self._wants_factors(layer):
                a, g = layer.rule.factors(calls)
                if layer.name in sums.factors:
                    sa, sg = sums.factors[layer.name]
                    sa.add_(a.double())
                    sg.add_(g.double())
                else:
                    sums.factors[layer.name] = (a.double(), g.double())

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
    ) -> CurvatureSums:
        """The sums over ``data`` (all-reduced under torch.distributed); the fallback parameters'
        squared per-sample gradients come from the per-sample path, restricted to them."""
        sums = self.zeros()
        count = 0
        with eval_mode(self.model):
            for ch in iter_chunks(data, chunk_size or _CHUNK, max_samples):
                if check is not None:
                    check(ch)
                self._chunk(ch, objective, extra, sums)
                count += int(ch.keys.numel())
                if progress is not None:
                    progress(count, None)
        total = torch.tensor([float(count)], dtype=torch.float64, device=self.device)
        factors = [t for pair in sums.factors.values() for t in pair]
        all_reduce_sum_([*sums.diagonal.values(), *factors, total])
        sums.n = round(total.item())
        if sums.n == 0:
            raise ValueError("the data gave no samples: cannot estimate an importance from empty data")
        if self.fallback:
            per_sample = PerSampleEngine(self.model, self.fallback, vectorize=vectorize)
            rest, _ = per_sample.run(data, objective, reduce="square", k=k, extra=extra, chunk_size=chunk_size,
                                     max_samples=max_samples, check=check)  # fmt: skip
            sums.diagonal.update(rest)
            sums.fallback = list(self.fallback)
        return sums


def _per_sample_values(objective: Objective, out: Any, y: Any, e: Any, batch: int) -> tuple[Tensor, Tensor]:
    """(B, K) values and weights: the per-sample objective on each sample's slice of the output."""
    values, weights = [], []
    for i in range(batch):
        yi = None if y is None else tree_slice(y, slice(i, i + 1))
        ei = None if e is None else tree_index(e, i)
        v, w = objective(tree_slice(out, slice(i, i + 1)), yi, ei)
        values.append(v.reshape(-1))
        weights.append(w.reshape(-1))
    return torch.stack(values), torch.stack(weights)
