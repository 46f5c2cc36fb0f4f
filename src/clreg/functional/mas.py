r"""Memory Aware Synapses importance (Aljundi et al., 2018).

.. math:: \Omega_i = \frac{1}{N} \sum_n \left| \frac{\partial \lVert f(x_n) \rVert_2^2}{\partial \theta_i} \right|

per sample and without ½, where f is the model's output (or the selected outputs, concatenated).
``normalize=True`` uses the mean over output elements instead of the sum: a 21×160² logit map sums
~500 k terms against 10 for a classifier, so the plain form makes importances incomparable across
output sizes.

A model sharded by FSDP2 takes the curvature engine (the sum over samples of abs(g_n), layer by
layer, reduce-scattered into shards: see :mod:`clreg.functional.curvature.engine`); the result is
then a DTensor per parameter.

Example:
    >>> import torch
    >>> from clreg.functional import mas_importance
    >>> model = torch.nn.Linear(3, 2, bias=False)
    >>> omega = mas_importance(model, torch.utils.data.TensorDataset(torch.ones(4, 3)))
    >>> omega["weight"].shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._params import ParamSelector, unwrap_model
from .._sharding import fsdp_modules
from ..spec import OutputSpec, select_tensor
from ._per_sample import PerSampleEngine, ProgressFn
from .curvature.engine import CurvatureEngine

__all__ = ["mas_importance"]


def mas_importance(
    model: nn.Module,
    data: Any,
    *,
    outputs: OutputSpec | Sequence[OutputSpec] | None = None,
    normalize: bool = False,
    params: ParamSelector = None,
    max_samples: int | None = None,
    chunk_size: int | None = None,
    vectorize: bool = True,
    progress: ProgressFn | None = None,
) -> dict[str, Tensor]:
    """The mean over samples of abs(∂‖f(x)‖²/∂θ), as a dict of parameter name → tensor."""
    if outputs is None:
        outs: tuple[OutputSpec, ...] = (OutputSpec(kind="regression"),)
    elif isinstance(outputs, OutputSpec):
        outs = (outputs,)
    else:
        outs = tuple(outputs)

    def objective(out: Any, target: Any, extra: Any) -> tuple[Tensor, Tensor]:
        total, count = 0.0, 0
        for o in outs:
            f = select_tensor(out, o.select)
            if o.channels is not None:
                f = f.index_select(1, torch.tensor(o.channels, device=f.device))
            total = total + f.float().square().sum()
            count += f.numel()
        v = (total / count if normalize else total).reshape(1)
        return v, torch.ones_like(v)

    inner = unwrap_model(model)
    if fsdp_modules(inner):  # sharded by FSDP2: layer by layer (see clreg.functional.curvature.engine)
        curv = CurvatureEngine(inner, params).run(
            data, objective, reduce="abs", chunk_size=chunk_size, max_samples=max_samples, progress=progress
        )
        return {name: s.div_(curv.n) for name, s in curv.diagonal.items()}
    engine = PerSampleEngine(inner, params, vectorize=vectorize)
    sums, n = engine.run(
        data, objective, reduce="abs", chunk_size=chunk_size, max_samples=max_samples, progress=progress
    )
    return {name: s.div_(n) for name, s in sums.items()}
