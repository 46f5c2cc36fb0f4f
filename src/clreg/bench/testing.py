r"""``clreg.bench.testing``: the harness's contract, checked once for any scenario.

:func:`check_scenario` runs the same checks on any :class:`~clreg.bench.scenario.Scenario`, built-in or
yours, and raises an ``AssertionError`` naming the check that failed
(``clreg.bench.testing: scenario 'digits' fails check 'metric': …``). The checks, in order:

1. ``scenario``: ``name`` is a non-empty str, ``batch_size`` a positive int, ``options`` a mapping;
2. ``tasks``: ``tasks`` is a non-empty mapping whose keys are str, each equal to its task's ``name``,
   each task with callable ``data``, ``loss``, ``spec`` and ``evaluate``;
3. ``stages``: ``default_stages()`` is a list of valid :class:`~clreg.bench.scenario.Stage` (they
   rebuild through :func:`dataclasses.replace`) naming each task exactly once, each stage's
   ``settings`` naming registered settings that may change per stage (``ewc.lam``, not ``lr``:
   that is the stage's ``lr``); ``stages()`` gives the default stages;
4. ``stage order``: ``stages(order)`` with the default order reversed gives those tasks in that order,
   and ``make_model`` builds a model for them;
5. ``data``: every task's ``data(split)`` for ``"train"``, ``"val"`` and ``"test"`` is a non-empty
   sized Dataset whose items are ``(input, target)`` pairs;
6. ``model``: ``make_model(tasks)`` (the default order) is an ``nn.Module`` with trainable parameters;
   for every task, its loss on the model's outputs for a training batch (drawn as the runner draws
   them, in train mode) is a finite scalar tensor whose gradient reaches at least one parameter
   (finite, and not zero everywhere);
7. ``spec``: every task's ``spec()`` is a :class:`~clreg.TaskSpec`;
8. ``metric``: every task's ``evaluate(model, split)`` (eval mode, no gradient, as the runner scores)
   is a :class:`~clreg.bench.stats.Metric`: ``n`` is the split's size, ``value()`` a finite number,
   ``image_ids()`` has ``n`` entries and ``scores(counts)`` on R resamples has shape (R,) and equals
   ``value()`` when every count is one;
9. ``record``: ``record(tasks)`` is JSON (a run store saves it) with ``"scenario"`` the scenario's
   name and ``"tasks"`` the task names; ``make_scenario(record["scenario"], **record.get("options",
   {}))`` rebuilds a scenario with the same task names, default stages and record, and so does
   ``make_scenario(name, **scenario.options)`` (what worker processes do);
10. ``settings``: every ``tune_grid`` key parses with :meth:`~clreg.bench.settings.SettingKey.parse`
    and is accepted, with each of its values, by :meth:`~clreg.bench.method.Method.parse` for the
    method it names (``ewc.lam`` → ``ewc``, ``ewc+lwf:lwf.alpha`` → ``ewc+lwf``, ``lr`` → ``naive``),
    and so is every ``defaults`` key; every name in ``methods`` is a method or a reference;
11. ``run``: :func:`~clreg.bench.runner.run` of each of ``methods`` (default ``naive``, ``ewc`` and
    ``replay``) through the stages shortened to ``steps`` steps each, on ``split`` with the scenario's
    ``defaults``, gives a T×T matrix of finite values (one row for ``joint``) over the stages' tasks
    and final metrics of the split's sizes, and the first method run again on the same seed gives
    the same matrix.

It checks what the harness relies on, not whether the scenario is a good one: its difficulty, its
metric's meaning and its tuned settings are the scenario's own business.

Example:
    >>> from clreg.bench import make_scenario
    >>> from clreg.bench.testing import check_scenario
    >>> check_scenario(make_scenario("digits", setting="task", epochs=1), steps=1)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..session import eval_mode
from ..spec import TaskSpec
from .method import Method, check_method_name
from .runner import REFERENCES, _batches, run
from .scenario import SPLITS, Scenario, Stage, Task, check_split, make_scenario
from .settings import SettingKey

__all__ = ["check_scenario"]

_RESAMPLES = 3
_DEFAULT_METHODS = ("naive", "ewc", "replay")


def check_scenario(
    scenario: Scenario,
    *,
    split: str = "val",
    steps: int = 2,
    methods: Sequence[str] = _DEFAULT_METHODS,
) -> None:
    """Run the contract (see the module) on ``scenario``; an ``AssertionError`` names a failed check.

    Args:
        scenario: the scenario, built with small options (its data are read and its runs are short).
        split: the split the metrics and the runs are scored on.
        steps: the optimizer steps of each stage in the runs (the stages are shortened to it).
        methods: the methods of the ``run`` check (``joint`` allowed).

    Raises:
        AssertionError: a check fails; the message names the scenario, the check and what is wrong.
        ValueError: ``split`` is not a split, ``steps`` not a positive int or ``methods`` empty.
    """
    check_split(split)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods is a non-empty sequence of method names, got {methods!r}")
    label = getattr(scenario, "name", None) or type(scenario).__name__
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with _check(label, "scenario"):
            _check_attributes(scenario)
        with _check(label, "tasks"):
            tasks = _check_tasks(scenario)
        with _check(label, "stages"):
            stages = _check_stages(scenario, tasks)
        with _check(label, "stage order"):
            _check_order(scenario, stages)
        with _check(label, "data"):
            _check_data(tasks)
        with _check(label, "model"):
            model = _check_model(scenario, stages)
        with _check(label, "spec"):
            _check_spec(tasks)
        with _check(label, "metric"):
            _check_metrics(model, tasks, split)
        with _check(label, "record"):
            _check_record(scenario, stages)
        with _check(label, "settings"):
            _check_settings(scenario)
        with _check(label, "run"):
            _check_runs(scenario, stages, split, steps, methods)


@contextlib.contextmanager
def _check(label: str, name: str) -> Iterator[None]:
    try:
        yield
    except AssertionError as err:
        raise AssertionError(f"clreg.bench.testing: scenario {label!r} fails check {name!r}: {err}") from err
    except Exception as err:
        raise AssertionError(
            f"clreg.bench.testing: scenario {label!r} fails check {name!r}: {type(err).__name__}: {err}"
        ) from err


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# -- the checks --------------------------------------------------------------------------------------


def _check_attributes(scenario: Scenario) -> None:
    assert isinstance(scenario.name, str) and scenario.name, f"name is a non-empty str, got {scenario.name!r}"
    size = scenario.batch_size
    assert isinstance(size, int) and not isinstance(size, bool) and size >= 1, (
        f"batch_size is a positive int, got {size!r}"
    )
    assert isinstance(scenario.options, Mapping), f"options is a mapping, got {type(scenario.options).__name__}"


def _check_tasks(scenario: Scenario) -> dict[str, Task]:
    tasks = scenario.tasks
    assert isinstance(tasks, Mapping), f"tasks is a mapping of name to task, got {type(tasks).__name__}"
    assert len(tasks) > 0, "tasks is empty"
    for key, task in tasks.items():
        assert isinstance(key, str) and key, f"a task's key is a non-empty str, got {key!r}"
        name = getattr(task, "name", None)
        assert name == key, f"the task under key {key!r} is named {name!r} (a task's key is its name)"
        missing = [m for m in ("data", "loss", "spec", "evaluate") if not callable(getattr(task, m, None))]
        assert not missing, f"task {key!r} has no method(s) {missing}"
    return dict(tasks)


def _check_stages(scenario: Scenario, tasks: Mapping[str, Task]) -> list[Stage]:
    stages = scenario.default_stages()
    assert isinstance(stages, list) and stages, f"default_stages() is a non-empty list, got {stages!r}"
    for stage in stages:
        assert isinstance(stage, Stage), f"default_stages() holds Stage objects, got {type(stage).__name__}"
        dataclasses.replace(stage)  # the validation again, on the stage as it is now
        for name, value in stage.settings.items():
            key = SettingKey.parse(name)
            assert key.part, f"stage {stage.task!r}: setting {name!r} is not a part's (a stage's lr is Stage.lr)"
            try:
                Method.parse(key.part, {f"{key}@1": value})
            except ValueError as err:
                raise AssertionError(f"stage {stage.task!r}: setting {name!r} is refused: {err}") from None
    names = [s.task for s in stages]
    repeated = sorted({n for n in names if names.count(n) > 1})
    assert not repeated, f"default_stages() names task(s) {repeated} more than once: {names}"
    unknown = [n for n in names if n not in tasks]
    assert not unknown, f"default_stages() names unknown task(s) {unknown}; tasks: {list(tasks)}"
    left = [n for n in tasks if n not in names]
    assert not left, f"default_stages() leaves out task(s) {left}: {names}"
    again = [s.task for s in scenario.stages()]
    assert again == names, f"stages() gives {again}, default_stages() {names}"
    return stages


def _check_order(scenario: Scenario, stages: Sequence[Stage]) -> None:
    order = [s.task for s in stages][::-1]
    got = scenario.stages(order)
    assert isinstance(got, list) and all(isinstance(s, Stage) for s in got), f"stages(order) gives {got!r}"
    assert [s.task for s in got] == order, f"stages({order}) gives the tasks {[s.task for s in got]}"
    model = scenario.make_model(scenario.task_list(got))
    assert isinstance(model, nn.Module), f"make_model(reversed tasks) gives a {type(model).__name__}"


def _check_data(tasks: Mapping[str, Task]) -> None:
    for name, task in tasks.items():
        for split in SPLITS:
            data = task.data(split)
            size = len(data)  # a TypeError (caught and named) for a Dataset without a size
            assert size > 0, f"task {name!r}: data({split!r}) is empty"
            item = data[0]
            assert isinstance(item, (tuple, list)) and len(item) == 2, (
                f"task {name!r}: data({split!r}) items are (input, target) pairs, got {_describe(item)}"
            )


def _describe(item: Any) -> str:
    if isinstance(item, (tuple, list)):
        return f"a {type(item).__name__} of {len(item)}"
    return f"a {type(item).__name__}"


def _check_model(scenario: Scenario, stages: Sequence[Stage]) -> nn.Module:
    tasks = scenario.task_list(stages)
    model = scenario.make_model(tasks)
    assert isinstance(model, nn.Module), f"make_model(tasks) is an nn.Module, got {type(model).__name__}"
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params, "the model has no trainable parameters"
    model.train()
    for task in tasks:
        x, y = next(_batches(task.data("train"), scenario.batch_size, seed=0))
        model.zero_grad(set_to_none=True)
        loss = task.loss(model(x), y)
        assert isinstance(loss, Tensor), f"task {task.name!r}: loss is a Tensor, got {type(loss).__name__}"
        assert loss.dim() == 0, (
            f"task {task.name!r}: loss is a scalar (the batch's mean), got shape {tuple(loss.shape)}"
        )
        assert loss.is_floating_point() and bool(torch.isfinite(loss)), f"task {task.name!r}: loss is {loss.item()!r}"
        assert loss.requires_grad, f"task {task.name!r}: the loss does not depend on the model's parameters"
        loss.backward()
        grads = [(n, p.grad) for n, p in params if p.grad is not None]
        assert grads, f"task {task.name!r}: the loss's gradient reaches no parameter"
        bad = [n for n, g in grads if not bool(torch.isfinite(g).all())]
        assert not bad, f"task {task.name!r}: the loss's gradient is not finite on {bad}"
        assert any(bool(g.ne(0).any()) for _, g in grads), f"task {task.name!r}: the loss's gradient is zero"
    model.zero_grad(set_to_none=True)
    return model


def _check_spec(tasks: Mapping[str, Task]) -> None:
    for name, task in tasks.items():
        spec = task.spec()
        assert isinstance(spec, TaskSpec), f"task {name!r}: spec() is a clreg.TaskSpec, got {type(spec).__name__}"


def _check_metrics(model: nn.Module, tasks: Mapping[str, Task], split: str) -> None:
    with eval_mode(model), torch.no_grad():
        metrics = {name: task.evaluate(model, split) for name, task in tasks.items()}
    for name, metric in metrics.items():
        what = f"task {name!r}: evaluate(model, {split!r})"
        missing = [a for a in ("n", "value", "scores", "image_ids") if not hasattr(metric, a)]
        assert not missing, (
            f"{what} is a Metric (n, value, scores, image_ids); a {type(metric).__name__} lacks {missing}"
        )
        size = len(tasks[name].data(split))
        assert metric.n == size, f"{what}.n is {metric.n}, but data({split!r}) holds {size} samples"
        value = metric.value()
        assert _finite(value), f"{what}.value() is {value!r}, not a finite number"
        ids = metric.image_ids()
        assert len(ids) == size, f"{what}.image_ids() has {len(ids)} entries for {size} samples"
        counts = torch.ones(_RESAMPLES, size, dtype=torch.float64)
        scores = metric.scores(counts)
        assert isinstance(scores, Tensor) and tuple(scores.shape) == (_RESAMPLES,), (
            f"{what}.scores(counts of shape ({_RESAMPLES}, {size})) has shape "
            f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}, not ({_RESAMPLES},)"
        )
        expected = torch.full((_RESAMPLES,), float(value), dtype=torch.float64)
        assert torch.allclose(scores.to(torch.float64), expected, rtol=1e-6, atol=1e-9), (
            f"{what}.scores(all ones) is {scores.tolist()}, not value() = {value}"
        )


def _plain(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise AssertionError(f"{what} is not JSON (a run store saves it): {err}") from None


def _check_record(scenario: Scenario, stages: Sequence[Stage]) -> None:
    tasks = scenario.task_list(stages)
    names = [t.name for t in tasks]
    record = scenario.record(tasks)
    assert isinstance(record, Mapping), f"record(tasks) is a dict, got {type(record).__name__}"
    plain = _plain(record, "record(tasks)")
    assert record.get("scenario") == scenario.name, (
        f"record(tasks)['scenario'] is {record.get('scenario')!r}, not the scenario's name {scenario.name!r}"
    )
    assert list(record.get("tasks", [])) == names, f"record(tasks)['tasks'] is {record.get('tasks')!r}, not {names}"
    options = record.get("options", {})
    assert isinstance(options, Mapping), f"record(tasks)['options'] is a mapping, got {type(options).__name__}"
    _plain(scenario.options, "options")
    for source, opts in (("the record", options), ("scenario.options", scenario.options)):
        rebuilt = make_scenario(record["scenario"], **opts)
        what = f"make_scenario({record['scenario']!r}, **<{source}'s options>)"
        assert list(rebuilt.tasks) == list(scenario.tasks), (
            f"{what} has the tasks {list(rebuilt.tasks)}, not {list(scenario.tasks)} (are all options recorded?)"
        )
        again = rebuilt.default_stages()
        assert again == scenario.default_stages(), f"{what} has other default stages: {again}"
        other = _plain(rebuilt.record(rebuilt.task_list(stages)), f"{what}'s record")
        assert other == plain, f"{what} records {other}, not {plain} (are all options recorded?)"


def _method_of(key: SettingKey) -> str:
    return key.method if key.method is not None else key.part or "naive"


def _check_settings(scenario: Scenario) -> None:
    for source in ("tune_grid", "defaults"):
        table = getattr(scenario, source)
        assert isinstance(table, Mapping), f"{source} is a mapping, got {type(table).__name__}"
        for name, values in table.items():
            key = SettingKey.parse(name)
            if source == "tune_grid":
                assert isinstance(values, Sequence) and not isinstance(values, str) and values, (
                    f"tune_grid[{name!r}] is a non-empty sequence of values, got {values!r}"
                )
            for value in values if source == "tune_grid" else [values]:
                method = _method_of(key)
                try:
                    parts = check_method_name(method)
                    Method.parse(method, {key: value})
                except (TypeError, ValueError) as err:
                    raise AssertionError(f"{source}[{name!r}] = {value!r} is refused: {err}") from None
                assert not key.part or key.part in parts, (
                    f"{source}[{name!r}]: method {method!r} has no part {key.part!r}, so no method reads it"
                )
    for method in scenario.methods:
        if method not in REFERENCES:
            try:
                check_method_name(method)
            except (TypeError, ValueError) as err:
                raise AssertionError(f"methods holds {method!r}: {err}") from None


def _check_runs(scenario: Scenario, stages: Sequence[Stage], split: str, steps: int, methods: Sequence[str]) -> None:
    short = [dataclasses.replace(s, steps=steps) for s in stages]
    names = [s.task for s in short]
    settings = dict(scenario.defaults)
    sizes = [len(scenario.tasks[n].data(split)) for n in names]
    for method in methods:
        result = run(scenario, method, short, seed=0, split=split, settings=settings)
        rows = 1 if method in REFERENCES else len(names)
        assert result.tasks == names, f"{method}: the run's tasks are {result.tasks}, not {names}"
        shape = [len(row) for row in result.matrix]
        assert shape == [len(names)] * rows, (
            f"{method}: the matrix's rows have {shape} entries, not {rows} × {len(names)}"
        )
        bad = [(k, j, v) for k, row in enumerate(result.matrix) for j, v in enumerate(row) if not _finite(v)]
        assert not bad, f"{method}: the matrix has non-finite entries (stage, task, value): {bad}"
        assert [m.n for m in result.final] == sizes, (
            f"{method}: the last row's metrics hold {[m.n for m in result.final]} samples, not {sizes}"
        )
        if method == methods[0]:
            again = run(scenario, method, short, seed=0, split=split, settings=settings).matrix
            assert again == result.matrix, (
                f"{method} on seed 0 twice gives {result.matrix} and then {again}: the runs are not seeded"
            )
