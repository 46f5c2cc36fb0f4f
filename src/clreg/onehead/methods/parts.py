"""The built-in parts: ``naive`` (no remedy), ``ewc``, ``online_ewc``, ``si``, ``lwf``, ``mas``,
``kfac_ewc`` (Kronecker-factored EWC) and ``replay``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ... import EWC, KFACEWC, MAS, SI, LwF, OnlineEWC, ReplayBuffer
from ...regularizers import Regularizer
from .registry import Part, Settings, register_part

__all__ = ["BUILTIN_PARTS"]


def _norm(flag: float) -> str | None:
    """A 0/1 setting as EWC's ``normalize`` (``"mean"`` or none)."""
    if flag not in (0.0, 1.0):
        raise ValueError(f"a normalize setting is 0 or 1, got {flag}")
    return "mean" if flag else None


def _ewc(model: nn.Module, s: Settings, seed: int) -> EWC:
    return EWC(model, lam=s["ewc.lam"], seed=seed, normalize=_norm(s["ewc.normalize"]))


def _online_ewc(model: nn.Module, s: Settings, seed: int) -> OnlineEWC:
    gamma, normalize = s["online_ewc.gamma"], _norm(s["online_ewc.normalize"])
    return OnlineEWC(model, lam=s["online_ewc.lam"], gamma=gamma, seed=seed, normalize=normalize)


def _kfac_ewc(model: nn.Module, s: Settings, seed: int) -> KFACEWC:
    return KFACEWC(model, lam=s["kfac_ewc.lam"], gamma=s["kfac_ewc.gamma"], seed=seed)


def _si_take_over(si: Regularizer, state: dict[str, Any], s: Settings) -> None:
    """SI continues the path the first stage tracked, with the method's own c and ξ."""
    si.load_state_dict(state)
    si.c, si.xi = s["si.c"], s["si.xi"]


BUILTIN_PARTS = tuple(
    register_part(p)
    for p in (
        Part("naive"),
        Part(
            "ewc",
            # normalize 1: each task's Fisher divided by its mean; per_task 1: λ@k weighs the task
            # consolidated before stage k (its w_t), the global λ is 1; likelihood 1: a task with a
            # per-sample loss (detection) gives the mc Fisher of its likelihood instead
            {"ewc.lam": 1.0, "ewc.normalize": 0.0, "ewc.per_task": 0.0, "ewc.likelihood": 0.0},
            regularizer=_ewc,
            stage_attributes={"ewc.lam": "lam"},
            data_pass=True,
            per_task_strength=("ewc.per_task", "ewc.lam"),
            likelihood_switch="ewc.likelihood",
            off_by_default=("ewc.per_task", "ewc.likelihood"),
        ),
        Part(
            "online_ewc",
            {"online_ewc.lam": 1.0, "online_ewc.gamma": 1.0, "online_ewc.normalize": 0.0},
            within_rules=False,
            regularizer=_online_ewc,
            stage_attributes={"online_ewc.lam": "lam"},
            data_pass=True,
        ),
        Part(
            "si",
            {"si.c": 0.1, "si.xi": 1e-3},
            within_rules=False,
            regularizer=lambda model, s, seed: SI(model, c=s["si.c"], xi=s["si.xi"]),
            stage_attributes={"si.c": "c"},
            stage_one_tracker=SI,
            take_over=_si_take_over,
        ),
        Part(
            "lwf",
            {"lwf.alpha": 1.0, "lwf.temperature": 2.0},
            regularizer=lambda model, s, seed: LwF(model, temperature=s["lwf.temperature"], alpha=s["lwf.alpha"]),
            stage_attributes={"lwf.alpha": "alpha"},
        ),
        Part(
            "mas",
            {"mas.lam": 1.0},
            within_rules=False,
            regularizer=lambda model, s, seed: MAS(model, lam=s["mas.lam"], normalize=True),
            stage_attributes={"mas.lam": "lam"},
            data_pass=True,
        ),
        Part(
            "kfac_ewc",  # Kronecker-factored EWC: outside the challenge's remedies
            {"kfac_ewc.lam": 1.0, "kfac_ewc.gamma": 1.0},
            within_rules=False,
            regularizer=_kfac_ewc,
            stage_attributes={"kfac_ewc.lam": "lam"},
            data_pass=True,
        ),
        Part(
            "replay",
            {
                "replay.capacity": 10,  # stored images per past task (the challenge allows at most 10)
                "replay.per_step": 8,  # replayed images mixed into each step, split over the past tasks
                "replay.weight": 1.0,  # weight of each past task's replay loss
            },
            replay_buffer=lambda s, seed: ReplayBuffer(int(s["replay.capacity"]), policy="reservoir", seed=seed),
        ),
    )
)
