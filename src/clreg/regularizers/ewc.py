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
import operator
from dataclasses import dataclass
from typing import Any, TypedDict

from torch import Tensor, nn

from .._params import ParamSelector, check_covered
from .._sharding import local_all, shard_mesh, sum_over_mesh
from ..functional._per_sample import ProgressFn
from ..functional.ewc import ewc_merge_
from ..functional.fisher import ENGINES, ESTIMATORS, fisher_diagonal, resolve_estimator
from ..spec import TaskSpec
from .base import Hyperparameter, check_finite
from .quadratic import QuadraticPenalty

__all__ = ["EWC", "NORMALIZATIONS", "EWCOptions", "FisherOptions", "normalized"]

log = logging.getLogger("clreg")


NORMALIZATIONS = (None, "mean")


@dataclass(frozen=True)
class FisherOptions:
    r"""How EWC and OnlineEWC estimate each task's Fisher (see :func:`~clreg.functional.fisher_diagonal`);
    validated once, at construction. The ``mc`` draws of task t are seeded by ``seed + t``.

    ``normalize="mean"`` divides each task's Fisher by its mean over every selected entry,

    .. math:: \tilde F_t = F_t \Big/ \Bigl(\tfrac{1}{P} \textstyle\sum_i F_{t,i}\Bigr),

    so tasks whose Fisher has different scales (a pixel-averaged softmax against a detection loss's
    empirical Fisher) weigh alike and λ multiplies a Fisher of mean 1 (its useful range moves with it).
    A Fisher that is zero everywhere is kept as it is.
    """

    estimator: str | None = None
    mc_samples: int = 1
    max_samples: int | None = None
    chunk_size: int | None = None
    seed: int = 0
    progress: ProgressFn | None = None
    normalize: str | None = None
    engine: str = "auto"

    def __post_init__(self) -> None:
        if self.estimator is not None and self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS} or None, got {self.estimator!r}")
        if not isinstance(self.mc_samples, int) or self.mc_samples < 1:
            raise ValueError(f"mc_samples must be an int >= 1, got {self.mc_samples!r}")
        for name in ("max_samples", "chunk_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
        try:
            operator.index(self.seed)
        except TypeError as err:
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}") from err
        if self.progress is not None and not callable(self.progress):
            raise TypeError(f"progress must be callable or None, got {type(self.progress).__name__}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")

    def fisher(self, owner: str, names: list[str], model: nn.Module, data: Any, spec: TaskSpec, task: int) -> dict:
        """Task ``task``'s Fisher of ``model`` on ``data`` over the parameters ``names``, checked finite."""
        if data is None:
            raise ValueError(f"{owner}.consolidate needs the task's data to estimate a Fisher")
        est = resolve_estimator(model, data, spec=spec, estimator=self.estimator)
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
            engine=self.engine,
        )
        check_covered(owner, names, fisher)
        what = "empirical Fisher of the per-sample loss" if spec.per_sample_loss is not None else f"{est} Fisher"
        log.info("%s: task %d consolidated with the %s", owner, task, what)
        check_finite("Fisher", fisher)
        return normalized(fisher) if self.normalize == "mean" else fisher


def normalized(fisher: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each entry divided by the mean over all entries (in float64); a zero Fisher unchanged. (Sharded
    entries: the sum over ranks of the shards' sums over the global count.)"""
    values = list(fisher.values())
    total = sum(f.double().sum() for f in local_all(values))
    if isinstance(total, Tensor):
        total = sum_over_mesh(total, shard_mesh(values, list(fisher)))
    count = sum(f.numel() for f in values)
    mean = float(total) / max(count, 1)
    if mean == 0.0:
        return fisher
    return {n: f.div_(mean) for n, f in fisher.items()}


class EWCOptions(TypedDict, total=False):
    """The keywords EWC takes after ``lam`` (its subclasses pass them on as ``**options``)."""

    estimator: str | None
    mc_samples: int
    max_samples: int | None
    chunk_size: int | None
    seed: int
    params: ParamSelector
    progress: ProgressFn | None
    normalize: str | None
    engine: str


class EWC(QuadraticPenalty):
    """EWC over any number of past tasks at O(P) cost.

    Args:
        model: the model to protect (DDP / compiled wrappers are looked through).
        lam: λ ≥ 0; ``ewc.lam = ...`` changes it between tasks.
        estimator: the Fisher estimator (``exact``, ``mc``, ``empirical``, ``batched``); default (None)
            as :func:`~clreg.functional.default_estimator` chooses: ``exact`` for one (B, C) softmax
            output with C ≤ 32, ``mc`` for other softmax outputs, ``empirical`` when the task spec gives
            a per-sample loss; the log names the one used.
        mc_samples, max_samples, chunk_size, seed, progress: see :func:`~clreg.functional.fisher_diagonal`.
        params: parameter names or a predicate ``(name, param) -> bool`` (e.g. to leave out norms).
        normalize: ``"mean"`` puts each task's Fisher on a comparable scale (see :class:`FisherOptions`).
        engine: ``"auto"`` (default), ``"layers"`` or ``"per_sample"``: see :func:`~clreg.functional.fisher_diagonal`.
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
        progress: ProgressFn | None = None,
        normalize: str | None = None,
        engine: str = "auto",
    ) -> None:
        super().__init__(model, params)
        self.lam = lam
        self.fisher_options = FisherOptions(
            estimator, mc_samples, max_samples, chunk_size, seed, progress, normalize, engine
        )

    lam = Hyperparameter(doc="λ ≥ 0; it may change between tasks.")

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
