"""The benchmark harness: scenarios, stage lists, typed method settings, runs, seed-aware statistics.

A :class:`~clreg.bench.scenario.Scenario` supplies tasks (data, loss, spec, metric) and a model built
from the task list; :func:`~clreg.bench.runner.run` trains a method (parts of
:mod:`clreg.bench.parts` joined by ``+``) through a list of :class:`~clreg.bench.scenario.Stage` and
scores every task after each; :mod:`clreg.bench.stats` gives the intervals.

Example:
    >>> from clreg.bench import make_scenario, run
    >>> scenario = make_scenario("digits", setting="task", epochs=1)
    >>> result = run(scenario, "lwf", scenario.stages(["23", "01"]), seed=0)
    >>> result.tasks, len(result.matrix)
    (['23', '01'], 2)
"""

from .method import Method
from .parts import PARTS, Part, register_part
from .runner import REFERENCES, RunResult, run, run_baseline
from .scenario import SCENARIOS, Scenario, Stage, Task, make_scenario, register_scenario
from .settings import SettingKey

__all__ = [
    "PARTS",
    "REFERENCES",
    "SCENARIOS",
    "Method",
    "Part",
    "RunResult",
    "Scenario",
    "SettingKey",
    "Stage",
    "Task",
    "make_scenario",
    "register_part",
    "register_scenario",
    "run",
    "run_baseline",
]
