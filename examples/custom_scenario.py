"""A scenario of your own: three synthetic tasks, registered, checked and run through the harness.

python examples/custom_scenario.py          # a few seconds on a CPU
python examples/custom_scenario.py --smoke  # fewer steps

Task t's points sit around their own centre c_t in R^10 (|c_t| = 6) and are labelled by the side of the
task's own hyperplane through that centre, y = [w_t · (x − c_t) > 0]. One two-way head serves every
task (domain-incremental): the tasks do not contradict one another (joint training fits all three),
but training on one moves the boundaries the others need. The data come from a generator seeded by
the scenario's ``seed`` option: nothing is downloaded and every process builds the same tasks.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from clreg import OutputSpec, TaskSpec
from clreg.bench import Scenario, Stage, Task, make_scenario, register_scenario
from clreg.bench.experiment import run_all
from clreg.bench.stats import MeanMetric
from clreg.bench.summary import summarise
from clreg.bench.testing import check_scenario

SIZES = {"train": 256, "val": 128, "test": 128}


class HalfSpaceTask(Task):
    """Points x = c + z, z ~ N(0, I), labelled 1 on the positive side of the hyperplane {w · z = 0}."""

    chance = 0.5

    def __init__(self, name: str, generator: torch.Generator, dim: int) -> None:
        self.name = name
        w, c = torch.randn(dim, generator=generator), torch.randn(dim, generator=generator)
        c = 6.0 * c / c.norm()
        self._data = {}
        for split, n in SIZES.items():
            z = torch.randn(n, dim, generator=generator)
            self._data[split] = TensorDataset(c + z, (z @ w > 0).long())

    def data(self, split: str) -> TensorDataset:
        if split not in self._data:
            raise ValueError(f"split must be one of {list(self._data)}, got {split!r}")
        return self._data[split]

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, target)  # the batch's mean

    def spec(self) -> TaskSpec:
        return TaskSpec(outputs=[OutputSpec(kind="softmax")])  # the logits, all of them

    def evaluate(self, model: nn.Module, split: str) -> MeanMetric:
        x, y = self.data(split).tensors
        return MeanMetric((model(x).argmax(1) == y).float())  # accuracy, one score per sample


@register_scenario("halfspaces")
class HalfSpaces(Scenario):
    """``tasks`` half-space tasks in R^``dim``, each a stage of ``steps`` Adam steps at ``lr``."""

    name = "halfspaces"
    batch_size = 32
    methods: Sequence[str] = ("naive", "joint", "ewc", "replay", "ewc+replay")
    tune_grid: Mapping[str, Sequence[float]] = {"ewc.lam": (1.0, 10.0, 100.0), "replay.per_step": (8, 16)}
    defaults: Mapping[str, float] = {"replay.capacity": 32, "replay.per_step": 16}

    def __init__(self, tasks: int = 3, dim: int = 10, steps: int = 100, lr: float = 3e-3, seed: int = 0) -> None:
        self.options = {"tasks": tasks, "dim": dim, "steps": steps, "lr": lr, "seed": seed}
        self.dim, self.steps, self.lr = dim, steps, lr
        generator = torch.Generator().manual_seed(seed)
        self._tasks = {f"h{t}": HalfSpaceTask(f"h{t}", generator, dim) for t in range(tasks)}

    @property
    def tasks(self) -> Mapping[str, HalfSpaceTask]:
        return self._tasks

    def default_stages(self) -> list[Stage]:
        return [Stage(name, steps=self.steps, lr=self.lr) for name in self._tasks]

    def make_model(self, tasks: Sequence[Task]) -> nn.Module:
        return nn.Sequential(nn.Linear(self.dim, 32), nn.ReLU(), nn.Linear(32, 2))

    def record(self, tasks: Sequence[Task]) -> dict:
        return {**super().record(tasks), "options": dict(self.options)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="fewer steps per stage")
    args = parser.parse_args()

    scenario = make_scenario("halfspaces", steps=60 if args.smoke else 100)
    check_scenario(scenario)
    print("halfspaces passes the clreg.bench.testing contract")

    chosen = {"ewc": {"ewc.lam": 100.0}}
    methods = ["joint", "naive", "ewc", "replay"]  # joint: every task at once, the ceiling
    settings = {m: {**scenario.defaults, **chosen.get(m, {})} for m in methods}
    results = run_all(scenario, methods, seeds=[0, 1], split="test", settings=settings, progress=None)
    for method, s in summarise(results).items():
        lo, hi = s["acc_interval"]
        print(
            f"{method:<7} ACC {s['acc']:.3f} [{lo:.3f}, {hi:.3f}]  BWT {s['bwt']:+.3f}  "
            f"forgetting {s['forgetting']:.3f}  (seeds {s['seeds']})"
        )


if __name__ == "__main__":
    main()
