"""The report's judgement and measures against hand computations, its summary of hand-built seeds."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("timm")

from clreg.onehead.protocol import SeedResult
from clreg.onehead.report import judge, sequence_measures, summarise
from clreg.onehead.store import EvalRecord, UnitState


def test_sequence_measures_by_hand():
    R = [[0.8, 0.1, 0.0], [0.5, 0.9, 0.1], [0.4, 0.6, 0.7]]
    base = [0.8, 1.0, 0.7]
    m = sequence_measures(R, base)
    assert m["average_final"] == pytest.approx((0.4 + 0.6 + 0.7) / 3)
    assert m["backward_transfer"] == pytest.approx(((0.4 - 0.8) + (0.6 - 0.9)) / 2)
    assert m["forgetting"] == pytest.approx(((0.8 - 0.4) + (0.9 - 0.6)) / 2)
    assert m["intransigence"] == pytest.approx((0.0 + 0.1 + 0.0) / 3)
    assert m["forgetting_normalised"] == pytest.approx(((0.8 - 0.4) / 0.8 + (0.9 - 0.6) / 1.0) / 2)
    assert m["average_final_normalised"] == pytest.approx((0.4 / 0.8 + 0.6 + 1.0) / 3)


def test_judge_pass_fail_inconclusive_and_near_chance():
    g = torch.Generator().manual_seed(0)
    base = [0.8 + 0.01 * torch.randn(500, generator=g, dtype=torch.float64)]
    assert judge([base[0] * 0.99], base, 0.8, 0.1)["verdict"] == "pass"
    assert judge([base[0] * 0.90], base, 0.8, 0.1)["verdict"] == "fail"
    noisy = [base[0] * (0.95 + 0.05 * torch.randn(500, generator=g, dtype=torch.float64))]
    assert judge(noisy, base, 0.8, 0.1)["verdict"] == "inconclusive"
    assert judge([base[0]], base, 0.15, 0.1)["verdict"] == "not judged"
    # two seeds: judged on the ratio of the seed means per resample
    v = judge([base[0] * 0.99, base[0] * 0.89], [base[0], base[0]], 0.8, 0.1)
    assert v["ratio_lo"] == pytest.approx(0.94, abs=1e-9) and v["verdict"] == "fail"


def test_summarise_two_seeds_means_extras_and_intervals():
    """Two hand-built seeds: scores, mAP@[.5:.95] and per-class figures are means over seeds, the
    interval is that of the seeds' mean per resample, R and the measures come from each seed."""

    def rec(value, offset, ap=None):
        boot = value + offset * torch.linspace(-1, 1, 101, dtype=torch.float64)
        extras = {} if ap is None else {"map_50_95": ap, "per_class_ap": {"a": ap, "b": 2 * ap}}
        return EvalRecord(value, float(boot.min()), float(boot.max()), 10, boot, extras)

    def seed(a, b):
        evals = lambda s, d: {"s": rec(s, 0.01), "d": rec(d, 0.02, ap=d / 2)}  # noqa: E731
        later = UnitState(evals(a / 2, b), train={"seconds": 3.0}, regularizer_bytes=8, peak_rss=5)
        return SeedResult(
            single={"s": UnitState(evals(a, 0.0)), "d": UnitState(evals(0.0, b))},
            joint=None,
            methods={"m": [UnitState(evals(a, 0.0)), later]},
        )

    out = summarise([seed(0.8, 0.6), seed(0.6, 0.4)], ["s", "d"], {"s": 0.0, "d": 0.0}, {"s": "A", "d": "B"})
    base_d = out["baselines"]["d"]
    assert base_d["mean"] == pytest.approx(0.5) and base_d["std"] == pytest.approx(math.sqrt(0.02))
    assert base_d["map_50_95"] == pytest.approx(0.25)  # (0.3 + 0.2) / 2
    assert base_d["per_class_ap"] == pytest.approx({"a": 0.25, "b": 0.5})
    assert base_d["interval"] == pytest.approx([0.5 - 0.02 * 0.95, 0.5 + 0.02 * 0.95], abs=1e-9)
    m = out["methods"]["m"]
    assert [pytest.approx(r) for r in ([0.7, 0.0], [0.35, 0.5])] == m["R"]
    assert m["final"]["s"]["mean"] == pytest.approx(0.35) and m["final"]["s"]["drop_absolute"] == pytest.approx(0.35)
    assert m["final"]["s"]["drop_relative"] == pytest.approx(0.5)
    assert m["final"]["s"]["interval"] == pytest.approx([0.35 - 0.0095, 0.35 + 0.0095], abs=1e-9)
    assert m["final"]["s"]["five_percent_rule"]["verdict"] == "fail"
    assert m["final"]["d"]["five_percent_rule"]["verdict"] == "pass"  # equal to its baseline
    assert m["measures"]["forgetting"]["mean"] == pytest.approx(0.35)  # (0.4 + 0.3) / 2
    assert m["train_seconds"] == pytest.approx(3.0) and m["regularizer_bytes"] == 8
