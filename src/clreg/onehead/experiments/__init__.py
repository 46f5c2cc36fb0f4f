"""The experiment layer: each experiment takes a :class:`~clreg.onehead.config.BenchmarkConfig`
(or, for ``evaluate``, an :class:`EvaluateRequest`) and never sees the command line.

* :func:`run_benchmark` (:mod:`~clreg.onehead.experiments.run`): every seed, then the report;
* :func:`baselines_only` (:mod:`~clreg.onehead.experiments.baselines`): the single-task baselines;
* :func:`tune` (:mod:`~clreg.onehead.experiments.tune`): the grid search on the validation split;
* :func:`evaluate_checkpoint` (:mod:`~clreg.onehead.experiments.evaluate`): a saved model's scores;
* :func:`run_experiment`: the one entry point for a configuration, by its mode.
"""

from __future__ import annotations

from typing import Any

from ..config import BenchmarkConfig
from .baselines import baselines_only
from .evaluate import EvaluateRequest, evaluate_checkpoint
from .run import run_benchmark
from .tune import tune
from .workspace import Workspace, open_workspace

__all__ = [
    "EvaluateRequest",
    "Workspace",
    "baselines_only",
    "evaluate_checkpoint",
    "open_workspace",
    "run_benchmark",
    "run_experiment",
    "tune",
]

_BY_MODE = {"run": run_benchmark, "baselines": baselines_only, "tune": tune}


def run_experiment(config: BenchmarkConfig) -> dict[str, Any] | None:
    """The experiment ``config.mode`` names, on ``config``."""
    return _BY_MODE[config.mode](config)
