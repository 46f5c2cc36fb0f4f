"""The per-sample gradient engine behind the Fisher estimators and the MAS importance.

For each sample the objective gives K values v_k and K weights w_k; the engine sums, over samples,
Σ_k w_k g_k² (``reduce="square"``) or Σ_k w_k |g_k| (``reduce="abs"``), where g_k = ∂v_k/∂θ. It runs
``vmap(jacrev(functional_call(...)))`` over chunks of samples, or a per-sample loop when the model
cannot be vmapped. The model is put in eval mode (BatchNorm statistics untouched) and its modes are
restored afterwards.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from .._params import ParamSelector, ParamSet, canonical_name, state_dtype, unwrap_model
from .._sharding import fsdp_modules
from ..data import (
    Chunk,
    batch_size_of,
    call_model,
    functional_call_model,
    iter_chunks,
    tree_index,
    tree_slice,
    tree_to,
    tree_unsqueeze,
)
from ..distributed import all_reduce_sum_

Objective = Callable[[Any, Any, Any], tuple[Tensor, Tensor]]
"""``objective(outputs, target, extra) -> (values[K], weights[K])`` for one sample (batch dim 1)."""

ProgressFn = Callable[[int, int | None], None]

_MEMORY_BUDGET = 1 << 27  # elements of per-sample gradients held at once (512 MiB in float32)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def default_chunk_size(n_params: int, k: int) -> int:
    return int(max(1, min(64, _MEMORY_BUDGET // max(1, n_params * k))))


class PerSampleEngine:
    """Sums a statistic of per-sample gradients over data, vectorised when the model allows."""

    def __init__(self, model: nn.Module, params: ParamSelector = None, vectorize: bool = True) -> None:
        self.model = unwrap_model(model)
        self.pset = ParamSet(self.model, params)
        if self.pset.sharded or fsdp_modules(self.model):
            raise ValueError(
                "per-sample gradients by functional_call cannot run on a model sharded by fully_shard: the Fisher "
                "and MAS of an FSDP2 model are formed by the curvature engine (fisher_diagonal and mas_importance "
                "choose it)"
            )
        chosen = set(self.pset.names)
        self.selected: dict[str, Tensor] = {}
        self.frozen: dict[str, Tensor] = {}
        self.canon: dict[str, str] = {}
        for name, p in self.model.named_parameters():
            c = canonical_name(name)
            if c in chosen:
                self.selected[name] = p
                self.canon[name] = c
            else:
                self.frozen[name] = p.detach()
        for name, b in self.model.named_buffers():
            self.frozen[name] = b
        self.vectorize = vectorize
        self.device = model_device(self.model)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.selected.values())

    def zeros(self) -> dict[str, Tensor]:
        return {n: torch.zeros(p.shape, dtype=state_dtype(p.dtype), device=p.device) for n, p in self.selected.items()}

    def run(
        self,
        data: Any,
        objective: Objective,
        *,
        reduce: str = "square",
        k: int = 1,
        extra: Callable[[Chunk], Any] | None = None,
        chunk_size: int | None = None,
        max_samples: int | None = None,
        progress: ProgressFn | None = None,
        check: Callable[[Chunk], None] | None = None,
    ) -> tuple[dict[str, Tensor], int]:
        """Returns (sums by canonical name, global sample count). Raises ValueError on empty data;
        ``check(chunk)``, if given, runs on each chunk before its gradients (to refuse bad targets)."""
        if reduce not in ("square", "abs"):
            raise ValueError(f"reduce must be 'square' or 'abs', got {reduce!r}")
        sums = self.zeros()
        chunk = chunk_size or default_chunk_size(self.n_params, k)
        count = 0
        use_vmap = self.vectorize
        with eval_mode(self.model):
            for ch in iter_chunks(data, chunk, max_samples):
                if check is not None:
                    check(ch)
                x = tree_to(ch.inputs, self.device)
                y = tree_to(ch.targets, self.device)
                e = tree_to(extra(ch), self.device) if extra is not None else None
                if use_vmap:
                    try:
                        self._vmapped(x, y, e, objective, reduce, sums)
                    except (RuntimeError, NotImplementedError) as err:
                        warnings.warn(
                            f"clreg: this model cannot be vmapped ({type(err).__name__}: {str(err)[:200]}); "
                            "computing per-sample gradients in a loop instead (slower, same result)",
                            RuntimeWarning,
                            stacklevel=3,
                        )
                        use_vmap = False
                        self._looped(x, y, e, objective, reduce, sums)
                else:
                    self._looped(x, y, e, objective, reduce, sums)
                count += int(ch.keys.numel())
                if progress is not None:
                    progress(count, None)
        total = torch.tensor([float(count)], dtype=torch.float64, device=self.device)
        all_reduce_sum_([*sums.values(), total])
        n = round(total.item())
        if n == 0:
            raise ValueError("the data gave no samples: cannot estimate an importance from empty data")
        return {self.canon[name]: s for name, s in sums.items()}, n

    def _accumulate(self, sums: dict[str, Tensor], grads: dict[str, Tensor], weights: Tensor, reduce: str) -> None:
        # grads[name]: (B, K, *shape); weights: (B, K)
        for name, g in grads.items():
            s = sums[name]
            g = g.to(s.dtype)
            w = weights.to(s.dtype).reshape(*weights.shape, *([1] * (g.dim() - 2)))
            stat = g.square() if reduce == "square" else g.abs()
            s.add_((stat * w).sum(dim=(0, 1)))

    def _vmapped(self, x: Any, y: Any, e: Any, objective: Objective, reduce: str, sums: dict[str, Tensor]) -> None:
        model, frozen = self.model, self.frozen

        def f(sel: dict[str, Tensor], xi: Any, yi: Any, ei: Any) -> tuple[Tensor, Tensor]:
            out = functional_call_model(model, (sel, frozen), tree_unsqueeze(xi))
            values, weights = objective(out, tree_unsqueeze(yi), ei)
            return values, weights.detach()

        sel = {n: p.detach() for n, p in self.selected.items()}
        in_dims = (None, 0, None if y is None else 0, None if e is None else 0)
        grads, weights = vmap(jacrev(f, has_aux=True), in_dims=in_dims)(sel, x, y, e)
        self._accumulate(sums, grads, weights, reduce)

    def _looped(self, x: Any, y: Any, e: Any, objective: Objective, reduce: str, sums: dict[str, Tensor]) -> None:
        names = list(self.selected)
        params = [self.selected[n] for n in names]
        for i in range(batch_size_of(x)):
            xi = tree_slice(x, slice(i, i + 1))
            yi = None if y is None else tree_slice(y, slice(i, i + 1))
            ei = None if e is None else tree_index(e, i)
            with torch.enable_grad():
                out = call_model(self.model, xi)
                values, weights = objective(out, yi, ei)
                per_k = []
                for j in range(values.shape[0]):
                    g = torch.autograd.grad(values[j], params, retain_graph=j + 1 < values.shape[0], allow_unused=True)
                    per_k.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
            grads = {n: torch.stack([pk[idx] for pk in per_k]).unsqueeze(0) for idx, n in enumerate(names)}
            self._accumulate(sums, grads, weights.detach().unsqueeze(0), reduce)
