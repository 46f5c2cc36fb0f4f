"""The benchmark end to end through its command line: the tiny profile's report, resume after a kill,
the baselines alone, a saved model evaluated, two processes, a changed configuration, new method
settings reusing what they can, the tune."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("pycocotools")

from clreg import ReplayBuffer
from clreg.onehead.cli import main
from clreg.onehead.methods import Method
from clreg.onehead.profiles import PROFILES, tune_choices, with_tuned

TIMING_KEYS = {"train_seconds", "peak_rss_bytes", "provenance", "seconds", "figures"}


def _strip(tree):
    """results.json without what legitimately differs between two runs (timings, memory, dates)."""
    if isinstance(tree, dict):
        return {k: _strip(v) for k, v in tree.items() if k not in TIMING_KEYS}
    if isinstance(tree, list):
        return [_strip(v) for v in tree]
    return tree


def test_tiny_run_writes_a_complete_report(tiny_run):
    res = json.loads((tiny_run / "results.json").read_text())
    assert res["schema_version"] == 1
    assert set(res["summary"]["methods"]) == {"naive", "ewc"}
    for m in ("naive", "ewc"):
        r = res["summary"]["methods"][m]
        assert len(r["R"]) == 3 and all(len(row) == 3 for row in r["R"])
        assert all(0.0 <= v <= 1.0 for row in r["R"] for v in row)
        for t in ("seg", "det", "cls"):
            f = r["final"][t]
            assert f["interval"][0] <= f["mean"] + 1e-9 <= f["interval"][1] + 2e-9
            assert f["five_percent_rule"]["verdict"] in ("pass", "fail", "inconclusive", "not judged")
        # the measures, written out from their definitions on the stored matrix
        R = r["R"]
        forgetting = sum(max(R[0][k], R[1][k]) - R[2][k] for k in range(2)) / 2
        assert r["measures"]["forgetting"]["mean"] == pytest.approx(forgetting)
        assert r["measures"]["backward_transfer"]["mean"] == pytest.approx(sum(R[2][k] - R[k][k] for k in range(2)) / 2)
        assert r["measures"]["average_final"]["mean"] == pytest.approx(sum(R[2]) / 3)
    # stage 1 is shared: every method's first row is the same
    assert res["summary"]["methods"]["naive"]["R"][0] == res["summary"]["methods"]["ewc"]["R"][0]
    assert res["summary"]["methods"]["ewc"]["regularizer_bytes"] > 0
    assert res["summary"]["methods"]["naive"]["regularizer_bytes"] == 0
    prov = res["provenance"]
    assert prov["versions"]["torch"] and prov["threads"] >= 1 and prov["cpu"]
    assert res["config"]["data"]["hash"] and res["config"]["eval_split"] == "test"
    assert res["within_rules"] == {"naive": True, "ewc": True}
    report = (tiny_run / "report.md").read_text()
    assert "| naive | yes |" in report and "R[stage][task]" in report
    assert (tiny_run / "accuracy_matrices.png").stat().st_size > 0
    # every unit's state loads with weights_only
    for p in (tiny_run / "state" / "seed0").glob("*.pt"):
        state = torch.load(p, weights_only=True)
        assert "evals" in state and isinstance(state["rng"], torch.Tensor)


def test_the_work_counted_before_the_run_is_what_its_units_did(tiny_run):
    """results.json's planned work: each unit's optimizer steps and evaluated images equal what the
    saved units record, and EWC's consolidation passes read each previous task's fit data once."""
    res = json.loads((tiny_run / "results.json").read_text())
    work = res["work"]["per_seed"]
    state = tiny_run / "state" / "seed0"
    units = {p.name: torch.load(p, weights_only=True) for p in state.glob("*.pt")}

    def done(prefix: str) -> tuple[int, int]:
        picked = [u for n, u in units.items() if n.startswith(prefix)]
        return sum(u["train"]["steps"] for u in picked), sum(e["n"] for u in picked for e in u["evals"].values())

    assert (work["stage1"]["optimizer_steps"], work["stage1"]["evaluated_images"]) == done("stage1")
    assert (work["single/det"]["optimizer_steps"], work["single/det"]["evaluated_images"]) == done("single__det")
    assert (work["joint"]["optimizer_steps"], work["joint"]["evaluated_images"]) == done("joint")
    for m in ("naive", "ewc"):
        assert (work[m]["optimizer_steps"], work[m]["evaluated_images"]) == done(f"{m}@")
    assert work["naive"]["consolidation_samples"] == 0
    assert work["ewc"]["consolidation_samples"] == 12 + 12  # tiny: 12 seg and 12 det training images
    total = res["work"]["per_seed_total"]
    assert total["optimizer_steps"] == sum(u["optimizer_steps"] for u in work.values())
    budget = res["joint_budget"]  # tiny: the equal schedule, round((3 + 3 + 3) / 3) steps of a batch of each
    assert budget["steps"] == work["joint"]["optimizer_steps"] == 3 and budget["schedule"] == "equal"
    assert budget["batches"] == {"seg": 3, "det": 3, "cls": 3} and budget["weights"] is None
    assert (
        "The joint reference trains every task from the start: the equal schedule, 3 optimizer steps"
        in (tiny_run / "report.md").read_text()
    )


def test_a_finished_run_is_not_repeated(tiny_run, cache_env):
    before = {p: p.stat().st_mtime_ns for p in (tiny_run / "state" / "seed0").glob("*.pt")}
    first = json.loads((tiny_run / "results.json").read_text())
    assert main(["--profile", "tiny", "--out", str(tiny_run), "--quiet"]) == 0
    after = {p: p.stat().st_mtime_ns for p in (tiny_run / "state" / "seed0").glob("*.pt")}
    assert before == after
    assert _strip(json.loads((tiny_run / "results.json").read_text())) == _strip(first)


def test_killed_run_resumes_to_the_same_results(tiny_run, cache_env, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_env)}
    cmd = [sys.executable, "-m", "clreg.onehead", "--profile", "tiny", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    target = out / "state" / "seed0" / "single__det.pt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before it could be killed"
    assert not (out / "results.json").exists()
    done_before = sorted(p.name for p in (out / "state" / "seed0").glob("*.pt"))
    assert "stage1.pt" in done_before and not any(".tmp" in n for n in done_before)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    got = json.loads((out / "results.json").read_text())
    want = json.loads((tiny_run / "results.json").read_text())
    got["config"].pop("data"), want["config"].pop("data")
    assert _strip(got) == _strip(want)


def test_baselines_only_matches_the_full_runs_baselines(tiny_run, cache_env, tmp_path):
    """--baselines-only trains the same single-task units as a full run (seed 0 gives the same
    scores), for every seed, and writes their mean and standard deviation over seeds."""
    out = tmp_path / "base"
    assert main(["--profile", "tiny", "--baselines-only", "--seeds", "2", "--out", str(out), "--quiet"]) == 0
    got = json.loads((out / "baselines.json").read_text())
    full = json.loads((tiny_run / "results.json").read_text())["summary"]["baselines"]
    assert got["split"] == "test" and got["steps"] == [3, 3, 3]
    for t in ("seg", "det", "cls"):
        seeds = [got["seeds"][str(s)][t] for s in (0, 1)]
        assert seeds[0]["value"] == pytest.approx(full[t]["per_seed"][0], abs=1e-12)
        for r in seeds:
            assert r["interval"][0] <= r["value"] + 1e-9 <= r["interval"][1] + 2e-9
        values = torch.tensor([r["value"] for r in seeds], dtype=torch.float64)
        assert got["mean"][t]["mean"] == pytest.approx(values.mean().item())
        assert got["mean"][t]["std"] == pytest.approx(values.std().item())


def test_evaluate_reads_a_saved_model(tiny_run, cache_env, capsys):
    root = Path(json.loads((tiny_run / "results.json").read_text())["config"]["data"]["synthetic"]["key"])
    data_root = Path(os.environ["XDG_CACHE_HOME"]) / "clreg" / "synthetic" / root
    assert main(["evaluate", "--checkpoint", str(tiny_run / "models" / "ewc.pt"), "--data-root", str(data_root),
                 "--split", "test"]) == 0  # fmt: skip
    line = capsys.readouterr().out
    res = json.loads((tiny_run / "results.json").read_text())["summary"]["methods"]["ewc"]["final"]
    got = dict(zip(line.split()[::2], map(float, line.split()[1::2])))
    assert got["mIoU"] == pytest.approx(res["seg"]["mean"], abs=1e-4)
    assert got["Top-1"] == pytest.approx(res["cls"]["mean"], abs=1e-4)
    assert got["mAP@0.5"] == pytest.approx(res["det"]["mean"], abs=1e-4)


def test_two_processes_on_gloo_give_a_valid_run(cache_env, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_env), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "clreg.onehead",
    ]
    cmd += ["--profile", "tiny", "--methods", "ewc+replay", "--no-joint", "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    m = res["summary"]["methods"]["ewc+replay"]
    assert len(m["R"]) == 3 and all(0.0 <= v <= 1.0 for row in m["R"] for v in row)
    # the replay buffer holds each past task's 10 picks once (gathered from both ranks, no duplicates)
    (path,) = (out / "state" / "seed0").glob("ewc+replay@*__stage3.pt")
    state = torch.load(path, weights_only=True)
    buf = clreg_replay_from_state(state["buffer"])
    assert sorted(buf.tasks) == ["det", "seg"] and all(len(buf.samples(t)) == 10 for t in buf.tasks)
    xs = torch.stack([x for x, _ in buf.samples("seg")])
    assert len({tuple(x.flatten()[:64].tolist()) for x in xs}) == 10


def clreg_replay_from_state(state):
    buf = ReplayBuffer(10)
    buf.load_state_dict(state)
    return buf


def test_a_changed_configuration_is_refused(tiny_run, capsys):
    assert main(["--profile", "tiny", "--out", str(tiny_run), "--bn", "freeze", "--quiet"]) == 2
    assert "another configuration" in capsys.readouterr().err
    assert main(["--profile", "tiny", "--out", str(tiny_run), "--set", "lr=0.01", "--quiet"]) == 2


def test_new_method_settings_reuse_stage_one_and_the_baselines(tiny_run, cache_env, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    state = out / "state" / "seed0"
    shared = {p.name: p.stat().st_mtime_ns for p in state.glob("*.pt") if "@" not in p.name}
    assert main(["--profile", "tiny", "--out", str(out), "--set", "ewc.lam=3", "--quiet"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in state.glob("*.pt") if "@" not in p.name} == shared
    assert len(list(state.glob("ewc@*__stage3.pt"))) == 2 and len(list(state.glob("naive@*__stage3.pt"))) == 1
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["settings"]["ewc.lam"] == 3.0


def test_tune_writes_its_grid_scores_and_choice(cache_env, tmp_path):
    out = tmp_path / "tune"
    assert main(["--profile", "tiny", "--tune", "--out", str(out), "--quiet", "--no-joint"]) == 0
    tune = json.loads((out / "tune.json").read_text())
    assert tune["split"] == "val" and tune["grid"] == {"ewc.lam": [1.0, 10.0]}
    trials = tune["methods"]["ewc"]["trials"]
    assert [t["settings"]["ewc.lam"] for t in trials] == [1.0, 10.0]
    best = max(trials, key=lambda t: (t["score"], t["mean"]))
    assert tune["methods"]["ewc"]["chosen"]["ewc.lam"] == best["settings"]["ewc.lam"]
    assert tune["seeds"] == [100, 101]  # the profile's tune seeds, which no report uses
    for t in trials:  # the worst seed's worst task's final / baseline on val; the mean breaks ties
        assert sorted(t["per_seed"]) == ["100", "101"]
        assert t["score"] == pytest.approx(min(min(r.values()) for r in t["per_seed"].values()))
        for task, v in t["final"].items():
            assert v == pytest.approx((t["per_seed"]["100"][task] + t["per_seed"]["101"][task]) / 2)
        assert t["mean"] == pytest.approx(sum(t["final"].values()) / 3)
        assert t["stage_values"] == {
            "2": {"ewc.lam": t["settings"]["ewc.lam"]},
            "3": {"ewc.lam": t["settings"]["ewc.lam"]},
        }
    assert (out / "ewc_lambda_sensitivity.png").stat().st_size > 0


def test_a_tune_takes_its_recorded_results_instead_of_training_again(cache_env, tmp_path, monkeypatch, capsys):
    """Every result of a tune is recorded in tune-progress.json as it comes: a tune whose folder holds
    only that file (its units gone, as on another machine) trains nothing and writes the same
    tune.json; a record of another configuration is refused with a message."""
    grid = {"baseline.lr": (1e-3, 2e-2), "ewc.lam@2": (1.0, 10.0), "ewc.lam@3": (1.0, 10.0)}
    monkeypatch.setitem(PROFILES, "tiny", replace(PROFILES["tiny"], tune_grid=grid))
    out, again = tmp_path / "tune", tmp_path / "again"
    args = ["--profile", "tiny", "--tune", "--methods", "naive,ewc", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    progress = json.loads((out / "tune-progress.json").read_text())
    assert progress["config"]["profile"] == "tiny"
    results = progress["results"]
    for seed in ("seed100", "seed101"):
        keys = {"baseline/seg/lr=0.001", "baseline/cls/lr=0.02", "joint/joint", "joint/joint-balanced"}
        assert {f"{seed}/{k}" for k in keys} <= set(results)
    tune = json.loads((out / "tune.json").read_text())
    for t in tune["methods"]["ewc"]["trials"]:
        for seed in ("100", "101"):
            final = results[f"seed{seed}/ewc/{json.dumps(t['settings'], sort_keys=True)}"]
            base = tune["baselines_per_seed"][seed]
            assert t["per_seed"][seed] == {k: pytest.approx(v / max(base[k], 1e-9)) for k, v in final.items()}
    # stage 2 is shared by the candidates that differ only in stage 3's λ
    state = out / "state" / "seed100"
    assert len(list(state.glob("ewc@*__stage2.pt"))) == 2 and len(list(state.glob("ewc@*__stage3.pt"))) == 4
    again.mkdir()
    shutil.copy(out / "tune-progress.json", again)
    assert main([*args, "--out", str(again)]) == 0
    assert not (again / "state").exists() or not list((again / "state").rglob("*.pt"))
    redone = json.loads((again / "tune.json").read_text())
    assert {k: v for k, v in redone.items() if k != "provenance"} == {
        k: v for k, v in tune.items() if k != "provenance"
    }
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(out / "tune-progress.json", other)
    assert main([*args, "--out", str(other), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "tune-progress.json records a tune of another configuration" in err and "Traceback" not in err
    _recorded_only_writes_what_is_recorded(out, tmp_path, args, capsys)


def _recorded_only_writes_what_is_recorded(out, tmp_path, args, capsys):
    """--recorded-only trains nothing: a method whose search wants a trial not recorded is marked
    incomplete with that trial listed, its choice the best recorded; a missing baseline is exit 2."""
    tune = json.loads((out / "tune.json").read_text())
    progress = json.loads((out / "tune-progress.json").read_text())
    last = tune["methods"]["ewc"]["trials"][-1]["settings"]  # λ@3's second value, at λ@2's choice
    gone = f"seed100/ewc/{json.dumps(last, sort_keys=True)}"
    cut = tmp_path / "cut"
    cut.mkdir()
    kept = {k: v for k, v in progress["results"].items() if k != gone}
    (cut / "tune-progress.json").write_text(json.dumps({**progress, "results": kept}))
    assert main([*args, "--out", str(cut), "--recorded-only"]) == 0
    assert not (cut / "state").exists() or not list((cut / "state").rglob("*.pt"))
    partial = json.loads((cut / "tune.json").read_text())
    ewc = partial["methods"]["ewc"]
    assert ewc["complete"] is False and ewc["not_run"] == [last]
    assert [t["settings"] for t in ewc["trials"]] == [t["settings"] for t in tune["methods"]["ewc"]["trials"][:-1]]
    recorded = {t["settings"]["ewc.lam@3"]: t for t in ewc["trials"] if t["key"] == "ewc.lam@3"}
    assert (
        ewc["chosen"]["ewc.lam@3"]
        == max(recorded.values(), key=lambda t: (t["score"], t["mean"]))["settings"]["ewc.lam@3"]
    )
    assert "complete" not in partial["methods"]["naive"]
    table = (cut / "tune.md").read_text()
    assert "| ewc (search incomplete) |" in table and "| naive |" in table
    assert (
        "| schedule | loss weights | learning rate |" in table and "| equal | 1 each | the first baseline's |" in table
    )
    assert tune_choices(partial)["methods"]["ewc"]["complete"] is False
    tuned = with_tuned(PROFILES["tiny"], partial)
    assert tuned.tune_incomplete == ("ewc",)
    from clreg.onehead.config import RunRequest, resolve

    cfg = resolve(RunRequest(profile="tiny", methods="ewc", settings_from=str(cut / "tune.json"), out=str(tmp_path)))
    assert "did not finish for ewc" in cfg.settings_provenance
    (cut / "tune-progress.json").write_text(
        json.dumps({**progress, "results": {k: v for k, v in kept.items() if "baseline/det" not in k}})
    )
    capsys.readouterr()
    assert main([*args, "--out", str(cut), "--recorded-only"]) == 2
    err = capsys.readouterr().err
    assert "--recorded-only" in err and "baseline/det" in err and "Traceback" not in err
    assert main(["--profile", "tiny", "--recorded-only", "--out", str(cut)]) == 2
    assert "applies to a --tune" in capsys.readouterr().err


def test_a_combination_starts_from_its_parts_choices_whatever_the_tune_lists(cache_env, tmp_path, monkeypatch):
    """A tune of ewc+lwf alone searches ewc and lwf first (tune.json's ``parts``) and starts the
    combination from their choices: its search is the one of a tune that lists ewc, lwf and ewc+lwf."""
    grid = {"ewc.lam": (1.0, 10.0), "lwf.alpha": (0.5, 2.0)}  # lwf's choice is never the default α 1
    monkeypatch.setitem(PROFILES, "tiny", replace(PROFILES["tiny"], tune_grid=grid))
    args = ["--profile", "tiny", "--tune", "--quiet", "--no-joint"]
    alone, listed = tmp_path / "alone", tmp_path / "listed"
    assert main([*args, "--methods", "ewc+lwf", "--out", str(alone)]) == 0
    listed.mkdir()
    shutil.copy(alone / "tune-progress.json", listed)
    assert main([*args, "--methods", "ewc,lwf,ewc+lwf", "--out", str(listed)]) == 0
    a, b = (json.loads((d / "tune.json").read_text()) for d in (alone, listed))
    assert set(a["parts"]) == {"ewc", "lwf"} and "parts" not in b and list(a["methods"]) == ["ewc+lwf"]
    for part in ("ewc", "lwf"):
        assert a["parts"][part]["chosen"] == b["methods"][part]["chosen"]
    assert a["methods"]["ewc+lwf"] == b["methods"]["ewc+lwf"]
    first = a["methods"]["ewc+lwf"]["trials"][0]["settings"]
    assert first["lwf.alpha"] == a["parts"]["lwf"]["chosen"]["lwf.alpha"] in (0.5, 2.0)


def test_two_tunes_share_one_progress_record(tmp_path):
    """Tunes running at once on one folder: each write merges the file's results, and a result another
    tune recorded is read from the file instead of being computed."""
    from clreg.onehead.experiments.tune import TuneProgress

    path, cfg = tmp_path / "tune-progress.json", {"profile": "tiny"}
    first, second = TuneProgress(path, cfg), TuneProgress(path, cfg)
    assert first.get("ewc/a", lambda: {"seg": 0.5}) == {"seg": 0.5}
    assert second.get("lwf/b", lambda: {"seg": 0.25}) == {"seg": 0.25}

    def never():
        raise AssertionError("computed again")

    assert second.get("ewc/a", never) == {"seg": 0.5} and first.get("lwf/b", never) == {"seg": 0.25}
    assert json.loads(path.read_text())["results"] == {"ewc/a": {"seg": 0.5}, "lwf/b": {"seg": 0.25}}
    with pytest.raises(ValueError, match="another configuration"):
        TuneProgress(path, {"profile": "quick"})


def test_a_run_takes_what_a_tune_chose(cache_env, tmp_path, monkeypatch, capsys):
    """--settings-from TUNE_JSON: the baselines' learning rate per task, the joint schedule and loss
    weights and each tuned method's values (its variant's fixed settings too) replace the profile's,
    --set still overrides, the provenance names the file; a file that is not a tune's is exit 2."""
    from clreg.onehead.config import RunRequest, resolve, seeds_shared_with_tune

    grid = {"baseline.lr": (1e-3, 2e-2), "ewc.lam@2": (1.0, 10.0)}
    variants = {"ewc": [{"fixed": {"ewc.normalize": 1.0}, "grid": grid}]}
    candidates = (("equal", None), ("equal", (4.0, 1.0, 1.0)))
    tiny = replace(PROFILES["tiny"], tune_grid=grid, tune_variants=variants, tune_joint=candidates)
    monkeypatch.setitem(PROFILES, "tiny", tiny)
    out = tmp_path / "tune"
    assert main(["--profile", "tiny", "--tune", "--methods", "naive,ewc", "--out", str(out), "--quiet"]) == 0
    tune = json.loads((out / "tune.json").read_text())
    cfg = resolve(RunRequest(profile="tiny", methods="naive,ewc", settings_from=str(out / "tune.json"),
                             sets={"naive:lr": 0.5}))  # fmt: skip
    assert cfg.profile.baseline_lr == {t: tune["baseline_lr"]["chosen"][t] for t in ("seg", "det", "cls")}
    joint = tune["joint"]
    assert cfg.profile.joint_schedule == joint["chosen"]
    weights = None if "weights" not in joint else dict(zip(("seg", "det", "cls"), joint["weights"]))
    assert cfg.profile.joint_weights == weights
    ewc = cfg.settings_for("ewc")
    assert ewc["ewc.normalize"] == 1.0 and ewc["ewc.lam@2"] == tune["methods"]["ewc"]["chosen"]["ewc.lam@2"]
    assert cfg.settings_for("naive")["lr"] == 0.5  # --set over the tune's choice
    assert str(out / "tune.json") in cfg.settings_provenance and "--set naive:lr=0.5" in cfg.settings_provenance
    table = (out / "tune.md").read_text()
    ewc_trials = tune["methods"]["ewc"]["trials"]
    ewc_best = max(ewc_trials, key=lambda t: (t["score"], t["mean"]))  # the tune's choice is its best trial
    assert ewc_best["settings"] == tune["methods"]["ewc"]["chosen"]
    ewc_row = next(line for line in table.splitlines() if line.startswith("| ewc |"))
    finals = " | ".join(f"{ewc_best['final'][t]:.3f}" for t in ("seg", "det", "cls"))
    assert ewc_row.endswith(f"| {finals} | {ewc_best['score']:.3f} | {len(ewc_trials)} |")
    assert f"ewc.lam@2 {tune['methods']['ewc']['chosen']['ewc.lam@2']:g}" in ewc_row
    choices = json.loads((out / "tune-choices.json").read_text())
    assert choices == tune_choices(tune) and with_tuned(tiny, choices) == with_tuned(tiny, tune)
    monkeypatch.setitem(PROFILES, "tiny", with_tuned(tiny, choices))  # a profile that ships a tune's choices
    assert resolve(RunRequest(profile="tiny", mode="tune")).profile == tiny  # a tune starts before them
    shipped = resolve(RunRequest(profile="tiny"))  # a plain run takes them
    assert shipped.settings_for("ewc")["ewc.lam@2"] == ewc["ewc.lam@2"]
    assert shipped.profile.baseline_lr == cfg.profile.baseline_lr
    with pytest.raises(ValueError, match="--settings-from does not go with --tune"):
        resolve(RunRequest(profile="tiny", mode="tune", settings_from=str(out / "tune.json")))
    assert cfg.profile.tuned_on == (100, 101) and cfg.seeds == (0,) and seeds_shared_with_tune(cfg) == []
    over = resolve(RunRequest(profile="tiny", settings_from=str(out / "tune.json"), first_seed=100, seeds=3))
    assert over.seeds == (100, 101, 102) and seeds_shared_with_tune(over) == [100, 101]
    assert resolve(RunRequest(profile="tiny", mode="tune", first_seed=7, seeds=2)).seeds == (7, 8)
    (tmp_path / "bad.json").write_text('{"grid": {}}')
    assert main(["--profile", "tiny", "--settings-from", str(tmp_path / "bad.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--settings-from" in err and "not a tune.json" in err and "Traceback" not in err


def test_seeds_run_apart_are_read_back_by_the_run_of_all(tiny_run, cache_env, tmp_path):
    """--first-seed K runs seeds K… alone (another process may run the others on the same --out);
    --seeds N then trains nothing and reports them all; only seed 0's models are saved."""
    out = tmp_path / "apart"
    shutil.copytree(tiny_run, out)
    shutil.rmtree(out / "models")
    (out / "results.json").unlink()
    assert main(["--profile", "tiny", "--out", str(out), "--quiet", "--first-seed", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [1] and res["config"]["seeds"] == [1] and not (out / "models").exists()
    trained = {p: p.stat().st_mtime_ns for p in (out / "state").rglob("*.pt")}
    assert any("seed1" in str(p) for p in trained)
    assert main(["--profile", "tiny", "--out", str(out), "--quiet", "--seeds", "2"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "state").rglob("*.pt")} == trained
    both = json.loads((out / "results.json").read_text())
    assert both["seeds"] == [0, 1] and (out / "models" / "ewc.pt").is_file()
    per_seed = both["summary"]["methods"]["ewc"]["final"]["seg"]["per_seed"]
    assert per_seed[1] == pytest.approx(res["summary"]["methods"]["ewc"]["final"]["seg"]["per_seed"][0])
    joint = both["summary"]["joint"]["det"]["per_seed"]
    assert len(joint) == 2 and joint[1] == pytest.approx(res["summary"]["joint"]["det"]["per_seed"][0])
    assert main(["--profile", "tiny", "--out", str(out), "--quiet", "--first-seed", "-1"]) == 2


def test_a_folder_of_the_earlier_unit_layout_is_refused_with_a_message(tiny_run, cache_env, tmp_path, capsys):
    """Units written by an earlier layout (no format tag, SI's state under "si") are not resumed:
    the run stops with a message that names the file and asks for a new --out."""
    out = tmp_path / "old"
    shutil.copytree(tiny_run, out)
    (out / "results.json").unlink()
    unit = out / "state" / "seed0" / "stage1.pt"
    state = torch.load(unit, weights_only=True)
    state.pop("format")
    state["si"] = state.pop("trackers")["si"]
    torch.save(state, unit)
    assert main(["--profile", "tiny", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "stage1.pt was written by another version" in err and "new --out" in err and "Traceback" not in err


def test_the_report_gives_each_tasks_extra_scores(tiny_run):
    """Detection's mAP@[.5:.95] has its line in the report, from the results' own figures."""
    res = json.loads((tiny_run / "results.json").read_text())["summary"]
    line = next(x for x in (tiny_run / "report.md").read_text().splitlines() if x.startswith("mAP@[.5:.95]"))
    for m in ("naive", "ewc"):
        assert f"{m} {res['methods'][m]['final']['det']['map_50_95']:.3f}" in line
    assert line.endswith(f"single-task {res['baselines']['det']['map_50_95']:.3f}.")


def test_tune_searches_baseline_learning_rates_per_stage_values_and_combinations(cache_env, tmp_path, monkeypatch):
    """The baselines' learning rate is chosen per task first; a combination starts from its parts'
    choices and searches its own keys; a variant with fixed settings competes with the plain one."""
    grid = {"baseline.lr": (1e-3, 2e-2), "ewc.lam@3": (1.0, 100.0), "lwf.alpha": (0.5, 2.0)}
    variants = {"ewc": [{"fixed": {}, "grid": grid}, {"fixed": {"ewc.lam@2": 50.0}, "grid": {"ewc.lam@3": (3.0,)}}]}
    monkeypatch.setitem(PROFILES, "tiny", replace(PROFILES["tiny"], tune_grid=grid, tune_variants=variants))
    out = tmp_path / "tune"
    assert main(["--profile", "tiny", "--tune", "--methods", "ewc,lwf,ewc+lwf", "--out", str(out), "--quiet",
                 "--no-joint"]) == 0  # fmt: skip
    tune = json.loads((out / "tune.json").read_text())
    lrs = tune["baseline_lr"]
    for task, trials in lrs["trials"].items():
        assert [t["lr"] for t in trials] == [1e-3, 2e-2]
        assert lrs["chosen"][task] == max(trials, key=lambda t: t["value"])["lr"]
        assert tune["baselines"][task] == max(t["value"] for t in trials)
    ewc = tune["methods"]["ewc"]
    assert [v["fixed"] for v in ewc["variants"]] == [{}, {"ewc.lam@2": 50.0}]
    best = max(ewc["variants"], key=lambda v: max((t["score"], t["mean"]) for t in v["trials"]))
    assert ewc["chosen"] == best["chosen"]
    combo = tune["methods"]["ewc+lwf"]
    first = combo["trials"][0]["settings"]
    assert first["lwf.alpha"] == tune["methods"]["lwf"]["chosen"]["lwf.alpha"]  # started from its parts
    assert [t["settings"]["ewc.lam@3"] for t in combo["trials"][:2]] == [1.0, 100.0]
    assert {t["settings"]["lwf.alpha"] for t in combo["trials"][2:]} == {0.5, 2.0}
    units = {p.name for p in (out / "state" / "seed101").glob("*.pt")}
    assert {"stage1@lr0.001.pt", "stage1@lr0.02.pt", "single__det@lr0.02.pt"} <= units


def test_tune_chooses_the_joint_schedule_and_loss_weights_on_val(cache_env, tmp_path, monkeypatch):
    candidates = (("equal", None), ("balanced", None), ("equal", (1.0, 1.0, 1.0)), ("equal", (4.0, 1.0, 1.0)))
    monkeypatch.setitem(PROFILES, "tiny", replace(PROFILES["tiny"], tune_joint=candidates))
    out = tmp_path / "tune"
    assert main(["--profile", "tiny", "--tune", "--methods", "naive", "--out", str(out), "--quiet"]) == 0
    joint = json.loads((out / "tune.json").read_text())["joint"]
    assert [(t["schedule"], t.get("weights")) for t in joint["trials"]] == [
        ("equal", None), ("balanced", None), ("equal", [1.0, 1.0, 1.0]), ("equal", [4.0, 1.0, 1.0])
    ]  # fmt: skip
    for t in joint["trials"]:
        assert t["score"] == pytest.approx(min(min(r.values()) for r in t["per_seed"].values()))
    best = max(joint["trials"], key=lambda t: (t["score"], t["mean"]))
    assert joint["chosen"] == best["schedule"] and joint.get("weights") == best.get("weights")
    units = {p.name for p in (out / "state" / "seed100").glob("joint*.pt")}
    assert units == {"joint.pt", "joint-balanced.pt", "joint-w1-1-1.pt", "joint-w4-1-1.pt"}
    loss = {u: torch.load(out / "state" / "seed100" / u, weights_only=False)["train"]["loss"] for u in units}
    assert loss["joint-w1-1-1.pt"] == loss["joint.pt"]  # weights of 1 are the unweighted loss, bit for bit
    assert loss["joint-w4-1-1.pt"] != loss["joint.pt"]  # segmentation's weight reaches the loss


def test_a_run_on_the_tunes_seeds_warns_and_says_so_in_the_report(cache_env, tmp_path, monkeypatch, capsys):
    """A profile carrying a tune's choices records the tune's seeds; a run that reports any of them
    logs a warning, lists them in results.json and the report says so."""
    monkeypatch.setitem(PROFILES, "tiny", replace(PROFILES["tiny"], tuned_on=(0, 100)))
    out = tmp_path / "shared"
    assert main(["--profile", "tiny", "--methods", "naive", "--no-joint", "--out", str(out)]) == 0
    assert "warning: training seeds [0] are among those the tune" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["seeds_shared_with_tune"] == [0] and res["config"]["tune_seeds"] == [0, 100]
    assert "**Warning: seeds [0] are reported too**" in (out / "report.md").read_text()


def test_every_stage_sets_every_per_stage_value(cache_env, tmp_path):
    """λ set for stage 2 alone: stage 3 runs with the method's own λ, not the one stage 2's saved
    state carries; each stage's unit records the values it ran with."""
    out = tmp_path / "stages"
    args = ["--profile", "tiny", "--methods", "ewc", "--no-joint", "--out", str(out), "--quiet"]
    assert main([*args, "--set", "ewc.lam=10", "--set", "ewc.lam@2=50"]) == 0
    state = out / "state" / "seed0"
    ran = {
        p.name.split("__")[-1]: torch.load(p, weights_only=False)["train"]["stage_values"]
        for p in state.glob("ewc@*__stage*.pt")
    }
    assert ran == {"stage2.pt": {"ewc.lam": 50.0}, "stage3.pt": {"ewc.lam": 10.0}}


def test_ewc_per_task_lambda_weighs_each_task_by_its_stages_lambda(cache_env, tmp_path):
    """ewc.per_task = 1: the λ of stage k weighs the task consolidated before it (w_t) and EWC's own λ
    is 1, so stage 3's λ reaches detection's Fisher alone: the saved state equals an EWC consolidated
    by hand with TaskSpec(weight=λ@2) on the stage-1 model and TaskSpec(weight=λ@3) on the stage-2 one."""
    from clreg import EWC
    from clreg.onehead.config import RunRequest, resolve
    from clreg.onehead.experiments.workspace import open_workspace

    out = tmp_path / "per_task"
    sets = ["--set", "ewc.per_task=1", "--set", "ewc.lam@2=40", "--set", "ewc.lam@3=7"]
    assert main(["--profile", "tiny", "--methods", "ewc", "--no-joint", "--out", str(out), "--quiet", *sets]) == 0
    state = out / "state" / "seed0"
    load = lambda pattern: torch.load(next(state.glob(pattern)), weights_only=False)  # noqa: E731
    stage1, stage2, stage3 = load("stage1.pt"), load("ewc@*__stage2.pt"), load("ewc@*__stage3.pt")
    assert stage3["train"]["task_weights"] == {"ewc": 7.0} and stage2["train"]["task_weights"] == {"ewc": 40.0}
    cfg = resolve(RunRequest(profile="tiny", out=str(out), quiet=True, methods="ewc"))
    ws = open_workspace(cfg)
    model = ws.make_model()
    by_hand = EWC(model, lam=1.0, seed=0)
    for k, (prior, task) in enumerate(((stage1, "seg"), (stage2, "det"))):
        model.load_state_dict(prior["model"])
        ws.tasks[["seg", "det", "cls"][k + 1]].prepare(model)
        spec = ws.tasks[task].spec
        data = ws.tasks[task].fit_data
        by_hand.consolidate(model, data, replace(spec, weight=(40.0, 7.0)[k]))
    saved = stage3["reg"]
    ours = {k: v for k, v in by_hand.state_dict().items() if isinstance(v, torch.Tensor)}
    for k, v in ours.items():
        torch.testing.assert_close(saved[f"members.0.{k}"], v, msg=k)
    assert saved["members.0._extra_state"]["config"]["lam"] == 1.0  # EWC's own λ; the stages' weigh the tasks


def test_tune_chooses_the_joint_learning_rate_after_its_schedule(cache_env, tmp_path, monkeypatch):
    """With ``joint.lr`` in the grid, the best (schedule, weights) is tried at each rate; the chosen
    rate goes into tune.json, a profile that takes the tune runs the joint reference with it."""
    grid = {"joint.lr": (1e-3, 3e-2)}
    monkeypatch.setitem(PROFILES, "tiny", replace(PROFILES["tiny"], tune_grid=grid, tune_joint=(("full", None),)))
    out = tmp_path / "tune"
    assert main(["--profile", "tiny", "--tune", "--methods", "naive", "--out", str(out), "--quiet"]) == 0
    joint = json.loads((out / "tune.json").read_text())["joint"]
    assert [(t["schedule"], t.get("lr")) for t in joint["trials"]] == [("full", None), ("full", 1e-3), ("full", 3e-2)]
    best = max(joint["trials"], key=lambda t: (t["score"], t["mean"]))
    assert joint["chosen"] == "full" and joint.get("lr") == best.get("lr")
    units = {p.name for p in (out / "state" / "seed100").glob("joint*.pt")}
    assert units == {"joint-full.pt", "joint-full-lr0.001.pt", "joint-full-lr0.03.pt"}
    tuned = with_tuned(PROFILES["tiny"], json.loads((out / "tune.json").read_text()))
    assert tuned.joint_schedule == "full" and tuned.joint_lr == joint.get("lr")


def test_ewc_likelihood_consolidates_detection_without_its_loss():
    """ewc.likelihood = 1: a task with a per-sample loss (detection) is consolidated on its spec
    without it (the mc Fisher of its heatmap's Bernoullis and boxes' Gaussian); others as they are."""
    from clreg import TaskSpec

    on = Method.parse("ewc+lwf", {"ewc.likelihood": 1.0})
    with_loss = TaskSpec(per_sample_loss=lambda out, y: out.sum((1,)))
    assert on.member_spec("ewc", with_loss, {"ewc.lam": 1.0}).per_sample_loss is None
    assert on.member_spec("lwf", with_loss, {"ewc.lam": 1.0}) is with_loss
    off = Method.parse("ewc", {})
    assert off.member_spec("ewc", with_loss, {"ewc.lam": 1.0}) is with_loss
    both = Method.parse("ewc", {"ewc.likelihood": 1.0, "ewc.per_task": 1.0})
    spec = both.member_spec("ewc", with_loss, {"ewc.lam": 30.0})
    assert spec.per_sample_loss is None and spec.weight == 30.0


def test_workers_train_the_units_one_process_would(cache_env, tmp_path):
    """--workers 2 trains the seeds' shared units, then each (seed, method), in two processes of
    one thread each: the same results as one process of one thread, bit for bit."""
    args = ["--profile", "tiny", "--seeds", "2", "--no-joint", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main([*args, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["summary"] for d in ("one", "two"))
    for m in one["methods"]:
        assert one["methods"][m]["R_per_seed"] == two["methods"][m]["R_per_seed"]
    assert {t: b["per_seed"] for t, b in one["baselines"].items()} == {
        t: b["per_seed"] for t, b in two["baselines"].items()
    }
    units = lambda d: sorted(p.relative_to(tmp_path / d) for p in (tmp_path / d / "state").rglob("*.pt"))  # noqa: E731
    assert units("one") == units("two")


@pytest.mark.parametrize(
    ("start", "peak", "tried"),
    [
        (2.0, 8.0, [1, 2, 4, 8, 16]),  # climbs up from 2 to the peak, one past it
        (32.0, 1.0, [1, 2, 4, 8, 16, 32]),  # from the upper edge down to the lower
        (8.0, 8.0, [4, 8, 16]),  # already at the peak: its neighbours only
        (None, 2.0, [1, 2, 4, 8, 16]),  # no start: the middle (8), then down
        (1.0, 1.0, [1, 2]),  # at the lower edge: one neighbour
    ],
)
def test_climb_tries_the_start_its_neighbours_then_on_while_the_score_rises(start, peak, tried):
    from clreg.onehead.experiments.tune import climb

    calls = []

    def trial(v):
        calls.append(v)
        return {"settings": {"x": v}, "score": -abs(math.log(v) - math.log(peak)), "mean": 0.0}

    out = climb([32, 1, 2, 4, 8, 16], start, trial)
    assert [t["settings"]["x"] for t in out] == tried and len(calls) == len(set(calls)) == len(tried)
    assert max(out, key=lambda t: t["score"])["settings"]["x"] == peak
    assert [t["settings"]["x"] for t in climb([5.0], start, trial)] == [5.0]


def test_feature_distillation_runs_on_the_neck_within_the_rules(cache_env, tmp_path):
    out = tmp_path / "fd"
    args = ["--profile", "tiny", "--methods", "fd,lwf+fd", "--set", "fd.alpha=0.1", "--no-joint", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["within_rules"] == {"fd": True, "lwf+fd": True}
    for m in ("fd", "lwf+fd"):
        r = res["summary"]["methods"][m]
        assert len(r["R"]) == 3 and r["regularizer_bytes"] > 0  # the teacher's parameters and buffers
