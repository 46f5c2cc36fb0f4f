"""The Split Digits scenario: :mod:`clreg.bench.digits`' five two-digit tasks as a harness scenario.

Tasks are named by their digits (``"01"``, ``"23"``, ``"45"``, ``"67"``, ``"89"``) and run in that
order by default; ``setting`` is ``"task"``, ``"domain"`` or ``"class"`` (van de Ven, Tuytelaars &
Tolias 2022). The model is :class:`~clreg.bench.digits.DigitsMLP` (64-100-100 and the setting's
output); in the task setting the harness calls it without the task and every head's outputs come side
by side, each task reading its own two columns (its loss, its metric and the spec its regularizers
consolidate with: ``OutputSpec(channels=(2t, 2t+1), labels="channels")``). A stage is ``epochs``
passes over the task's training samples in batches of ``batch_size``, Adam at ``lr`` (one learning rate
for every method, as in van de Ven et al.; the tune searches each method's strengths,
:attr:`DigitsScenario.tune_grid`). Replay stores 20 samples of each past task.

Harder variants: ``permuted=True`` gives every task but the first a fixed pixel permutation (Permuted
Digits); ``train_per_digit`` keeps only the first n training samples of each digit.

Example:
    >>> from clreg.bench import make_scenario
    >>> s = make_scenario("digits", setting="task", epochs=2)
    >>> list(s.tasks), [(st.task, st.steps) for st in s.stages()][:2]
    (['01', '23', '45', '67', '89'], [('01', 14), ('23', 14)])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ...spec import OutputSpec, TaskSpec
from ..digits import SETTINGS, DigitsMLP, DigitsTask, correct, permuted, split_digits, targets
from ..scenario import DEFAULT_METHODS, Scenario, Stage
from ..stats import MeanMetric
from ..task import Task, check_split

__all__ = ["DigitsScenario", "SplitDigitsTask"]


class SplitDigitsTask(Task):
    """One two-digit task in one setting (see the module)."""

    def __init__(self, data: DigitsTask, setting: str, permute_seed: int | None, train_per_digit: int | None) -> None:
        self.digits = data
        self.index = data.index
        self.setting = setting
        self.name = f"{data.digits[0]}{data.digits[1]}"
        self.chance = 0.1 if setting == "class" else 0.5
        self._permute_seed = permute_seed
        self._train_per_digit = train_per_digit
        self._cache: dict[str, TensorDataset] = {}

    def _columns(self, outputs: Tensor) -> Tensor:
        if self.setting == "task" and outputs.shape[-1] != 2:
            return outputs[:, 2 * self.index : 2 * self.index + 2]
        return outputs

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        x, y = getattr(self.digits, split)
        if split == "train" and self._train_per_digit is not None:
            keep = torch.cat([torch.nonzero(y == d).flatten()[: self._train_per_digit] for d in self.digits.digits])
            x, y = x[keep.sort().values], y[keep.sort().values]
        if self._permute_seed is not None:
            x = permuted(self.index, x, seed=self._permute_seed)
        return x, y

    def data(self, split: str) -> TensorDataset:
        check_split(split)
        if split not in self._cache:
            x, y = self._split(split)
            self._cache[split] = TensorDataset(x, targets(self.index, y, self.setting))
        return self._cache[split]

    def loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(self._columns(outputs), target)

    def spec(self) -> TaskSpec:
        if self.setting == "task":
            return TaskSpec(outputs=[OutputSpec(channels=(2 * self.index, 2 * self.index + 1), labels="channels")])
        return TaskSpec(outputs=[OutputSpec()])

    def evaluate(self, model: nn.Module, split: str) -> MeanMetric:
        check_split(split)
        x, y = self._split(split)
        return MeanMetric(correct(model(x), y, self.index, self.setting).float())


class DigitsScenario(Scenario):
    """Split Digits in one setting (see the module)."""

    name = "digits"
    tune_grid: Mapping[str, Sequence[float]] = {
        "ewc.lam": (1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7),
        "online_ewc.lam": (1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7),
        "kfac_ewc.lam": (0.01, 0.1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7),  # 1 was the task setting's low edge
        "si.c": (0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5),  # 1e3 was the class setting's top edge
        "mas.lam": (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0),
        "rwalk.lam": (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5),  # 1e3 was the class setting's top edge
        "l2sp.alpha": (1e-3, 1e-2, 0.1, 1.0, 10.0),
        # LwF's lower edge is a limit: as α → 0 LwF is naive fine-tuning
        "lwf.alpha": (0.1, 0.3, 1.0, 3.0, 10.0),
        "replay.per_step": (8.0, 16.0, 32.0, 64.0),  # 32 was the class setting's top edge
        "fd.alpha": (0.01, 0.1, 1.0, 10.0, 100.0),
        "der.alpha": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0),  # 3 was the class setting's top edge
        "derpp.alpha": (0.03, 0.1, 0.3, 1.0, 3.0),
        "derpp.beta": (0.1, 0.5, 1.0, 3.0, 10.0),  # 1, then 3, were the class and domain settings' top edges
    }
    # 20 stored samples per past task (10 per digit, about 9 % of a task's training samples); the
    # methods with one reservoir over the stream (DER, DER++, ER-ACE) keep the same 100 in all
    defaults: Mapping[str, float] = {"replay.capacity": 20, "agem.capacity": 20}
    feature_modules = ("trunk",)

    def __init__(
        self,
        setting: str = "class",
        epochs: int = 20,
        batch_size: int = 32,
        lr: float = 1e-3,
        hidden: Sequence[int] = (100, 100),
        permuted: bool = False,
        train_per_digit: int | None = None,
        split_seed: int = 0,
    ) -> None:
        if setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
        for label, value in (("epochs", epochs), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        if train_per_digit is not None and (not isinstance(train_per_digit, int) or train_per_digit < 1):
            raise ValueError(f"train_per_digit must be a positive int or None, got {train_per_digit!r}")
        self.options: dict[str, Any] = {
            "setting": setting, "epochs": epochs, "batch_size": batch_size, "lr": float(lr),
            "hidden": list(hidden), "permuted": bool(permuted), "train_per_digit": train_per_digit,
            "split_seed": split_seed,
        }  # fmt: skip
        self.setting, self.epochs, self.batch_size, self.lr = setting, epochs, batch_size, float(lr)
        self.hidden = tuple(int(h) for h in hidden)
        seed = split_seed if permuted else None
        self._tasks = {
            t.name: t for t in (SplitDigitsTask(d, setting, seed, train_per_digit) for d in split_digits(split_seed))
        }

    @property
    def methods(self) -> tuple[str, ...]:  # type: ignore[override]
        """Every method, less those that read labels as indices of the whole output (DER++, ER-ACE)
        in the task setting, where each task has its own head."""
        if self.setting != "task":
            return DEFAULT_METHODS
        return tuple(m for m in DEFAULT_METHODS if not {"derpp", "er_ace"} & set(m.split("+")))

    @property
    def tasks(self) -> Mapping[str, SplitDigitsTask]:
        return self._tasks

    def default_stages(self) -> list[Stage]:
        return [
            Stage(name, steps=self.epochs * math.ceil(len(t.data("train")) / self.batch_size), lr=self.lr)
            for name, t in self._tasks.items()
        ]

    def make_model(self, tasks: Sequence[Task]) -> DigitsMLP:
        return DigitsMLP(self.setting, hidden=self.hidden, tasks=len(self._tasks))

    @property
    def tuned_key(self) -> str:
        """``digits-<setting>`` (``-permuted``, ``-n<train_per_digit>``) for the training options the
        shipped tunes used (20 epochs, batches of 32, Adam at 1e-3, 64-100-100, split seed 0); other
        training options name a tune that is not shipped, so a report runs with the parts' defaults
        and says no tune seeds."""
        key = f"digits-{self.setting}"
        if self.options["permuted"]:
            key += "-permuted"
        if self.options["train_per_digit"] is not None:
            key += f"-n{self.options['train_per_digit']}"
        trained = {k: self.options[k] for k in ("epochs", "batch_size", "lr", "hidden", "split_seed")}
        if trained != {"epochs": 20, "batch_size": 32, "lr": 1e-3, "hidden": [100, 100], "split_seed": 0}:
            key += "-untuned"
        return key
