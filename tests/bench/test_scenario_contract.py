"""The scenario contract (clreg.bench.testing.check_scenario): every built-in scenario passes it with small
options, a small well-formed toy scenario passes it, and each deliberately broken toy fails the check
that names its fault."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import clreg.bench.scenarios  # noqa: F401  (registers the built-in scenarios)
from clreg.bench.registry import _Builtin
from clreg.bench.scenario import SCENARIOS, Scenario, Stage, Task, make_scenario
from clreg.bench.stats import MeanMetric
from clreg.bench.testing import check_scenario
from clreg.spec import OutputSpec, TaskSpec

# -- every built-in scenario, with small options ------------------------------------------------------

SMALL = {
    "digits": [{"setting": s, "epochs": 1} for s in ("task", "domain", "class")],
    "onehead": [{"profile": "tiny"}],
}
"""Small options of each built-in scenario (a new built-in adds its own here)."""

NEEDS = {"digits": ("sklearn",), "onehead": ("timm", "pycocotools")}
"""The optional modules each built-in scenario imports."""

BUILTIN = sorted(n for n, f in SCENARIOS.items() if isinstance(f, _Builtin))


def test_every_builtin_scenario_has_small_options() -> None:
    assert BUILTIN, "no built-in scenario is registered"
    assert set(BUILTIN) <= set(SMALL), f"give small options for {sorted(set(BUILTIN) - set(SMALL))} in SMALL"


@pytest.mark.parametrize(
    ("name", "options"),
    [(n, o) for n in BUILTIN for o in SMALL.get(n, [])],
    ids=lambda v: "-".join(str(x) for x in v.values()) if isinstance(v, dict) else str(v),
)
def test_builtin_scenario_passes_the_contract(name: str, options: dict, tmp_path, monkeypatch) -> None:
    for module in NEEDS.get(name, ()):
        pytest.importorskip(module)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a scenario that generates data writes it here
    check_scenario(make_scenario(name, **options))


# -- a small toy scenario, and broken variants of it -------------------------------------------------

NAME = "contract-toy"
SIZES = {"train": 16, "val": 8, "test": 6}


class ToyTask(Task):
    """Points in R^4 labelled by the side of a hyperplane (seeded by the task's index)."""

    def __init__(self, name: str, index: int) -> None:
        self.name = name
        g = torch.Generator().manual_seed(index)
        w = torch.randn(4, generator=g)
        self._data = {}
        for split, n in SIZES.items():
            x = torch.randn(n, 4, generator=g)
            self._data[split] = TensorDataset(x, (x @ w > 0).long())

    def data(self, split: str) -> TensorDataset:
        return self._data[split]

    def loss(self, outputs, target):
        return F.cross_entropy(outputs, target)

    def spec(self) -> TaskSpec:
        return TaskSpec(outputs=[OutputSpec()])

    def evaluate(self, model, split):
        x, y = self._data[split].tensors
        return MeanMetric((model(x).argmax(1) == y).float())


class Toy(Scenario):
    name = NAME
    batch_size = 4
    tune_grid: Mapping[str, Sequence[float]] = {
        "ewc.lam": (1.0, 10.0),
        "ewc+lwf:lwf.alpha": (0.5,),
        "lr": (1e-2,),
        "ewc.lam@2": (3.0,),
    }
    defaults: Mapping[str, float] = {"replay.capacity": 4}
    task_class = ToyTask

    def __init__(self, tasks: int = 2) -> None:
        self.options = {"tasks": tasks}
        self._tasks = {n: self.task_class(n, i) for i, n in enumerate("abc"[:tasks])}

    @property
    def tasks(self):
        return self._tasks

    def default_stages(self) -> list[Stage]:
        return [Stage(n, steps=3, lr=1e-2, settings={"ewc.lam": 2.0}) for n in self._tasks]

    def make_model(self, tasks) -> nn.Module:
        return nn.Linear(4, 2)

    def record(self, tasks) -> dict:
        return {**super().record(tasks), "options": dict(self.options)}


@pytest.fixture
def register() -> Iterator:
    """Registers a toy class under its name for one test (make_scenario rebuilds it from its record)."""
    added = []

    def add(cls: type) -> type:
        assert cls.name not in SCENARIOS
        SCENARIOS[cls.name] = cls
        added.append(cls.name)
        return cls

    yield add
    for name in added:
        SCENARIOS.pop(name, None)


def fails(scenario: Scenario, check: str, match: str, **kwargs) -> str:
    with pytest.raises(AssertionError) as info:
        check_scenario(scenario, **kwargs)
    message = str(info.value)
    assert message.startswith(f"clreg.bench.testing: scenario {scenario.name!r} fails check {check!r}: "), message
    assert match in message, message
    return message


def test_toy_passes(register) -> None:
    register(Toy)
    check_scenario(Toy())
    check_scenario(Toy(tasks=3), split="test", steps=1, methods=("joint", "lwf", "ewc+replay"))


def test_bad_arguments(register) -> None:
    register(Toy)
    with pytest.raises(ValueError, match="split"):
        check_scenario(Toy(), split="dev")
    with pytest.raises(ValueError, match="steps"):
        check_scenario(Toy(), steps=0)
    with pytest.raises(ValueError, match="methods"):
        check_scenario(Toy(), methods="naive")


def test_leaves_the_global_generator_alone(register) -> None:
    register(Toy)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    check_scenario(Toy(), steps=1, methods=("naive",))
    assert torch.equal(torch.rand(3), expected)


# scenario and tasks


def test_batch_size_not_an_int(register) -> None:
    cls = register(type("T", (Toy,), {"batch_size": 0}))
    fails(cls(), "scenario", "batch_size is a positive int, got 0")


def test_no_tasks(register) -> None:
    cls = register(type("T", (Toy,), {"tasks": property(lambda self: {})}))
    fails(cls(), "tasks", "tasks is empty")


def test_task_named_other_than_its_key(register) -> None:
    class Renamed(Toy):
        def __init__(self, tasks: int = 2) -> None:
            super().__init__(tasks)
            self._tasks["b"].name = "x"

    register(Renamed)
    fails(Renamed(), "tasks", "the task under key 'b' is named 'x'")


# stages


def test_a_task_left_out_of_the_stages(register) -> None:
    cls = register(type("T", (Toy,), {"default_stages": lambda self: Toy.default_stages(self)[:1]}))
    fails(cls(), "stages", "leaves out task(s) ['b']")


def test_a_task_staged_twice(register) -> None:
    cls = register(type("T", (Toy,), {"default_stages": lambda self: Toy.default_stages(self) * 2}))
    fails(cls(), "stages", "names task(s) ['a', 'b'] more than once")


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ("ewc.lamda", "unknown setting ewc.lamda"),  # a typo the runner would ignore
        ("ewc.normalize", "cannot change between stages"),  # read once, never per stage
        ("lr", "its learning rate is Stage.lr"),  # the stage's lr is Stage.lr
    ],
)
def test_a_stage_setting_no_method_reads(register, setting: str, match: str) -> None:
    def stages(self):
        return [Stage(n, steps=3, lr=1e-2, settings={setting: 1.0}) for n in self._tasks]

    cls = register(type("T", (Toy,), {"default_stages": stages}))
    fails(cls(), "stages", match)


def test_stages_ignoring_the_order(register) -> None:
    cls = register(type("T", (Toy,), {"stages": lambda self, order=None: self.default_stages()}))
    fails(cls(), "stage order", "stages(['b', 'a']) gives the tasks ['a', 'b']")


# data


class TripleTask(ToyTask):
    def data(self, split: str) -> TensorDataset:
        return TensorDataset(*self._data[split].tensors, self._data[split].tensors[1])


class EmptyTestTask(ToyTask):
    def data(self, split: str) -> TensorDataset:
        return TensorDataset(torch.zeros(0, 4), torch.zeros(0).long()) if split == "test" else self._data[split]


def test_items_that_are_not_pairs(register) -> None:
    cls = register(type("T", (Toy,), {"task_class": TripleTask}))
    fails(cls(), "data", "task 'a': data('train') items are (input, target) pairs, got a tuple of 3")


def test_an_empty_split(register) -> None:
    cls = register(type("T", (Toy,), {"task_class": EmptyTestTask}))
    fails(cls(), "data", "task 'a': data('test') is empty")


# the model and the loss


class VectorLossTask(ToyTask):
    def loss(self, outputs, target):
        return F.cross_entropy(outputs, target, reduction="none")


class DetachedLossTask(ToyTask):
    def loss(self, outputs, target):
        return F.cross_entropy(outputs.detach(), target)


class ZeroGradientTask(ToyTask):
    def loss(self, outputs, target):
        return F.cross_entropy(outputs, target).detach() + 0.0 * outputs.sum()


class NaNLossTask(ToyTask):
    def loss(self, outputs, target):
        return F.cross_entropy(outputs, target) * float("nan")


@pytest.mark.parametrize(
    ("task_class", "match"),
    [
        (VectorLossTask, "task 'a': loss is a scalar (the batch's mean), got shape (4,)"),
        (DetachedLossTask, "task 'a': the loss does not depend on the model's parameters"),
        (ZeroGradientTask, "task 'a': the loss's gradient is zero"),
        (NaNLossTask, "task 'a': loss is nan"),
    ],
    ids=["vector", "detached", "zero-gradient", "nan"],
)
def test_a_loss_the_harness_cannot_train_on(register, task_class, match: str) -> None:
    cls = register(type("T", (Toy,), {"task_class": task_class}))
    fails(cls(), "model", match)


def test_a_model_that_is_not_a_module(register) -> None:
    cls = register(type("T", (Toy,), {"make_model": lambda self, tasks: lambda x: x}))
    fails(cls(), "stage order", "make_model(reversed tasks) gives a function")


# spec and metric


class NoSpecTask(ToyTask):
    def spec(self):
        return None


class WrongNTask(ToyTask):
    def evaluate(self, model, split):
        x, y = self._data[split].tensors
        return MeanMetric((model(x[:-1]).argmax(1) == y[:-1]).float())  # one sample dropped


class SumMetric(MeanMetric):
    def scores(self, counts):
        return counts.to(torch.float64) @ self.per_sample  # a sum, not a mean


class SumScoresTask(ToyTask):
    def evaluate(self, model, split):
        x, y = self._data[split].tensors
        return SumMetric((model(x).argmax(1) == y).float() + 1.0)


class FloatTask(ToyTask):
    def evaluate(self, model, split):
        return 0.5


def test_spec_that_is_not_a_taskspec(register) -> None:
    cls = register(type("T", (Toy,), {"task_class": NoSpecTask}))
    fails(cls(), "spec", "task 'a': spec() is a clreg.TaskSpec, got NoneType")


def test_metric_over_the_wrong_number_of_samples(register) -> None:
    cls = register(type("T", (Toy,), {"task_class": WrongNTask}))
    fails(cls(), "metric", "task 'a': evaluate(model, 'val').n is 7, but data('val') holds 8 samples")


def test_metric_whose_resampled_scores_are_not_its_value(register) -> None:
    cls = register(type("T", (Toy,), {"task_class": SumScoresTask}))
    message = fails(cls(), "metric", "scores(all ones) is [")
    assert "not value() = " in message


def test_metric_that_is_a_number(register) -> None:
    cls = register(type("T", (Toy,), {"task_class": FloatTask}))
    fails(cls(), "metric", "is a Metric (n, value, scores, image_ids); a float lacks")


def test_metric_on_the_split_asked_for(register) -> None:
    cls = register(type("T", (Toy,), {"task_class": WrongNTask}))
    fails(cls(), "metric", "evaluate(model, 'test').n is 5, but data('test') holds 6 samples", split="test")


# record, options, settings


def test_record_without_the_options(register) -> None:
    def bare(self, tasks):  # a record that leaves the options out
        return {"scenario": self.name, "tasks": [t.name for t in tasks]}

    cls = register(type("T", (Toy,), {"record": bare}))
    check_scenario(cls(), steps=1, methods=("naive",))  # with the default options it rebuilds: no fault
    fails(cls(tasks=3), "record", "has the tasks ['a', 'b'], not ['a', 'b', 'c'] (are all options recorded?)")


def test_the_default_record_holds_the_options(register) -> None:
    cls = register(type("U", (Toy,), {"record": Scenario.record}))
    assert cls(tasks=3).record(list(cls(tasks=3).tasks.values()))["options"] == {"tasks": 3}
    check_scenario(cls(tasks=3), steps=1, methods=("naive",))


def test_options_that_do_not_rebuild_it(register) -> None:
    class Forgetful(Toy):
        def __init__(self, tasks: int = 2) -> None:
            super().__init__(tasks)
            self._recorded = dict(self.options)
            self.options = {}  # what a worker process rebuilds it with

        def record(self, tasks) -> dict:
            return {**Scenario.record(self, tasks), "options": self._recorded}

    register(Forgetful)
    fails(Forgetful(tasks=3), "record", "make_scenario('contract-toy', **<scenario.options's options>) has the tasks")


def test_record_that_is_not_json(register) -> None:
    def record(self, tasks):
        return {**Toy.record(self, tasks), "weights": torch.zeros(2)}

    cls = register(type("T", (Toy,), {"record": record}))
    fails(cls(), "record", "record(tasks) is not JSON")


def test_scenario_not_registered() -> None:
    fails(Toy(), "record", f"ValueError: unknown scenario {NAME!r}")


@pytest.mark.parametrize(
    ("grid", "match"),
    [
        ({"ewc.lamda": (1.0,)}, "tune_grid['ewc.lamda'] = 1.0 is refused: unknown setting ewc.lamda"),
        ({"foo.bar": (1.0,)}, "tune_grid['foo.bar'] = 1.0 is refused: unknown method part(s) ['foo']"),
        ({"ewc.lam": ("big",)}, "tune_grid['ewc.lam'] = 'big' is refused: ewc.lam is a number"),
        ({"ewc.lam": ()}, "tune_grid['ewc.lam'] is a non-empty sequence of values"),
        ({"lwf:ewc.lam": (1.0,)}, "method 'lwf' has no part 'ewc', so no method reads it"),
        ({"ewc.lam=10": (1.0,)}, "is not of the form '[method:]part.name[@stage]'"),
    ],
)
def test_tune_grid_names_that_are_not_settings(register, grid: dict, match: str) -> None:
    cls = register(type("T", (Toy,), {"tune_grid": grid}))
    fails(cls(), "settings", match)


def test_defaults_and_methods_that_are_not_settings(register) -> None:
    cls = register(type("T", (Toy,), {"defaults": {"replay.size": 4}}))
    fails(cls(), "settings", "defaults['replay.size'] = 4 is refused: unknown setting replay.size")
    SCENARIOS.pop(cls.name)
    cls = register(type("T", (Toy,), {"methods": ("naive", "ewc+foo")}))
    fails(cls(), "settings", "methods holds 'ewc+foo'")


# runs


def test_a_run_that_diverges(register) -> None:
    """The untrained model scores finite values; two steps at a huge learning rate make them infinite."""

    class SquaredTask(ToyTask):
        def evaluate(self, model, split):
            x, _ = self._data[split].tensors
            return MeanMetric(-model(x).square().sum(1))

    def stages(self):
        return [Stage(n, steps=3, lr=1e30) for n in self._tasks]

    cls = register(type("T", (Toy,), {"task_class": SquaredTask, "default_stages": stages}))
    fails(cls(), "run", "naive: the matrix has non-finite entries (stage, task, value): [(0, 0, ")


def test_runs_that_are_not_seeded(register) -> None:
    noise = random.Random()  # not seeded by the run's seed

    class NoisyTask(ToyTask):
        def evaluate(self, model, split):
            x, y = self._data[split].tensors
            return MeanMetric((model(x).argmax(1) == y).float() + noise.random() * 1e-3)

    cls = register(type("T", (Toy,), {"task_class": NoisyTask}))
    fails(cls(), "run", "naive on seed 0 twice gives")
