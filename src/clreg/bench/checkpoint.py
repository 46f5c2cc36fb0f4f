"""A trained model on disk with what rebuilds it: the scenario's record (its name, options and the
task set in stage order), the method and its effective settings.

:func:`load_model` rebuilds the scenario from the record, builds the model for the recorded tasks (so
a model trained in any task order loads) and loads the weights; :func:`evaluate_model` scores every
recorded task on a split.

Example:
    >>> import tempfile, os
    >>> from clreg.bench import make_scenario, run
    >>> from clreg.bench.checkpoint import evaluate_model
    >>> scenario = make_scenario("digits", setting="class", epochs=1)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
    >>> result = run(scenario, "naive", scenario.stages(["45", "01"]), seed=0, save=path)
    >>> scores = evaluate_model(path, "test")
    >>> list(scores) == ["45", "01"] and list(scores.values()) == result.matrix[-1]
    True
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .scenario import Scenario, Task, make_scenario

__all__ = ["evaluate_model", "load_model", "save_model"]

FORMAT = "clreg.bench.model/1"


def save_model(
    path: str | os.PathLike, scenario: Scenario, tasks: Sequence[Task], model: nn.Module, meta: Mapping[str, Any]
) -> None:
    """Write ``model``'s weights with the scenario's record for ``tasks`` and ``meta`` (method,
    settings, seed), atomically (a temporary file renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "record": scenario.record(tasks), "meta": dict(meta), "model": model.state_dict()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(record, tmp)
    os.replace(tmp, path)


def load_model(path: str | os.PathLike) -> tuple[Scenario, list[Task], nn.Module, dict[str, Any]]:
    """The scenario, the recorded tasks (in stage order), the model with its weights (in eval mode)
    and the saved meta."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} is not a clreg.bench model (expected the format {FORMAT!r})")
    record = saved["record"]
    scenario = make_scenario(record["scenario"], **record.get("options", {}))
    unknown = [t for t in record["tasks"] if t not in scenario.tasks]
    if unknown:
        raise ValueError(f"{path}: scenario {scenario.name!r} has no task(s) {unknown}")
    tasks = [scenario.tasks[name] for name in record["tasks"]]
    model = scenario.make_model(tasks)
    model.load_state_dict(saved["model"])
    return scenario, tasks, model.eval(), dict(saved["meta"])


@torch.no_grad()
def evaluate_model(path: str | os.PathLike, split: str = "test") -> dict[str, float]:
    """Each recorded task's metric on ``split`` for the model saved at ``path``."""
    _, tasks, model, _ = load_model(path)
    return {t.name: t.evaluate(model, split).value() for t in tasks}
