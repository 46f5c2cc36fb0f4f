"""Units: typed state through a weights-only checkpoint, resuming without rerunning, seeding per unit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")

from clreg.onehead.store import UNIT_FORMAT, EvalRecord, UnitState, UnitStore


def _state() -> UnitState:
    rec = EvalRecord(0.5, 0.4, 0.6, 10, torch.linspace(0.4, 0.6, 5, dtype=torch.float64), {"per_class": {"a": 1.0}})
    return UnitState({"t": rec}, train={"steps": 3, "seconds": 1.0, "loss": 0.2}, model={"w": torch.ones(2)},
                     trackers={"si": {"omega": torch.zeros(2)}}, regularizer_bytes=64)  # fmt: skip


def test_a_unit_state_round_trips_through_a_weights_only_checkpoint(tmp_path) -> None:
    store = UnitStore(tmp_path, seed=2, log_line=lambda s: None)
    store.run("m@abc/stage2", _state)
    path = tmp_path / "state" / "seed2" / "m@abc__stage2.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == UNIT_FORMAT and raw["evals"]["t"]["per_class"] == {"a": 1.0}
    got = store.load("m@abc/stage2")
    want = _state()
    assert got.evals["t"].value == 0.5 and torch.equal(got.evals["t"].boot, want.evals["t"].boot)
    assert got.evals["t"].extras == {"per_class": {"a": 1.0}} and got.train == want.train
    assert torch.equal(got.model["w"], torch.ones(2)) and torch.equal(got.trackers["si"]["omega"], torch.zeros(2))
    assert got.regularizer_bytes == 64 and got.reg is None and got.rng is not None and got.seconds >= 0


def test_a_finished_unit_is_loaded_not_rerun_and_each_unit_is_seeded(tmp_path) -> None:
    store = UnitStore(tmp_path, seed=0, log_line=lambda s: None)
    draws = []

    def fn() -> UnitState:
        draws.append(torch.rand(3))
        return _state()

    store.run("a", fn)
    store.run("a", fn)
    assert len(draws) == 1
    UnitStore(tmp_path / "other", seed=0, log_line=lambda s: None).run("a", fn)
    assert torch.equal(draws[0], draws[1])  # the same unit of the same seed draws the same numbers
    UnitStore(tmp_path / "other", seed=1, log_line=lambda s: None).run("a", fn)
    assert not torch.equal(draws[0], draws[2])


def test_a_unit_of_another_layout_is_refused(tmp_path) -> None:
    store = UnitStore(tmp_path, seed=0)
    store.path("a").parent.mkdir(parents=True)
    torch.save({"evals": {}}, store.path("a"))
    with pytest.raises(ValueError, match="written by another version of the benchmark"):
        store.load("a")
