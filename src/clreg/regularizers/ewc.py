r"""Elastic Weight Consolidation (Kirkpatrick et al., 2017).

.. math::

    P(\theta) = \frac{\lambda}{2} \sum_t w_t \sum_i F_{t,i} (\theta_i - \theta^*_{t,i})^2

with F_t the diagonal Fisher of task t (:func:`clreg.functional.fisher_diagonal`, a mean over
samples), θ*_t the parameters at its consolidation, w_t ≥ 0 the task weight of its
:class:`~clreg.TaskSpec` and λ ≥ 0 global (it may change between tasks). The tasks are collapsed
into one quadratic (:func:`clreg.functional.ewc_merge_`): O(P) memory and time whatever the number
of tasks, the same gradient and the exact value.

Example:
    >>> import torch, clreg
    >>> model = torch.nn.Linear(4, 3)
    >>> ewc = clreg.EWC(model, lam=1.0)
    >>> data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> ewc.consolidate(model, data)
    >>> ewc(model).item()   # zero at the anchor
    0.0
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .._params import ParamSelector
from ..functional.ewc import ewc_merge_
from ..functional.fisher import ESTIMATORS, default_estimator, fisher_diagonal
from ..spec import TaskSpec
from .base import check_finite, check_range
from .quadratic import QuadraticPenalty

__all__ = ["EWC"]

log = logging.getLogger("clreg")


class FisherOptions:
    """Fisher estimation settings shared by EWC and OnlineEWC."""

    def __init__(
        self,
        estimator: str | None,
        mc_samples: int,
        max_samples: int | None,
        chunk_size: int | None,
        seed: int,
        progress: Any,
    ) -> None:
        if estimator is not None and estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS} or None, got {estimator!r}")
        self.estimator = estimator
        self.mc_samples = mc_samples
        self.max_samples = max_samples
        self.chunk_size = chunk_size
        self.seed = seed
        self.progress = progress

    def fisher(self, owner: str, names: list[str], model: nn.Module, data: Any, spec: TaskSpec, task: int) -> dict:
        if data is None:
            raise ValueError(f"{owner}.consolidate needs the task's data to estimate a Fisher")
        est = self.estimator or default_estimator(spec.per_sample_loss)
        fisher = fisher_diagonal(
            model,
            data,
            spec=spec,
            estimator=est,
            params=names,
            mc_samples=self.mc_samples,
            seed=self.seed + task,
            max_samples=self.max_samples,
            chunk_size=self.chunk_size,
            progress=self.progress,
        )
        what = "empirical Fisher of the per-sample loss" if spec.per_sample_loss is not None else f"{est} Fisher"
        log.info("%s: task %d consolidated with the %s", owner, task, what)
        check_finite("Fisher", fisher)
        return fisher


class EWC(QuadraticPenalty):
    """EWC over any number of past tasks at O(P) cost.

    Args:
        model: the model to protect (DDP / compiled wrappers are looked through).
        lam: λ ≥ 0; ``ewc.lam = ...`` changes it between tasks.
        estimator: the Fisher estimator (``exact``, ``mc``, ``empirical``, ``batched``); default ``mc``,
            or ``empirical`` when the task spec gives a per-sample loss.
        mc_samples, max_samples, chunk_size, seed, progress: see :func:`~clreg.functional.fisher_diagonal`.
        params: parameter names or a predicate ``(name, param) -> bool`` (e.g. to leave out norms).
    """

    hyperparameters = ("lam",)

    def __init__(
        self,
        model: nn.Module,
        lam: float = 1.0,
        *,
        estimator: str | None = None,
        mc_samples: int = 1,
        max_samples: int | None = None,
        chunk_size: int | None = None,
        seed: int = 0,
        params: ParamSelector = None,
        progress: Any = None,
    ) -> None:
        super().__init__(model, params)
        self.lam = lam
        self.fisher_options = FisherOptions(estimator, mc_samples, max_samples, chunk_size, seed, progress)

    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = check_range("lam", value)

    @property
    def scale(self) -> float:
        return self._lam / 2.0

    def consolidate(self, model: nn.Module, data: Any = None, spec: TaskSpec | None = None) -> None:
        """Estimate this task's Fisher on ``data`` and fold it, weighted by ``spec.weight``, in."""
        spec = spec or TaskSpec()
        params = self._resolve(model)
        fisher = self.fisher_options.fisher(type(self).__name__, self._pset.names, model, data, spec, self._n_tasks_py)
        weighted = [fisher[n].mul_(spec.weight) for n in self._pset.names]
        self.offset.copy_(ewc_merge_(self.importance.tensors, self.anchor.tensors, self.offset, weighted, params))
        self._bump_tasks()
        self._state_changed()
