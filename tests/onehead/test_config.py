"""The configuration: a request resolved against a profile, its record, and bad requests refused."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("timm")

from clreg.onehead.config import RunRequest, resolve
from clreg.onehead.experiments import open_workspace
from clreg.onehead.methods import default_settings
from clreg.onehead.profiles import PROFILES


def test_the_scratch_profile_trains_from_random_init_with_its_warmups() -> None:
    """The scratch profile resolves to a random backbone, 160 px, per-task learning rates and warmups."""
    record = resolve(RunRequest(profile="scratch")).record()
    assert record["backbone"] == {"kind": "random"} and record["size"] == 160
    assert record["stage_lr"] == [1e-2, 1.2e-2, 8e-3] and record["stage_warmup"] == [100, 100, 300]
    assert record["data"]["synthetic"]["key"] == "v3-6ac595463621"  # the synthetic default


def test_the_shipped_backbone_is_recorded_by_its_place_in_the_package(tmp_path) -> None:
    """A record made in one checkout compares equal in another: the shipped backbone is named by its
    package path; any other file by the path given."""
    from clreg.onehead.pretext import SHIPPED_BACKBONE

    quick = resolve(RunRequest(profile="quick"))
    assert quick.backbone.path == str(SHIPPED_BACKBONE)  # what the run loads
    assert quick.record()["backbone"] == {"kind": "file", "path": f"clreg/onehead/weights/{SHIPPED_BACKBONE.name}"}
    other = tmp_path / SHIPPED_BACKBONE.name
    other.write_bytes(b"")
    own = resolve(RunRequest(profile="quick", backbone_weights=str(other))).record()["backbone"]
    assert own == {"kind": "file", "path": str(other.resolve())}


def test_the_quick_profile_ships_what_its_documented_tune_chose() -> None:
    """clreg/onehead/tuned/quick.json is the choices of docs/results/quick-tune-2/tune.json, and the quick
    profile runs them, while a --tune starts again from the untuned profile."""
    import json
    from pathlib import Path

    from clreg.onehead.profiles import load_tuned, tune_choices

    tune = json.loads((Path(__file__).parents[2] / "docs/results/quick-tune-2/tune.json").read_text())
    shipped = load_tuned("quick")
    assert shipped == tune_choices(tune)
    run = resolve(RunRequest(profile="quick"))
    record = run.record()
    assert record["stage_baseline_lr"] == [shipped["baseline_lr"]["chosen"][t] for t in ("seg", "det", "cls")]
    assert record["joint_weights"] == shipped["joint"]["weights"]
    assert record["joint_schedule"] == shipped["joint"]["chosen"]
    assert run.methods == ("naive", "ewc", "lwf", "replay", "lwf+replay", "ewc+lwf", "ewc+lwf+replay")
    for method, tuned in shipped["methods"].items():
        own = run.settings_for(method)
        assert {k: own[k] for k in tuned["chosen"]} == tuned["chosen"], method
    assert "docs/results/quick-tune-2/tune.json" in run.settings_provenance
    assert run.profile.tuned_on == (100, 101) and "did not finish for lwf+replay, ewc+lwf" in run.settings_provenance
    retune = resolve(RunRequest(profile="quick", mode="tune")).record()
    assert "stage_baseline_lr" not in retune and "joint_weights" not in retune and "method_settings" not in retune
    with pytest.raises(ValueError, match="no shipped tune for profile 'tiny'; shipped: quick"):
        load_tuned("tiny")


def test_a_request_resolves_into_every_value_a_run_uses(tmp_path) -> None:
    cfg = resolve(RunRequest(profile="tiny", methods="naive,ewc+lwf", seeds=3, steps=7, sets={"lwf.alpha": 2.0}))
    assert cfg.methods == ("naive", "ewc+lwf") and cfg.seeds == (0, 1, 2) and cfg.steps == (7, 7, 7)
    assert cfg.settings == {**default_settings(), "ewc.lam": 10.0, "lwf.alpha": 2.0}
    assert cfg.within_rules == {"naive": True, "ewc+lwf": True}
    assert str(cfg.out) == "onehead-results/tiny" and cfg.backbone.kind == "random"
    assert "overridden by --set lwf.alpha=2" in cfg.settings_provenance
    record = cfg.record()
    assert record["baseline_lr"] == default_settings()["lr"] and record["tune"] is False
    assert "eval_split" not in record and "hash" not in record["data"]  # known once the data is there
    assert set(cfg.comparable()) == set(record) - {"device", "seeds", "methods", "within_rules", "joint",
                                                   "settings", "settings_provenance", "workers"}  # fmt: skip
    assert resolve(RunRequest(profile="tiny", mode="tune")).out.name == "tiny-tune"


def test_the_quick_profile_runs_five_seeds_in_two_processes_where_torch_has_two_threads(monkeypatch) -> None:
    """The quick profile's defaults: seeds 0-4 (none of them the tune's) and two worker processes, at
    most one per thread torch may use; --workers overrides, a tune and the tiny profile use one."""
    import torch

    for threads, workers in ((1, 1), (2, 2), (8, 2)):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        quick = resolve(RunRequest(profile="quick"))
        assert quick.workers == workers and quick.seeds == (0, 1, 2, 3, 4)
        assert resolve(RunRequest(profile="quick", workers=1)).workers == 1
        assert resolve(RunRequest(profile="quick", mode="tune")).workers == 1
        assert resolve(RunRequest(profile="tiny")).workers == 1
    assert not set(quick.seeds) & set(quick.profile.tuned_on or ())


@pytest.mark.parametrize(
    "request_, message",
    [
        (RunRequest(profile="nope"), "unknown profile"),
        (RunRequest(profile="tiny", seeds=0), "--seeds"),
        (RunRequest(profile="tiny", workers=0), "--workers"),
        (RunRequest(profile="tiny", recorded_only=True), "applies to a --tune"),
        (RunRequest(profile="tiny", steps=0), "--steps"),
        (RunRequest(profile="tiny", mode="fit"), "mode must be one of"),
        (RunRequest(profile="tiny", sets={"ewc.lambda": 1.0}), r"unknown setting ewc\.lambda"),
        (RunRequest(profile="tiny", methods="ewc,bogus"), "--methods: unknown method part"),
        (RunRequest(profile="tiny", pretrained=True, random_init=True), "at most one of"),
    ],
)
def test_bad_requests_are_refused_with_a_message(request_, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve(request_)


def test_a_profiles_per_stage_setting_must_be_one_that_can_change(monkeypatch) -> None:
    bad = replace(PROFILES["tiny"], stage_settings=({}, {"replay.capacity": 5.0}, {}))
    monkeypatch.setitem(PROFILES, "tiny", bad)
    with pytest.raises(ValueError, match="cannot change between stages"):
        resolve(RunRequest(profile="tiny"))


def test_named_categories_reach_the_detection_task_and_the_record(cache_env, tmp_path) -> None:
    cfg = resolve(RunRequest(profile="tiny", categories=("star", " ring"), out=str(tmp_path / "o")))
    assert cfg.categories == ("star", "ring") and cfg.record()["categories"] == ["star", "ring"]
    assert "categories" not in resolve(RunRequest(profile="tiny")).record()  # absent unless named
    ws = open_workspace(cfg)
    assert ws.tasks["det"].class_names == ["star", "ring"] and ws.make_model().det_classes == 2
    with pytest.raises(ValueError, match="distinct category names"):
        resolve(RunRequest(profile="tiny", categories=("star", "star")))


def test_a_setting_may_be_one_methods_own() -> None:
    cfg = resolve(RunRequest(profile="tiny", methods="ewc,ewc+lwf", sets={"ewc+lwf:ewc.lam": 5.0, "lr": 1e-3}))
    assert cfg.settings_for("ewc+lwf")["ewc.lam"] == 5.0 and cfg.settings_for("ewc")["ewc.lam"] == 10.0
    assert cfg.settings_for("ewc")["lr"] == cfg.settings_for("ewc+lwf")["lr"] == 1e-3
    assert cfg.record()["method_settings"] == {"ewc+lwf": {"ewc.lam": 5.0}}
    with pytest.raises(ValueError, match="unknown method part"):
        resolve(RunRequest(profile="tiny", sets={"ewc+kfac:ewc.lam": 5.0}))
    with pytest.raises(ValueError, match="unknown setting"):
        resolve(RunRequest(profile="tiny", sets={"ewc:ewc.lambda": 5.0}))


def test_methods_all_names_the_profiles_whole_list():
    from clreg.onehead.profiles import TUNE_METHODS

    assert resolve(RunRequest(profile="quick", methods="all")).methods == tuple(TUNE_METHODS.split(","))
    tiny = resolve(RunRequest(profile="tiny", methods="all"))
    assert tiny.methods == tuple(PROFILES["tiny"].methods.split(","))  # no list of its own: its methods
