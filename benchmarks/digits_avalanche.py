r"""Split Digits side by side with Avalanche: naive, EWC, Online EWC, SI, LwF, MAS and replay in both libraries.

    python benchmarks/digits_avalanche.py --out DIR                      # needs avalanche-lib 0.6
    python benchmarks/digits_avalanche.py --out DIR --settings class,domain --isolate ewc-batched-fisher
    python benchmarks/digits_avalanche.py --out DIR --reuse DIR/results.json --isolate si-cap

Both libraries see the same data (:func:`clreg.bench.digits.split_digits` with split seed 0), the same
initial model (``torch.manual_seed(seed)`` then :class:`~clreg.bench.digits.DigitsMLP`), the same
optimizer (Adam, one learning rate, one optimizer for the whole sequence: Avalanche keeps its state
across experiences by default), the same batch size and the same epochs per task. The clreg side is a
plain PyTorch loop with clreg's regularizers; the Avalanche side is its ``Naive`` strategy with the
method's plugin, fed with the same tensors (one experience per task, task label 0), on the CPU. Each
library shuffles its own way (clreg's loop: a generator seeded with the seed; Avalanche: its loader and
the global generator). Both are scored by the same function (:func:`clreg.bench.digits.accuracy`): the
average accuracy over the five tasks after the last one.

Each method's strength is chosen per library on ONE grid of effective strengths, written in clreg's
convention (``GRIDS``) and converted to Avalanche's arguments by :func:`avalanche_kwargs` (the ½, the
T² and the conventions that are constant factors; what depends on the data, such as the batch-squared
Fisher's scale, is not converted: the grid is wide for that reason). The choice maximises the mean
validation score over the tune seeds; the report runs the report seeds at each library's choice and
scores the test split. Two libraries *disagree* on a method when their mean test scores differ by more
than the larger of their two standard deviations over the report seeds (:func:`compare`).

``--isolate NAME`` adds an experiment (``ISOLATIONS``) that swaps one convention on one side, tunes the
variant on the same grid and seeds (or runs it at the strength a library chose), and reports it beside
the two libraries: the swap that moves one library onto the other names the cause of a disagreement.
The strongest swap is the batch order: ``order="avalanche"`` trains clreg's loop on the batches Avalanche
trained on (:func:`avalanche_batches`), which makes the two runs of naive fine-tuning identical bit for
bit. ``--reuse DIR/results.json`` keeps a finished comparison and adds isolations to it. Outputs:
``DIR/results.json`` and ``DIR/results.md`` (and ``DIR/isolate-NAME.md`` per isolation; their numbers
are in results.json too).

The pure parts (the grid, the conversions, the rule, the choice, the tables) import neither Avalanche
nor scikit-learn; the runs need both (``pip install -e ".[benchmark,avalanche]"``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import clreg
from clreg.bench.digits import NUM_TASKS, DigitsMLP, DigitsTask, accuracy, split_digits, targets

METHODS = ("naive", "ewc", "online_ewc", "si", "lwf", "mas", "replay")
"""The methods compared, in the tables' order."""

SETTINGS = ("class", "domain")
"""The settings this comparison runs (task-incremental needs Avalanche's own multi-head module: left out)."""

LIBRARIES = ("clreg", "avalanche")


@dataclass(frozen=True)
class Protocol:
    """What both libraries share. ``gamma``, ``xi``, ``temperature`` and the memory are fixed, not tuned;
    ``mas_alpha`` is Avalanche's own MAS default (its running average of importances; clreg sums)."""

    epochs: int = 20
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    temperature: float = 2.0
    gamma: float = 1.0
    xi: float = 1e-3
    memory_per_task: int = 20
    mas_alpha: float = 0.5


GRIDS: dict[str, tuple[str, tuple[float, ...]]] = {
    "ewc": ("lam", (10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9)),
    "online_ewc": ("lam", (10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9)),
    "si": ("c", (0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4)),
    "lwf": ("alpha", (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)),
    "mas": ("lam", (1e-3, 0.01, 0.1, 1.0, 10.0, 100.0, 1e3)),
}
"""Per tuned method: clreg's name for its strength and the grid of effective strengths, in clreg's
convention. Naive and replay have no strength (replay's memory is fixed: ``Protocol.memory_per_task``)."""


# -- conventions ----------------------------------------------------------------------------------------


def avalanche_kwargs(method: str, strength: float | None, proto: Protocol) -> dict[str, Any]:
    r"""The Avalanche plugin's arguments that give clreg's ``strength`` for ``method``.

    * EWC: Avalanche adds :math:`\lambda_A \sum F_A (\theta-\theta^*)^2` (no ½), clreg
      :math:`\frac{\lambda}{2}\sum F(\theta-\theta^*)^2`: ``ewc_lambda = λ / 2`` (up to the Fisher's own
      scale, :math:`F_A/F`, which the grid does not convert).
    * Online EWC: the same, ``mode="online"``, ``decay_factor = γ``.
    * SI: Avalanche's penalty is :math:`\frac{\lambda_A}{2}\sum\Omega(\theta-\theta^*)^2`, clreg's
      :math:`c\sum\Omega(\theta-\theta^*)^2`: ``si_lambda = 2c``, ``eps = ξ``.
    * LwF: Avalanche adds :math:`\alpha_A\,\mathrm{KL}` at temperature T (no T²), clreg
      :math:`\alpha T^2\,\mathrm{KL}`: ``alpha = α T²``.
    * MAS: both :math:`\lambda\sum\Omega(\theta-\theta^*)^2`: ``lambda_reg = λ`` (Avalanche's Ω is a
      running average, ``alpha = Protocol.mas_alpha``; clreg's a sum: not converted).
    * replay: ``mem_size`` = tasks × ``memory_per_task``, split into fixed per-task groups.
    """
    if method in GRIDS:
        if strength is None or not strength >= 0:
            raise ValueError(f"{method} needs a strength >= 0, got {strength!r}")
    elif strength is not None:
        raise ValueError(f"{method} has no strength, got {strength!r}")
    if method == "naive":
        return {}
    if method == "ewc":
        return {"ewc_lambda": strength / 2}
    if method == "online_ewc":
        return {"ewc_lambda": strength / 2, "mode": "online", "decay_factor": proto.gamma}
    if method == "si":
        return {"si_lambda": 2 * strength, "eps": proto.xi}
    if method == "lwf":
        return {"alpha": strength * proto.temperature**2, "temperature": proto.temperature}
    if method == "mas":
        return {"lambda_reg": strength, "alpha": proto.mas_alpha}
    if method == "replay":
        return {"mem_size": NUM_TASKS * proto.memory_per_task}
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


AVALANCHE_STRENGTH = {
    "ewc": "ewc_lambda",
    "online_ewc": "ewc_lambda",
    "si": "si_lambda",
    "lwf": "alpha",
    "mas": "lambda_reg",
}
"""Each tuned method's strength among the Avalanche plugin's arguments."""


def avalanche_strength(method: str, strength: float, proto: Protocol) -> float:
    """clreg's ``strength`` in Avalanche's convention (its plugin's strength argument)."""
    return avalanche_kwargs(method, strength, proto)[AVALANCHE_STRENGTH[method]]


def clreg_strength(method: str, strength_av: float, proto: Protocol) -> float:
    """The inverse of :func:`avalanche_strength`: an Avalanche strength in clreg's convention."""
    if method in ("ewc", "online_ewc"):
        return 2 * strength_av
    if method == "si":
        return strength_av / 2
    if method == "lwf":
        return strength_av / proto.temperature**2
    if method == "mas":
        return strength_av
    raise ValueError(f"{method!r} has no strength; tuned methods: {tuple(GRIDS)}")


# -- statistics -----------------------------------------------------------------------------------------


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n − 1; 0 for one value)."""
    if not values:
        raise ValueError("no values")
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd


def compare(clreg_scores: Sequence[float], avalanche_scores: Sequence[float]) -> dict[str, float | bool]:
    """The rule: the libraries disagree when their means differ by more than the larger of the two
    standard deviations over seeds (the seeds' spread). Returns the means, the sds, the difference
    (clreg − Avalanche), the spread, the flag, and the standard error of the difference (Welch's,
    for reading how far apart a flagged pair is)."""
    mc, sc = mean_sd(clreg_scores)
    ma, sa = mean_sd(avalanche_scores)
    diff, spread = mc - ma, max(sc, sa)
    se = math.sqrt(sc**2 / len(clreg_scores) + sa**2 / len(avalanche_scores))
    return {
        "clreg_mean": mc,
        "clreg_sd": sc,
        "avalanche_mean": ma,
        "avalanche_sd": sa,
        "diff": diff,
        "spread": spread,
        "se": se,
        "disagree": abs(diff) > spread,
    }


def choose(scores: dict[float, Sequence[float]]) -> tuple[float, bool]:
    """The strength with the best mean validation score (ties: the smallest strength) and whether it is
    at an end of the grid (then the grid may not hold the optimum)."""
    if not scores:
        raise ValueError("no scores to choose from")
    grid = sorted(scores)
    best = max(grid, key=lambda s: (statistics.fmean(scores[s]), -s))
    return best, best in (grid[0], grid[-1])


# -- the runs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One side of the comparison: a library, and options that swap one convention (isolations)."""

    name: str
    library: str
    options: tuple[tuple[str, Any], ...] = ()
    note: str = ""

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)


CLREG = Variant("clreg", "clreg", note="clreg's defaults")
AVALANCHE = Variant("avalanche", "avalanche", note="Avalanche's plugins, their defaults")


def make_optimizer(model: nn.Module, proto: Protocol) -> torch.optim.Optimizer:
    """One optimizer for the whole sequence (Avalanche keeps its state across experiences by default)."""
    if proto.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=proto.lr)
    return torch.optim.SGD(model.parameters(), lr=proto.lr)


def task_data(task: DigitsTask, setting: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = task.train
    return x, targets(task.index, y, setting)


def scores(model: nn.Module, tasks: Sequence[DigitsTask], split: str, setting: str) -> list[float]:
    """Each task's accuracy on ``split`` ("val" or "test") after the last task."""
    return [accuracy(model, *getattr(t, split), task_index=t.index, setting=setting) for t in tasks]


def build_clreg(method: str, model: nn.Module, strength: float | None, proto: Protocol, opts: dict) -> nn.Module | None:
    if method == "ewc":
        return clreg.EWC(model, lam=strength, estimator=opts.get("estimator"))
    if method == "online_ewc":
        return clreg.OnlineEWC(model, lam=strength, gamma=proto.gamma, estimator=opts.get("estimator"))
    if method == "si":
        return clreg.SI(
            model,
            c=strength,
            xi=proto.xi,
            clamp=opts.get("clamp", "cumulative"),
            path_gradient=opts.get("path_gradient", "task"),
        )
    if method == "lwf":
        return clreg.LwF(model, temperature=proto.temperature, alpha=strength, t_squared=opts.get("t_squared", True))
    if method == "mas":
        return clreg.MAS(model, lam=strength)
    return None


def _consolidation_data(x: torch.Tensor, y: torch.Tensor, proto: Protocol, opts: dict) -> Any:
    data = TensorDataset(x, y)
    if opts.get("estimator") == "batched":  # Avalanche's batches: the task's data in order, the training batch size
        return DataLoader(data, batch_size=proto.batch_size, shuffle=False)
    return data


def _shuffled(x: torch.Tensor, y: torch.Tensor, order: torch.Generator, proto: Protocol) -> Iterator[tuple]:
    """A task's batches: each epoch a new permutation from ``order``, cut into batches."""
    for _ in range(proto.epochs):
        for idx in torch.randperm(len(x), generator=order).split(proto.batch_size):
            yield x[idx], y[idx]


_ORDERS: dict[tuple, list[list[tuple[torch.Tensor, torch.Tensor]]]] = {}


def avalanche_batches(
    method: str, strength: float | None, setting: str, seed: int, tasks: Sequence[DigitsTask], proto: Protocol
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The batches Avalanche trains on, per task, in its order, recorded from its own run of the method at
    the strength and seed: its loader shuffles with the global generator, and every DataLoader pass of a
    plugin (EWC's and MAS's importance passes) draws from that generator too, so the order depends on the
    method. ``order="avalanche"`` trains clreg on them (replay's memory draws are not recorded)."""
    key = (method, strength, setting, seed, id(tasks), proto)
    if key not in _ORDERS:
        from avalanche.training.plugins import SupervisedPlugin

        batches: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in tasks]

        class Record(SupervisedPlugin):
            def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
                batches[strategy.clock.train_exp_counter].append((strategy.mb_x.clone(), strategy.mb_y.clone()))

        train_avalanche(method, strength, setting, seed, tasks, proto, {"record": Record()})
        _ORDERS[key] = batches
    return _ORDERS[key]


def _spec(t: int, opts: dict) -> clreg.TaskSpec:
    """Task t's spec. With ``mas_average`` = a, Avalanche's running average Ω_A,t = a Ω_A,t−1 + (1 − a) I_t
    (Ω_A,0 = I_0) as clreg's sum Σ_j w_j I_j with w_0 = 1, w_j = (1 − a) / a^j, times a^t (in λ)."""
    if "mas_average" not in opts or t == 0:
        return clreg.TaskSpec()
    a = opts["mas_average"]
    return clreg.TaskSpec(weight=(1 - a) / a**t)


def _importance(reg: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in reg.state_dict().items() if k.startswith("importance.")}


def _cap_importance(reg: nn.Module, raw: dict[str, torch.Tensor], before: dict[str, torch.Tensor], cap: float) -> None:
    """Avalanche's SI importance on clreg's SI (``clamp=None``): ``raw`` keeps the uncapped running sum
    Σ_t ω_t/(Δ_t² + ξ) (the last consolidation's term is its importance minus ``before``) and the
    regularizer gets min(raw, cap), through its state dict."""
    state = reg.state_dict()
    for key, b in before.items():
        raw[key] = raw.get(key, torch.zeros_like(b)) + (state[key] - b)
        state[key] = raw[key].clamp(max=cap)
    reg.load_state_dict(state)


def train_clreg(
    method: str,
    strength: float | None,
    setting: str,
    seed: int,
    tasks: Sequence[DigitsTask],
    proto: Protocol,
    opts: dict | None = None,
) -> nn.Module:
    """A plain PyTorch loop with clreg's regularizer, as a user writes it."""
    opts = opts or {}
    torch.manual_seed(seed)
    model = DigitsMLP(setting)
    opt = make_optimizer(model, proto)
    reg = build_clreg(method, model, strength, proto, opts)
    attached = bool(opts.get("attach"))  # the closed-form gradient added to .grad (an Ω < 0 has no √Ω)
    if attached:
        reg.attach(opt)
    elif isinstance(reg, clreg.SI):
        reg.track(opt)
    memory = clreg.ReplayBuffer(proto.memory_per_task, seed=seed) if method == "replay" else None
    order = torch.Generator().manual_seed(seed)
    recorded = None
    if opts.get("order") == "avalanche":
        recorded = avalanche_batches(method, strength, setting, seed, tasks, proto)
    raw: dict[str, torch.Tensor] = {}
    for task in tasks:
        x, y = task_data(task, setting)
        for xb, yb in recorded[task.index] if recorded is not None else _shuffled(x, y, order, proto):
            if memory is not None and memory.tasks:  # one mixed batch: new and replayed, the mean loss;
                # at most the memory's size, as Avalanche's memory loader gives (no sample twice in a draw)
                mx, my, _ = memory.sample_batch(min(proto.batch_size, len(memory)))
                xb, yb = torch.cat([xb, mx]), torch.cat([yb, my])
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            if reg is not None and not attached:
                loss = loss + reg(model, inputs=xb, outputs=out)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if reg is not None:
            before = _importance(reg) if "si_cap" in opts else {}
            reg.consolidate(model, _consolidation_data(x, y, proto, opts), _spec(task.index, opts))
            if "mas_average" in opts:  # Ω_A,t = a^t Σ_j w_j I_j: the a^t goes into λ
                reg.lam = strength * opts["mas_average"] ** task.index
            if "si_cap" in opts:
                _cap_importance(reg, raw, before, opts["si_cap"])
        if memory is not None:
            memory.add(task.index, TensorDataset(x, y))
    return model


_AV_CACHE: dict[str, Any] = {}


def _avalanche_stream(tasks: Sequence[DigitsTask], setting: str) -> Any:
    """One Avalanche experience per task, built from the same tensors (task label 0 everywhere)."""
    key = f"{setting}-{id(tasks)}"
    if key not in _AV_CACHE:
        from avalanche.benchmarks.scenarios.deprecated.generators import tensors_benchmark

        train = [list(task_data(t, setting)) for t in tasks]
        _AV_CACHE[key] = tensors_benchmark(train_tensors=train, test_tensors=train, task_labels=[0] * len(tasks))
    return _AV_CACHE[key].train_stream


def _avalanche_plugin(method: str, strength: float | None, proto: Protocol, opts: dict) -> Any:
    from avalanche.training import plugins as P
    from avalanche.training.storage_policy import ExperienceBalancedBuffer

    kw = avalanche_kwargs(method, strength, proto)
    if method in ("ewc", "online_ewc"):
        return P.EWCPlugin(**kw)
    if method == "si":
        plugin = P.SynapticIntelligencePlugin(si_lambda=kw["si_lambda"], eps=kw["eps"])
        if "si_cap" in opts:  # the cap Avalanche applies at each experience's end (its own value: 0.001)
            _recap_si(plugin, opts["si_cap"], opts.get("si_floor"))
        return plugin
    if method == "lwf":
        return P.LwFPlugin(alpha=kw["alpha"], temperature=kw["temperature"])
    if method == "mas":
        plugin = P.MASPlugin(lambda_reg=kw["lambda_reg"], alpha=kw["alpha"])
        if opts.get("mas_per_sample"):
            _per_sample_importance(plugin)
        return plugin
    if method == "replay":
        fixed = not opts.get("adaptive", False)
        policy = ExperienceBalancedBuffer(
            max_size=kw["mem_size"], adaptive_size=not fixed, num_experiences=NUM_TASKS if fixed else None
        )
        return P.ReplayPlugin(mem_size=kw["mem_size"], storage_policy=policy)
    return None


def _per_sample_importance(plugin: Any) -> None:
    """The MAS plugin's importance pass run on batches of one sample: the mean over samples of
    |∂‖f(x)‖²/∂θ| (clreg's importance) instead of the mean over batches of |∂ mean_b ‖f(x)‖²/∂θ|."""
    importance = plugin._get_importance

    def per_sample(strategy: Any) -> dict:
        size = strategy.train_mb_size
        strategy.train_mb_size = 1
        try:
            return importance(strategy)
        finally:
            strategy.train_mb_size = size

    plugin._get_importance = per_sample


def _recap_si(plugin: Any, cap: float, floor: float | None) -> None:
    """Replace the plugin's end-of-experience update by the same update with another cap (and a floor)."""
    cls = type(plugin)

    def after_training_exp(strategy: Any, **kwargs: Any) -> None:
        cls.update_ewc_data(
            strategy.model, plugin.ewc_data, plugin.syn_data, cap, plugin.excluded_parameters, 1, eps=plugin.eps
        )
        if floor is not None:
            for imp in plugin.ewc_data[1].values():
                imp.data = imp.data.clamp(min=floor)

    plugin.after_training_exp = after_training_exp


@contextlib.contextmanager
def copied_si_snapshots(enabled: bool) -> Iterator[None]:
    """While active, Avalanche's SI keeps copies of the weights and gradients it snapshots.

    avalanche-lib 0.6.0's ``SynapticIntelligencePlugin`` snapshots them as ``p.detach().cpu().flatten()``:
    on a CPU device that is a view of the live parameter, not a copy, so the snapshot before a step and
    the one after it are the same memory, the path integral stays 0 and so does every importance
    (``tests/bench/test_digits_avalanche.py`` shows it). This wraps the plugin's two snapshot functions so
    each stored snapshot is cloned; nothing else changes (on a CUDA device ``.cpu()`` already copies)."""
    if not enabled:
        yield
        return
    from avalanche.training.plugins import SynapticIntelligencePlugin as SIPlugin

    saved = {name: SIPlugin.__dict__[name] for name in ("extract_weights", "extract_grad")}

    def copying(extract: Callable[..., None]) -> staticmethod:
        def wrapped(model: nn.Module, target: dict, excluded_parameters: Any) -> None:
            extract(model, target, excluded_parameters)
            for entry in target.values():
                entry.data = entry.data.clone()

        return staticmethod(wrapped)

    try:
        for name, method in saved.items():
            setattr(SIPlugin, name, copying(method.__func__))
        yield
    finally:
        for name, method in saved.items():
            setattr(SIPlugin, name, method)


def train_avalanche(
    method: str,
    strength: float | None,
    setting: str,
    seed: int,
    tasks: Sequence[DigitsTask],
    proto: Protocol,
    opts: dict | None = None,
) -> nn.Module:
    """Avalanche's ``Naive`` strategy with the method's plugin on the same tensors, model and optimizer."""
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import Naive

    opts = opts or {}
    stream = _avalanche_stream(tasks, setting)
    torch.manual_seed(seed)
    model = DigitsMLP(setting)
    opt = make_optimizer(model, proto)
    plugin = _avalanche_plugin(method, strength, proto, opts)
    with warnings.catch_warnings(), copied_si_snapshots(bool(opts.get("si_copy"))):
        warnings.simplefilter("ignore")
        strategy = Naive(
            model=model,
            optimizer=opt,
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=proto.batch_size,
            train_epochs=proto.epochs,
            device="cpu",
            evaluator=EvaluationPlugin(loggers=[]),
            plugins=[p for p in (plugin, opts.get("record")) if p is not None] or None,
        )
        for experience in stream:
            strategy.train(experience)
    return model


TRAINERS: dict[str, Callable[..., nn.Module]] = {"clreg": train_clreg, "avalanche": train_avalanche}


def run(
    variant: Variant,
    method: str,
    strength: float | None,
    setting: str,
    seed: int,
    tasks: Sequence[DigitsTask],
    proto: Protocol,
    split: str,
) -> list[float]:
    """Each task's accuracy after the last task; a run that diverges (a non-finite parameter at the end,
    or clreg refusing a non-finite Fisher or importance) scores 0 on every task."""
    try:
        model = TRAINERS[variant.library](method, strength, setting, seed, tasks, proto, variant.opts)
    except ValueError as err:
        if "NaN" not in str(err) and "inf" not in str(err):
            raise
        return [0.0] * len(tasks)
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return [0.0] * len(tasks)
    return scores(model, tasks, split, setting)


def evaluate(
    variant: Variant,
    method: str,
    setting: str,
    tasks: Sequence[DigitsTask],
    proto: Protocol,
    tune_seeds: Sequence[int],
    seeds: Sequence[int],
    log: Callable[[str], None],
    fixed: float | None = None,
) -> dict[str, Any]:
    """Tune on the tune seeds (validation), then run the report seeds at the choice (test); with
    ``fixed`` (a strength in clreg's convention), no tuning: the report seeds at that strength."""
    out: dict[str, Any] = {"variant": variant.name, "library": variant.library, "note": variant.note}
    choice = None
    if method in GRIDS and fixed is not None:
        choice = fixed
        own = avalanche_strength(method, choice, proto) if variant.library == "avalanche" else choice
        out |= {"choice": choice, "fixed": True, "edge": False}
        out["choice_own"] = {(AVALANCHE_STRENGTH[method] if variant.library == "avalanche" else GRIDS[method][0]): own}
    elif method in GRIDS:
        tune = {
            s: [statistics.fmean(run(variant, method, s, setting, ts, tasks, proto, "val")) for ts in tune_seeds]
            for s in GRIDS[method][1]
        }
        choice, edge = choose(tune)
        out |= {"tune": {repr(s): statistics.fmean(v) for s, v in tune.items()}, "choice": choice, "edge": edge}
        own = avalanche_strength(method, choice, proto) if variant.library == "avalanche" else choice
        out["choice_own"] = {(AVALANCHE_STRENGTH[method] if variant.library == "avalanche" else GRIDS[method][0]): own}
    per_task = [run(variant, method, choice, setting, s, tasks, proto, "test") for s in seeds]
    out["per_task"] = per_task
    out["test"] = [statistics.fmean(p) for p in per_task]
    out["mean"], out["sd"] = mean_sd(out["test"])
    log(f"{setting:6s} {method:10s} {variant.name:26s} choice={choice!s:8s} test {out['mean']:.3f} ± {out['sd']:.3f}")
    return out


# -- isolations -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Isolation:
    """Variants of one method that swap one convention; each is tuned and reported as the libraries are.
    ``measure``: a name in ``MEASURES``, a measurement reported beside them."""

    method: str
    variants: tuple[Variant, ...]
    question: str
    measure: str | None = None


def fisher_ratio(setting: str, seeds: Sequence[int], tasks: Sequence[DigitsTask], proto: Protocol) -> dict[str, Any]:
    """The batch-squared Fisher against clreg's default, on this benchmark: along a naive run (clreg's
    loop, no regularizer), after each task, Σ_i F_A,i / Σ_i F_i over every parameter, F_A the mean over
    the task's batches (in order, the training batch size) of the squared gradient of the batch-mean
    loss (Avalanche's importance; clreg's ``batched``) and F clreg's default (``mc``) Fisher, both on the
    task's training data. Per seed, per task; and the geometric mean over all."""
    from clreg.functional import fisher_diagonal

    per_seed = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = DigitsMLP(setting)
        opt = make_optimizer(model, proto)
        order = torch.Generator().manual_seed(seed)
        ratios = []
        for task in tasks:
            x, y = task_data(task, setting)
            for _ in range(proto.epochs):
                for idx in torch.randperm(len(x), generator=order).split(proto.batch_size):
                    opt.zero_grad()
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
            data = TensorDataset(x, y)
            batched = fisher_diagonal(model, DataLoader(data, batch_size=proto.batch_size), estimator="batched")
            default = fisher_diagonal(model, data)
            ratios.append(float(sum(v.sum() for v in batched.values()) / sum(v.sum() for v in default.values())))
        per_seed.append(ratios)
    flat = [r for rs in per_seed for r in rs]
    return {
        "per_seed_per_task": per_seed,
        "geometric_mean": math.exp(statistics.fmean(math.log(r) for r in flat)),
        "min": min(flat),
        "max": max(flat),
    }


def si_importance_range(
    setting: str, seeds: Sequence[int], tasks: Sequence[DigitsTask], proto: Protocol
) -> dict[str, Any]:
    """Where SI's importance lies against Avalanche's cap: along a run with clreg's SI at c = 0 (the path
    integral and Ω measured, no penalty: a naive run), Ω = Σ_t ω_t/(Δ_t² + ξ) unclamped with the total
    gradient (Avalanche's rule before its cap), after each task: the share of entries above 0.001 (which
    Avalanche's cap lowers to 0.001) and below 0 (which clreg's default clamp raises to 0)."""
    above, below = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        model = DigitsMLP(setting)
        opt = make_optimizer(model, proto)
        si = clreg.SI(model, c=0.0, xi=proto.xi, clamp=None, path_gradient="total").track(opt)
        order = torch.Generator().manual_seed(seed)
        for task in tasks:
            x, y = task_data(task, setting)
            for xb, yb in _shuffled(x, y, order, proto):
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            si.consolidate(model)
            omega = torch.cat([v.flatten() for v in _importance(si).values()])
            above.append(float((omega > 1e-3).float().mean()))
            below.append(float((omega < 0).float().mean()))
    return {
        "share_above_cap": above,
        "share_below_zero": below,
        "mean_above_cap": statistics.fmean(above),
        "mean_below_zero": statistics.fmean(below),
    }


MEASURES: dict[str, Callable[..., dict[str, Any]]] = {
    "fisher_ratio": fisher_ratio,
    "si_importance_range": si_importance_range,
}


ORDER = ("order", "avalanche")
"""The option that trains clreg's loop on the batches Avalanche trained on, in its order."""

ISOLATIONS: dict[str, Isolation] = {
    "naive-order": Isolation(
        "naive",
        (Variant("clreg-avalanche-order", "clreg", (ORDER,), "clreg's loop on Avalanche's batches, in its order"),),
        "Both naive runs share data, model, optimizer and epochs; only the batch order differs. Does it explain the gap?",
    ),
    "ewc-batched-fisher": Isolation(
        "ewc",
        (
            Variant(
                "clreg-empirical-fisher",
                "clreg",
                (("estimator", "empirical"),),
                "clreg's EWC with the per-sample Fisher of the true labels (not sampled ones)",
            ),
            Variant(
                "clreg-batched-fisher",
                "clreg",
                (("estimator", "batched"),),
                "clreg's EWC with Avalanche's importance: the batch-squared Fisher at batch 32",
            ),
            Variant(
                "clreg-batched-fisher-avalanche-order",
                "clreg",
                (("estimator", "batched"), ORDER),
                "the same, on Avalanche's batches in its order",
            ),
        ),
        "Does Avalanche's batch-squared importance (against clreg's per-sample Fisher) explain EWC's gap? "
        "The empirical variant separates the true labels from the batch-squaring.",
        "fisher_ratio",
    ),
    "online-ewc-batched-fisher": Isolation(
        "online_ewc",
        (
            Variant(
                "clreg-empirical-fisher",
                "clreg",
                (("estimator", "empirical"),),
                "clreg's Online EWC with the per-sample Fisher of the true labels",
            ),
            Variant(
                "clreg-batched-fisher",
                "clreg",
                (("estimator", "batched"),),
                "clreg's Online EWC with the batch-squared Fisher at batch 32",
            ),
            Variant(
                "clreg-batched-fisher-avalanche-order",
                "clreg",
                (("estimator", "batched"), ORDER),
                "the same, on Avalanche's batches in its order",
            ),
        ),
        "Does the batch-squared importance explain Online EWC's gap?",
        "fisher_ratio",
    ),
    "ewc-fixed-lambda": Isolation(
        "ewc",
        (
            Variant(
                "clreg-batched-fisher-at-avalanche-lambda",
                "clreg",
                (("estimator", "batched"), ("at", "avalanche")),
                "clreg's EWC with the batch-squared Fisher, in clreg's batch order, at Avalanche's chosen λ (not tuned)",
            ),
        ),
        "With Avalanche's importance and Avalanche's λ, does clreg's own batch order (another draw of the "
        "same randomness) land on Avalanche's score? Separates the tuned choice from the batch order.",
    ),
    "online-ewc-fixed-lambda": Isolation(
        "online_ewc",
        (
            Variant(
                "clreg-batched-fisher-at-avalanche-lambda",
                "clreg",
                (("estimator", "batched"), ("at", "avalanche")),
                "clreg's Online EWC with the batch-squared Fisher, in clreg's batch order, at Avalanche's λ (not tuned)",
            ),
        ),
        "The same for Online EWC.",
    ),
    "si-snapshots": Isolation(
        "si",
        (
            Variant(
                "avalanche-copied",
                "avalanche",
                (("si_copy", True),),
                "Avalanche's SI with its weight and gradient snapshots copied (on a CPU they are views)",
            ),
        ),
        "Is Avalanche's SI active on a CPU? Its snapshots are views of the live parameters there.",
    ),
    "si-cap": Isolation(
        "si",
        (
            Variant(
                "avalanche-copied-uncapped",
                "avalanche",
                (("si_copy", True), ("si_cap", math.inf), ("si_floor", 0.0)),
                "Avalanche's SI, snapshots copied, its cap lifted and Ω floored at 0 (clreg's default clamp)",
            ),
            Variant(
                "clreg-capped",
                "clreg",
                (("si_cap", 1e-3), ("clamp", None), ("path_gradient", "total"), ("attach", True)),
                "clreg's SI with Avalanche's importance: Ω = min(Σ ω/(Δ²+ξ), 0.001), no floor, total gradient",
            ),
            Variant(
                "clreg-capped-avalanche-order",
                "clreg",
                (("si_cap", 1e-3), ("clamp", None), ("path_gradient", "total"), ("attach", True), ORDER),
                "the same, on Avalanche's batches in its order",
            ),
        ),
        "With its snapshots copied, how much do Avalanche's cap of Ω at 0.001, its missing floor and its total "
        "gradient change SI? Compare with si-snapshots' avalanche-copied.",
    ),
    "si-importance-range": Isolation(
        "si",
        (),
        "How often does SI's importance on this benchmark pass Avalanche's cap of 0.001, or fall below 0?",
        "si_importance_range",
    ),
    "lwf-order": Isolation(
        "lwf",
        (Variant("clreg-avalanche-order", "clreg", (ORDER,), "clreg's LwF on Avalanche's batches, in its order"),),
        "Control: LwF's conventions convert exactly (α_A = α T²); on the same batches the two should coincide.",
    ),
    "mas-importance": Isolation(
        "mas",
        (
            Variant(
                "clreg-running-average",
                "clreg",
                (("mas_average", 0.5),),
                "clreg's MAS with Avalanche's running average of importances (task weights and λ per task)",
            ),
            Variant(
                "avalanche-per-sample",
                "avalanche",
                (("mas_per_sample", True),),
                "Avalanche's MAS with its importance from batches of one sample: the mean of |per-sample gradient|",
            ),
        ),
        "How much do Avalanche's MAS importance conventions (a running average; the abs of batch-mean "
        "gradients) against clreg's (a sum; the mean of per-sample abs) change MAS?",
    ),
    "replay-adaptive": Isolation(
        "replay",
        (
            Variant(
                "avalanche-adaptive",
                "avalanche",
                (("adaptive", True),),
                "Avalanche's default storage: the whole memory split over the tasks seen so far",
            ),
        ),
        "How much does Avalanche's default storage policy (memory shared by the tasks seen) change replay?",
    ),
}


# -- report ---------------------------------------------------------------------------------------------


def fmt_strength(result: dict[str, Any]) -> str:
    if "choice_own" not in result:
        return "–"
    ((name, value),) = result["choice_own"].items()
    return (
        f"{name}={value:g}"
        + (" (grid end)" if result.get("edge") else "")
        + (" (fixed)" if result.get("fixed") else "")
    )


def ratio(v: dict[str, Any]) -> str:
    """|Δ| over its standard error, for the table ("–" when both sides are constant)."""
    if v.get("se", 0.0) == 0.0:
        return "–"
    return f"{abs(v['diff']) / v['se']:.1f}"


def table(results: dict[str, Any]) -> str:
    """The Markdown report: per setting, per method, both libraries and the rule's verdict."""
    lines = ["# Split Digits: clreg and Avalanche side by side", ""]
    p = results["protocol"]
    lines += [
        f"Test accuracy averaged over the five tasks after the last one: mean ± sd over seeds "
        f"{results['seeds']} (tuned on the validation split with seeds {results['tune_seeds']}). "
        f"{p.get('optimizer', 'sgd').capitalize()} lr {p['lr']:g}, "
        f"batch {p['batch_size']}, {p['epochs']} epochs per task. Strengths in each library's own convention; "
        "the grid is the same effective strengths. *Disagree*: |clreg − Avalanche| > max(sd).",
        "",
    ]
    for setting, methods in results["settings"].items():
        lines += [
            f"## {setting}-incremental",
            "",
            "| method | clreg | strength | Avalanche | strength | clreg − Av. | spread | Δ/se | disagree |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, r in methods.items():
            c, a, v = r["clreg"], r["avalanche"], r["compare"]
            lines.append(
                f"| {method} | {c['mean']:.3f} ± {c['sd']:.3f} | {fmt_strength(c)} | {a['mean']:.3f} ± {a['sd']:.3f} "
                f"| {fmt_strength(a)} | {v['diff']:+.3f} | {v['spread']:.3f} | {ratio(v)} "
                f"| {'**yes**' if v['disagree'] else 'no'} |"
            )
        lines.append("")
    for name, iso in results.get("isolations", {}).items():
        lines += isolation_table(name, iso)
    lines += [f"Wall time: {results['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def isolation_table(name: str, iso: dict[str, Any]) -> list[str]:
    lines = [f"## Isolation `{name}` ({iso['method']})", "", iso["question"], ""]
    for setting, rows in iso["settings"].items():
        lines += [
            f"{setting}-incremental:",
            "",
            "| variant | test | strength | − clreg | − Avalanche | seed by seed, max abs(− Avalanche) | what |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            vs = [r.get("vs_clreg"), r.get("vs_avalanche")]
            cols = ["–" if v is None else f"{v['diff']:+.3f}{' *' if v['disagree'] else ''}" for v in vs]
            paired = "–" if "paired_vs_avalanche" not in r else f"{r['paired_vs_avalanche']:.3g}"
            lines.append(
                f"| {r['variant']} | {r['mean']:.3f} ± {r['sd']:.3f} | {fmt_strength(r)} | {cols[0]} | {cols[1]} "
                f"| {paired} | {r['note']} |"
            )
        lines += ["", "(* : differs by more than the larger sd, the rule of the main table.)"]
        lines.append("")
        measured = iso.get("measure", {}).get(setting)
        if measured is not None and "mean_above_cap" in measured:
            lines += [
                f"Share of Ω entries above 0.001 after a task (mean over tasks and seeds): "
                f"{measured['mean_above_cap']:.3f}; below 0: {measured['mean_below_zero']:.3f}.",
                "",
            ]
        if measured is not None and "geometric_mean" in measured:
            lines += [
                f"Σ F_A / Σ F (batch-squared over clreg's default Fisher, after each task of a naive run): "
                f"geometric mean {measured['geometric_mean']:.3g}, from {measured['min']:.3g} to "
                f"{measured['max']:.3g}.",
                "",
            ]
    return lines


# -- main -----------------------------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        got = [s for s in text.split(",") if s]
        bad = [s for s in got if s not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(allowed)}")
        return got

    return parse


@dataclass
class Args:
    out: Path
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    tune_seeds: list[int] = field(default_factory=lambda: [100, 101])
    settings: list[str] = field(default_factory=lambda: ["class"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    isolate: list[str] = field(default_factory=list)
    reuse: Path | None = None
    epochs: int = 20


def parse(argv: Sequence[str] | None = None) -> Args:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2, 3, 4], help="report seeds (default 0,1,2,3,4)")
    ap.add_argument("--tune-seeds", type=ints, default=[100, 101], help="tuning seeds (default 100,101)")
    ap.add_argument("--settings", type=names(SETTINGS), default=["class"], help="class[,domain]")
    ap.add_argument("--methods", type=names(METHODS), default=list(METHODS))
    ap.add_argument("--isolate", type=names(tuple(ISOLATIONS)), default=[], help=f"any of {', '.join(ISOLATIONS)}")
    ap.add_argument(
        "--reuse", type=Path, default=None, help="a results.json whose comparison to keep (isolations only)"
    )
    ap.add_argument("--epochs", type=int, default=20, help="epochs per task (default 20)")
    ns = ap.parse_args(argv)
    args = Args(**vars(ns))
    if set(args.seeds) & set(args.tune_seeds):
        ap.error(f"tune seeds {args.tune_seeds} overlap the report seeds {args.seeds}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    proto = Protocol(epochs=args.epochs)
    tasks = split_digits(0)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    if args.reuse is not None:
        results = json.loads(args.reuse.read_text())
        if results["protocol"] != asdict(proto) or results["seeds"] != args.seeds:
            raise SystemExit(f"{args.reuse} was run with another protocol or seeds")
        elapsed = results["wall_s"]
    else:
        results = {
            "protocol": asdict(proto),
            "seeds": args.seeds,
            "tune_seeds": args.tune_seeds,
            "grids": {m: {"name": n, "values": list(v)} for m, (n, v) in GRIDS.items()},
            "rule": "disagree when |mean_clreg - mean_avalanche| > max(sd_clreg, sd_avalanche), sd over seeds",
            "settings": {},
        }
        for setting in args.settings:
            block = results["settings"].setdefault(setting, {})
            for method in args.methods:
                c = evaluate(CLREG, method, setting, tasks, proto, args.tune_seeds, args.seeds, log)
                a = evaluate(AVALANCHE, method, setting, tasks, proto, args.tune_seeds, args.seeds, log)
                block[method] = {"clreg": c, "avalanche": a, "compare": compare(c["test"], a["test"])}
        elapsed = 0.0
    results.setdefault("isolations", {})
    for name in args.isolate:
        iso = ISOLATIONS[name]
        entry = {"method": iso.method, "question": iso.question, "settings": {}}
        for setting in args.settings:
            base = results["settings"][setting][iso.method]
            rows = [base["clreg"], base["avalanche"]]
            for v in iso.variants:  # ("at", "avalanche"): at the strength the library chose, not tuned
                fixed = base[v.opts["at"]]["choice"] if "at" in v.opts else None
                rows.append(evaluate(v, iso.method, setting, tasks, proto, args.tune_seeds, args.seeds, log, fixed))
            for r in rows[2:]:
                r["vs_clreg"] = compare(r["test"], base["clreg"]["test"])
                r["vs_avalanche"] = compare(r["test"], base["avalanche"]["test"])
                r["paired_vs_avalanche"] = max(abs(a - b) for a, b in zip(r["test"], base["avalanche"]["test"]))
            entry["settings"][setting] = rows
            if iso.measure is not None:
                entry.setdefault("measure", {})[setting] = MEASURES[iso.measure](setting, args.seeds, tasks, proto)
        results["isolations"][name] = entry
        (args.out / f"isolate-{name}.md").write_text("\n".join(isolation_table(name, entry)))
    results["wall_s"] = elapsed + time.perf_counter() - start
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(table(results))
    log(f"wrote {args.out}/results.json and results.md")
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
