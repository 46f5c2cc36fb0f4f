r"""Online EWC (Schwarz et al., 2018, "Progress & Compress").

.. math::

    F^* \leftarrow \gamma F^* + w_t F_t, \qquad
    P(\theta) = \frac{\lambda}{2} \sum_i F^*_i (\theta_i - \theta^*_i)^2

with γ ∈ [0, 1] and one anchor θ*, the parameters at the last consolidation. γ = 0 is EWC on the
last task alone.

Example:
    >>> import torch, clreg
    >>> model = torch.nn.Linear(4, 3)
    >>> reg = clreg.OnlineEWC(model, lam=1.0, gamma=0.9)
    >>> reg.consolidate(model, torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))))
    >>> reg(model).item()
    0.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._sharding import local, local_all
from ..spec import TaskSpec
from .base import Hyperparameter
from .ewc import EWC, EWCOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["OnlineEWC"]


class OnlineEWC(EWC):
    """EWC with one running Fisher decayed by γ and one anchor. Arguments as :class:`EWC`, plus γ."""

    hyperparameters = ("lam", "gamma")

    def __init__(self, model: nn.Module, lam: float = 1.0, gamma: float = 1.0, **options: Unpack[EWCOptions]) -> None:
        super().__init__(model, lam, **options)
        self.gamma = gamma

    gamma = Hyperparameter(0.0, 1.0, doc="γ ∈ [0, 1], the decay of the running Fisher.")

    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        """F* ← γ F* + w F_t and θ* ← θ."""
        spec = spec or TaskSpec()
        params = self._resolve(model)
        fisher = self.fisher_options.fisher(type(self).__name__, self._pset.names, model, data, spec, self._n_tasks_py)
        with torch.no_grad():
            for big, name in zip(local_all(self.importance.tensors), self._pset.names):
                big.mul_(self._gamma).add_(local(fisher[name]).to(big.dtype), alpha=spec.weight)
            self.anchor.set([p.detach() for p in params])
        self._bump_tasks()
        self._state_changed()
