r"""Memory Aware Synapses (Aljundi et al., 2018).

.. math::

    \Omega \leftarrow \Omega + w_t \frac{1}{N}\sum_n \left|\partial_\theta \lVert f(x_n)\rVert_2^2\right|,
    \qquad P(\theta) = \lambda \sum_i \Omega_i (\theta_i - \theta^*_i)^2

(no ½, as in the paper) with one anchor θ*, the parameters at the last consolidation. The importance
needs no labels. ``normalize=True`` averages ‖f‖² over output elements (see
:func:`clreg.functional.mas_importance`).

Example:
    >>> import torch, clreg
    >>> model = torch.nn.Linear(4, 3)
    >>> mas = clreg.MAS(model, lam=1.0)
    >>> mas.consolidate(model, torch.utils.data.TensorDataset(torch.randn(8, 4)))
    >>> mas(model).item()
    0.0
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._params import ParamSelector, check_covered
from .._sharding import local, local_all
from ..functional.mas import mas_importance
from ..spec import TaskSpec
from .base import Hyperparameter, check_finite
from .quadratic import QuadraticPenalty

__all__ = ["MAS"]


class MAS(QuadraticPenalty):
    """MAS: label-free importance from the output norm's gradient."""

    hyperparameters = ("lam", "normalize")

    def __init__(
        self,
        model: nn.Module,
        lam: float = 1.0,
        *,
        normalize: bool = False,
        max_samples: int | None = None,
        chunk_size: int | None = None,
        params: ParamSelector = None,
        progress: Any = None,
    ) -> None:
        super().__init__(model, params)
        self.lam = lam
        self.normalize = normalize
        self.max_samples, self.chunk_size, self.progress = max_samples, chunk_size, progress

    lam = Hyperparameter(doc="λ ≥ 0.")

    @property
    def scale(self) -> float:
        return self._lam

    @property
    def normalize(self) -> bool:
        """Average ‖f‖² over output elements instead of summing (see :func:`~clreg.functional.mas_importance`)."""
        return self._normalize

    @normalize.setter
    def normalize(self, value: bool) -> None:
        self._normalize = bool(value)

    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        """Ω += w·MAS importance on ``data`` (of ``spec.outputs``, or the whole output); θ* ← θ."""
        if data is None:
            raise ValueError("MAS.consolidate needs the task's data")
        spec = spec or TaskSpec()
        params = self._resolve(model)
        omega = mas_importance(
            model,
            data,
            outputs=spec.outputs,
            normalize=self._normalize,
            params=self._pset.names,
            max_samples=self.max_samples,
            chunk_size=self.chunk_size,
            progress=self.progress,
        )
        check_covered("MAS", self._pset.names, omega)
        check_finite("MAS importance", omega)
        with torch.no_grad():
            for big, name in zip(local_all(self.importance.tensors), self._pset.names):
                big.add_(local(omega[name]).to(big.dtype), alpha=spec.weight)
            self.anchor.set([p.detach() for p in params])
        self._bump_tasks()
        self._state_changed()
