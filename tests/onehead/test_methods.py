"""The one-head benchmark's methods over the harness's parts: parsing and the challenge's rules, the
settings and per-stage values, unit keys that keep their names, and the first-stage path tracking."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")

import clreg
from clreg.bench.parts import PARTS
from clreg.onehead.methods import (
    ONEHEAD_PARTS,
    Method,
    check_settings,
    check_stage_settings,
    default_settings,
    parse_methods,
    stage_one_trackers,
)


def test_methods_parse_and_rules():
    assert parse_methods("naive, ewc ,ewc+lwf+replay") == ["naive", "ewc", "ewc+lwf+replay"]
    assert not Method.parse("si").within_rules and not Method.parse("ewc+mas").within_rules
    assert Method.parse("lwf+replay").within_rules
    with pytest.raises(ValueError, match="repeats"):
        Method.parse("ewc+ewc")
    with pytest.raises(ValueError, match="cannot be combined"):
        Method.parse("naive+ewc")
    with pytest.raises(ValueError, match="unknown method part"):
        Method.parse("ewc+kfac")


def test_every_part_declares_the_settings_it_reads():
    """The defaults come from the harness's part dataclasses; a method reads its parts' and ``lr``."""
    defaults = default_settings()
    assert list(defaults)[-1] == "lr" and defaults["lr"] == 2e-3
    assert {k.split(".")[0] for k in defaults if k != "lr"} == set(ONEHEAD_PARTS) - {"naive"}
    ewc = Method.parse("ewc+replay", {"ewc.lam": 5, "si.c": 3.0})
    assert ewc.relevant_settings() == {"ewc.lam": 5.0, "ewc.normalize": 0.0, "ewc.per_task": 0.0,
                                       "ewc.likelihood": 0.0, "replay.capacity": 10, "replay.per_step": 8,
                                       "replay.weight": 1.0, "lr": 2e-3}  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown setting ewc\.lambda"):
        Method.parse("ewc", {"ewc.lambda": 1.0})
    with pytest.raises(ValueError, match="whole number"):
        Method.parse("replay", {"replay.capacity": 2.5})


def test_parts_with_step_hooks_are_refused_by_name():
    """The one-head protocol applies a penalty, SI's path and a replay buffer; DER's outputs, ER-ACE's
    loss or A-GEM's projection it does not, so those are refused, never run without their hooks."""
    assert set(ONEHEAD_PARTS) < set(PARTS)
    with pytest.raises(ValueError, match=r"\['der'\] need what its protocol does not give"):
        Method.parse("ewc+der")
    with pytest.raises(ValueError, match="runs the parts"):
        check_settings({"agem.capacity": 5})
    with pytest.raises(ValueError, match="learning rate"):
        check_settings({"lr@2": 1e-3})


def test_built_regularizers_follow_the_settings_and_per_stage_values_reach_their_member():
    model = torch.nn.Linear(3, 2)
    built = Method.parse("ewc+lwf+replay", {"ewc.lam": 7.0, "lwf.alpha": 2.0}).build(model, seed=1)
    assert list(built.members) == ["ewc", "lwf"] and isinstance(built.reg, clreg.Compose)
    assert built.members["ewc"].lam == 7.0 and built.members["lwf"].alpha == 2.0
    assert built.buffer is not None and built.buffer.capacity_per_task == 10
    built.set_stage_values({"ewc.lam": 3.0, "lwf.alpha": 0.5, "mas.lam": 9.0})  # mas: not in this method
    assert built.members["ewc"].lam == 3.0 and built.members["lwf"].alpha == 0.5
    per_task = Method.parse("ewc", {"ewc.per_task": 1.0}).build(model)
    per_task.set_stage_values({"ewc.lam": 30.0})  # λ weighs the task (w_t): EWC's own λ stays 1
    assert per_task.members["ewc"].lam == 1.0
    with pytest.raises(ValueError, match="cannot change between stages"):
        check_stage_settings({"replay.capacity": 4})
    with pytest.raises(ValueError, match="unknown setting"):
        check_stage_settings({"ewc.lambda": 4})
    assert Method.parse("naive").build(model).reg is None


def test_first_stage_path_tracking_is_a_declared_capability():
    """The parts that track stage 1 (SI) give a tracker; a method with such a part takes its state
    over with its own c and ξ."""
    model = torch.nn.Linear(3, 2)
    trackers = stage_one_trackers(model)
    assert list(trackers) == [n for n in ONEHEAD_PARTS if PARTS[n].first_stage_tracker(model) is not None] == ["si"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trackers["si"].track(opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(4, 3)).pow(2).sum().backward()
        opt.step()
    trackers["si"].detach()
    state = trackers["si"].state_dict()
    built = Method.parse("si", {"si.c": 5.0, "si.xi": 0.01}).build(model)
    built.take_over({"si": state})
    si = built.members["si"]
    assert si.c == 5.0 and si.xi == 0.01
    torch.testing.assert_close(si.omega.tensors[0], trackers["si"].omega.tensors[0])
    assert int(si.steps) == 3


def test_a_methods_unit_key_is_its_name_and_a_digest_of_what_it_reads():
    """The key names a method's units: it changes with the settings it reads and nothing else."""
    a = Method.parse("ewc", {"ewc.lam": 10.0})
    assert a.key([{}, {}, {}]) == Method.parse("ewc", {"ewc.lam": 10.0, "si.c": 4.0}).key([{}, {}, {}])
    assert a.key([{}, {}, {}]) != Method.parse("ewc", {"ewc.lam": 3.0}).key([{}, {}, {}])
    assert a.key([{}, {}, {}]) != a.key([{}, {"ewc.lam": 3.0}, {}])
    assert a.key([{}, {}, {}]).startswith("ewc@") and len(a.key([{}, {}, {}])) == len("ewc@") + 8
    # a stage's key leaves out the settings of later stages, so those candidates share it
    b, c = (Method.parse("ewc", {"ewc.lam": 10.0, "ewc.lam@3": v}) for v in (1.0, 2.0))
    assert b.key([{}, {}, {}], upto=2) == c.key([{}, {}, {}], upto=2) != b.key([{}, {}, {}], upto=3)
    assert b.key([{}, {}, {}], upto=3) != c.key([{}, {}, {}], upto=3)
    assert b.key([{}, {}, {}], upto=2) != b.key([{}, {"ewc.lam": 3.0}, {}], upto=2)


def test_the_tiny_profiles_ewc_units_keep_their_names():
    """Unit names are stable: they change only with the settings a method reads (EWC's grew
    ``ewc.normalize``; ``ewc.per_task`` and ``ewc.likelihood`` count only when on), so a folder of an
    earlier run finds its method units."""
    assert Method.parse("ewc", {"ewc.lam": 10.0}).key([{}, {}, {}]) == "ewc@7e12ef4f"
    assert Method.parse("ewc", {"ewc.lam": 10.0, "ewc.per_task": 1.0}).key([{}, {}, {}]) != "ewc@7e12ef4f"


def test_a_setting_may_take_its_own_value_for_one_stage():
    m = Method.parse("ewc+lwf", {"ewc.lam": 2.0, "ewc.lam@3": 5.0, "lwf.alpha@2": 0.5, "mas.lam@2": 9.0})
    alpha = m.settings["lwf.alpha"]
    assert m.stage_values(2) == {"ewc.lam": 2.0, "lwf.alpha": 0.5}  # every per-stage value, each stage
    assert m.stage_values(3) == {"ewc.lam": 5.0, "lwf.alpha": alpha}
    assert m.stage_values(3, {"lwf.alpha": 0.7, "si.c": 1.0}) == {"ewc.lam": 5.0, "lwf.alpha": 0.7}
    assert "mas.lam@2" not in m.relevant_settings()  # another part's: not read, not in the unit key
    assert m.key([{}, {}, {}]) != Method.parse("ewc+lwf", {"ewc.lam": 2.0}).key([{}, {}, {}])
    for bad, message in (("ewc.lam@x", "is not of the form"), ("replay.capacity@2", "cannot change between"),
                         ("ewc.lambda@2", "unknown setting")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            Method.parse("ewc", {bad: 1.0})


def test_the_ewc_familys_normalised_fisher_is_a_setting():
    model = torch.nn.Linear(3, 2)
    for part in ("ewc", "online_ewc"):
        built = Method.parse(part, {f"{part}.normalize": 1.0}).build(model)
        assert built.members[part].fisher_options.normalize == "mean"
        assert Method.parse(part).build(model).members[part].fisher_options.normalize is None
        with pytest.raises(ValueError, match="true or false"):
            Method.parse(part, {f"{part}.normalize": 0.5})
