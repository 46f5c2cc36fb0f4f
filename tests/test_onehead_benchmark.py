"""The three-stage benchmark: the tiny profile end to end, resume after a kill, the report's
measures against hand computations, the generic harness on another model, and bad inputs."""

from __future__ import annotations

import json
import math
import os
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

from clreg import TaskSpec
from clreg.onehead import benchmark, harness
from clreg.onehead.benchmark import main
from clreg.onehead.harness import HarnessTask, Runner, RunSettings, Stage, cosine_schedule, evaluation_record
from clreg.onehead.methods import Method, parse_methods
from clreg.onehead.metrics import ClassificationMetric
from clreg.onehead.profiles import PROFILES
from clreg.onehead.report import judge, sequence_measures, summarise

TIMING_KEYS = {"train_seconds", "peak_rss_bytes", "provenance", "seconds", "figures"}


def _strip(tree):
    """results.json without what legitimately differs between two runs (timings, memory, dates)."""
    if isinstance(tree, dict):
        return {k: _strip(v) for k, v in tree.items() if k not in TIMING_KEYS}
    if isinstance(tree, list):
        return [_strip(v) for v in tree]
    return tree


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield cache
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module")
def tiny_run(cache_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert main(["--profile", "tiny", "--out", str(out), "--quiet"]) == 0
    return out


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
    from clreg import ReplayBuffer

    buf = ReplayBuffer(10)
    buf.load_state_dict(state)
    return buf


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "naive,foo"], "unknown method part"),
        (["--methods", "naive+ewc"], "cannot be combined"),
        (["--set", "ewc.lam"], "NAME=VALUE"),
        (["--set", "bogus=1"], "unknown setting"),
        (["--set", "ewc.lam=abc"], "not a number"),
        (["--seeds", "0"], "--seeds"),
        (["--data-root", "/nonexistent/data"], "no such folder"),
        (["--backbone-weights", "/nonexistent/w.pt"], "no such file"),
        (["evaluate", "--checkpoint", "/nonexistent.pt", "--data-root", "."], "checkpoint not found"),
    ],
)
def test_bad_inputs_give_a_message_and_exit_2(argv, message, capsys, tmp_path):
    argv = argv if argv[0] == "evaluate" else ["--profile", "tiny", "--out", str(tmp_path / "o"), *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_data_root_and_unreadable_checkpoint(tmp_path, capsys):
    (tmp_path / "mini_voc_seg").mkdir()
    assert main(["--profile", "tiny", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "lacks" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["evaluate", "--checkpoint", str(bad), "--data-root", str(tmp_path)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_a_changed_configuration_is_refused(tiny_run, capsys):
    assert main(["--profile", "tiny", "--out", str(tiny_run), "--bn", "freeze", "--quiet"]) == 2
    assert "another configuration" in capsys.readouterr().err
    assert main(["--profile", "tiny", "--out", str(tiny_run), "--set", "lr=0.01", "--quiet"]) == 2


def test_new_method_settings_reuse_stage_one_and_the_baselines(tiny_run, cache_env, tmp_path):
    import shutil

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
    for t in trials:  # the score is the worst task's final / baseline on val, the mean breaks ties
        assert t["score"] == pytest.approx(min(t["final"].values()))
        assert t["mean"] == pytest.approx(sum(t["final"].values()) / 3)
    assert (out / "ewc_lambda_sensitivity.png").stat().st_size > 0


# -- the report's measures by hand ----------------------------------------------------------------


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
        out = {"value": value, "lo": float(boot.min()), "hi": float(boot.max()), "n": 10, "boot": boot}
        if ap is not None:
            out |= {"map_50_95": ap, "per_class_ap": {"a": ap, "b": 2 * ap}}
        return out

    def seed(a, b):
        evals = lambda s, d: {"s": rec(s, 0.01), "d": rec(d, 0.02, ap=d / 2)}  # noqa: E731
        return {
            "single": {"s": {"evals": evals(a, 0.0)}, "d": {"evals": evals(0.0, b)}},
            "methods": {
                "m": [
                    {"evals": evals(a, 0.0)},
                    {"evals": evals(a / 2, b), "train": {"seconds": 3.0}, "regularizer_bytes": 8, "peak_rss": 5},
                ]
            },
        }

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


def test_methods_parse_and_rules():
    assert parse_methods("naive, ewc ,ewc+lwf+replay") == ["naive", "ewc", "ewc+lwf+replay"]
    assert not Method.parse("si").within_rules and not Method.parse("ewc+mas").within_rules
    assert Method.parse("lwf+replay").within_rules
    with pytest.raises(ValueError, match="repeats"):
        Method.parse("ewc+ewc")


# -- the harness is generic: another model, another task list ----------------------------------------


class _Toy(torch.utils.data.Dataset):
    def __init__(self, w: torch.Tensor, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x @ w).argmax(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_harness_runs_another_model_and_task_list(tmp_path):
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(6, 3, generator=g) for _ in range(2)]

    def make_task(name: str, w: torch.Tensor, k: int) -> HarnessTask:
        train, test = _Toy(w, 64, 10 + k), _Toy(w, 200, 20 + k)

        def loss(out, y):
            return torch.nn.functional.cross_entropy(out[name], y, reduction="none")

        def evaluate(model):
            metric = ClassificationMetric(3)
            with torch.no_grad():
                metric.update(model(test.x)[name], test.y, ids=list(range(len(test))))
            return metric

        return HarnessTask(name, train, loss, TaskSpec(outputs=[]), evaluate, "Top-1", chance=1 / 3)

    class TwoHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(6, 16)
            self.a, self.b = torch.nn.Linear(16, 3), torch.nn.Linear(16, 3)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return {"a": self.a(h), "b": self.b(h)}

    from clreg import OutputSpec

    tasks = {n: make_task(n, w, k) for k, (n, w) in enumerate(zip("ab", ws))}
    for n in "ab":
        tasks[n].spec = TaskSpec(outputs=[OutputSpec(select=n, kind="softmax")])
    stages = [Stage("a", 60, 0.02), Stage("b", 60, 0.02)]
    runner = Runner(TwoHead, tasks, stages, RunSettings(batch_size=16, resamples=100, progress=False), tmp_path,
                    log_line=lambda s: None)  # fmt: skip
    naive = runner.method(Method.parse("naive"))
    lwf = runner.method(Method.parse("lwf", {"lwf.alpha": 10.0}))
    assert naive[0]["evals"]["a"]["value"] > 0.7  # task a learned in stage 1
    # both runs start stage 2 from the same stage-1 state; LwF keeps more of task a
    assert lwf[1]["evals"]["a"]["value"] >= naive[1]["evals"]["a"]["value"]
    rec = evaluation_record(tasks["a"].evaluate(TwoHead()), 100)
    assert rec["boot"].shape == (100,) and rec["lo"] <= rec["value"] <= rec["hi"] + 1e-12
    assert math.isfinite(rec["value"])


def test_backbone_learning_rate_scale_applies_to_backbone_parameters_only():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            return {"a": self.head(torch.relu(self.backbone(x)))}

    from clreg.onehead.harness import train_steps

    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    task = HarnessTask("a", _Toy(torch.randn(6, 3), 32, 0), lambda o, y: torch.nn.functional.cross_entropy(
        o["a"], y, reduction="none"), TaskSpec(), lambda m: None)  # fmt: skip
    train_steps(net, [task], 5, 0.1, RunSettings(batch_size=8, progress=False, backbone_lr_scale=0.0), 0)
    after = net.state_dict()
    assert torch.equal(before["backbone.weight"], after["backbone.weight"])
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_cosine_schedule_with_and_without_warmup() -> None:
    plain, warm = cosine_schedule(200), cosine_schedule(200, warmup_steps=20)
    for s in (0, 1, 19, 20, 57, 100, 199, 200, 250):
        cosine = 0.5 * (1 + math.cos(math.pi * min(s, 200) / 200))
        assert plain(s) == cosine  # no warmup: exactly the cosine factor
        assert warm(s) == pytest.approx(cosine * min(1.0, (s + 1) / 20), abs=1e-15)
    assert warm(0) == pytest.approx(0.05 * 1.0, abs=1e-6)  # (0 + 1) / 20 of the peak, cos(0) = 1
    assert warm(9) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 9 / 200)))
    assert warm(19) == plain(19) and warm(200) == 0.0
    with pytest.raises(ValueError, match="warmup_steps"):
        RunSettings(warmup_steps=-1)


def test_scratch_profile_trains_from_random_init_with_its_warmup(cache_env, tmp_path, monkeypatch) -> None:
    """The scratch profile resolves to a random backbone, 160 px, per-task learning rates and
    warmups; a stage's warmup reaches the RunSettings its task is trained with."""
    _, config = benchmark._resolve(benchmark.build_parser().parse_args(["--profile", "scratch"]))
    assert config["backbone"] == {"kind": "random"} and config["size"] == 160
    assert config["stage_lr"] == [1e-2, 1.2e-2, 8e-3] and config["stage_warmup"] == [100, 100, 300]
    assert config["data"]["synthetic"]["key"] == "v3-6ac595463621"  # the synthetic default

    seen = []

    class Stop(Exception):
        pass

    def train_steps(model, tasks, steps, lr, run, seed, **kwargs):
        seen.append((kwargs["desc"], lr, run.warmup_steps))
        raise Stop

    monkeypatch.setitem(PROFILES, "tiny", replace(PROFILES["tiny"], stage_warmup=(2, 3, 4), stage_lr=(0.5, 0.6, 0.7)))
    monkeypatch.setattr(harness, "train_steps", train_steps)
    with pytest.raises(Stop):
        benchmark.main(["--profile", "tiny", "--out", str(tmp_path / "o"), "--quiet"])
    assert seen == [("stage 1 (seg)", 0.5, 2)]
    # every later stage takes its own warmup the same way; None keeps the run's
    runner = Runner.__new__(Runner)
    runner.run = RunSettings(warmup_steps=5)
    assert runner._run(Stage("det", 10, warmup_steps=3)).warmup_steps == 3
    assert runner._run(Stage("det", 10)).warmup_steps == 5
