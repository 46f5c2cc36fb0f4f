"""The harness: setting keys, typed parts, methods, stages, runs, the store, the summary, the tune, the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("sklearn")

from clreg.bench import Method, SettingKey, Stage, make_scenario, run, run_baseline
from clreg.bench.cli import _check_seeds, main, parse_seeds
from clreg.bench.experiment import run_all
from clreg.bench.parts import PARTS
from clreg.bench.runner import RunResult, effective_settings
from clreg.bench.stats import MeanMetric, resample_counts, standard_counts
from clreg.bench.store import RunStore
from clreg.bench.summary import average_interval, sequence_measures, summarise
from clreg.bench.tune import tune
from clreg.spec import TaskSpec


@pytest.fixture(scope="module")
def tiny():
    return make_scenario("digits", setting="class", epochs=1)


def short(scenario, n=3, steps=4, order=None):
    return [dataclasses.replace(s, steps=steps) for s in scenario.stages(order)[:n]]


# -- setting keys ------------------------------------------------------------------------------------
words = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)


@settings(max_examples=50, deadline=None)
@given(part=words, name=words, stage=st.none() | st.integers(1, 9), method=st.none() | words)
def test_setting_key_round_trip(part, name, stage, method):
    key = SettingKey(part, name, stage, method)
    assert SettingKey.parse(str(key)) == key


def test_setting_key_parts_and_errors():
    key = SettingKey.parse("ewc+lwf:lwf.alpha@2")
    assert (key.method, key.part, key.name, key.stage) == ("ewc+lwf", "lwf", "alpha", 2)
    assert key.base == SettingKey("lwf", "alpha")
    assert SettingKey.parse("lr@3") == SettingKey("", "lr", 3)
    for bad in ("ewc.", "ewc.lam@", "ewc.lam@0", "EWC.lam", "a.b.c", "ewc lam"):
        with pytest.raises(ValueError, match="setting"):
            SettingKey.parse(bad)
    with pytest.raises(TypeError):
        SettingKey.parse(3)


# -- parts and methods -------------------------------------------------------------------------------
def test_part_values_are_converted_by_type():
    ewc = PARTS["ewc"].from_values({"lam": "1e4", "normalize": "true", "per_task": 0})
    assert (ewc.lam, ewc.normalize, ewc.per_task) == (1e4, True, False)
    assert PARTS["replay"].from_values({"capacity": 20.0}).capacity == 20
    with pytest.raises(ValueError, match="whole number"):
        PARTS["replay"].from_values({"capacity": 2.5})
    with pytest.raises(ValueError, match="true or false"):
        PARTS["ewc"].from_values({"normalize": 2})
    with pytest.raises(ValueError, match="a number"):
        PARTS["ewc"].from_values({"lam": "big"})
    with pytest.raises(ValueError, match=r"unknown setting.*ewc.lambda"):
        PARTS["ewc"].from_values({"lambda": 1.0})


def test_ewc_per_task_weighs_the_spec_and_leaves_lambda_at_one():
    ewc = PARTS["ewc"].from_values({"per_task": 1, "likelihood": 1})
    spec = TaskSpec(per_sample_loss=lambda out, y: out.sum(1), weight=2.0)
    weighted = ewc.member_spec(spec, {"lam": 5.0})
    assert weighted.weight == 10.0 and weighted.per_sample_loss is None
    assert ewc.attributes({"lam": 5.0}) == {"lam": 1.0}
    assert PARTS["ewc"].from_values({}).attributes({"lam": 5.0}) == {"lam": 5.0}


def test_parts_declare_their_data_pass_task_weight_and_first_stage_tracker():
    assert {n for n, p in PARTS.items() if p.data_pass} == {"ewc", "online_ewc", "kfac_ewc", "mas"}
    assert PARTS["ewc"].from_values({"per_task": 1}).task_weight({"lam": 4.0}) == 4.0
    assert PARTS["ewc"].from_values({}).task_weight({"lam": 4.0}) is None
    model = torch.nn.Linear(3, 2)
    assert [n for n, p in PARTS.items() if p.first_stage_tracker(model) is not None] == ["si"]
    with pytest.raises(TypeError, match="tracks no first stage"):
        PARTS["ewc"].from_values({}).take_over(None, {})


def test_si_takes_the_first_stage_path_over_with_its_own_settings():
    """The tracker's path integral after three SGD steps, against ω = −Σ g · Δθ written here."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    tracker = PARTS["si"].first_stage_tracker(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker.track(opt)
    omega = [torch.zeros_like(p) for p in model.parameters()]
    x = torch.randn(4, 3)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for o, g, b, p in zip(omega, grads, before, model.parameters()):
            o -= g * (p.detach() - b)
    tracker.detach()
    si = PARTS["si"].from_values({"c": 5.0, "xi": 0.01})
    member = si.regularizer(model, 0, None)
    si.take_over(member, tracker.state_dict())
    assert (member.c, member.xi) == (5.0, 0.01)
    torch.testing.assert_close(list(member.omega.tensors), omega)


def test_a_methods_members_share_one_gradient_ledger(tiny):
    """SI's path subtracts what the other members' penalties added to the gradient: the members of a
    method share one ledger, as the members of one Compose do."""
    from clreg.bench.parts import PartContext
    from clreg.bench.runner import _Members

    model = tiny.make_model(tiny.task_list(tiny.stages()))
    members = _Members(Method.parse("ewc+si+lwf"), model, 0, PartContext())
    ledgers = {id(reg.ledger) for reg in members.regs.values()}
    assert len(members.regs) == 3 and len(ledgers) == 1


def test_check_settings_converts_by_type_and_names_the_bad_one():
    from clreg.bench.method import check_settings

    out = check_settings({"ewc.lam@2": "1e4", "replay.capacity": 10.0, "lr": 1e-3})
    assert out == {SettingKey("ewc", "lam", 2): 1e4, SettingKey("replay", "capacity"): 10, SettingKey("", "lr"): 1e-3}
    assert isinstance(out[SettingKey("replay", "capacity")], int)
    with pytest.raises(ValueError, match="cannot change between stages"):
        check_settings({"replay.capacity@2": 3})


def test_method_parse_scopes_and_stages():
    settings = {"ewc.lam": 10, "ewc.lam@3": 100, "lwf.alpha": 2, "lwf:lwf.alpha": 7, "mas.lam": 3, "lr": 0.01}
    m = Method.parse("ewc+lwf", settings)
    assert m.name == "ewc+lwf" and m.lr == 0.01 and m.part("lwf").alpha == 2.0
    assert Method.parse("lwf", settings).part("lwf").alpha == 7.0  # scoped to the method "lwf"
    assert m.stage_values(1) == {"ewc": {"lam": 10.0}, "lwf": {"alpha": 2.0}}
    assert m.stage_values(3)["ewc"] == {"lam": 100.0}
    # a stage's own value is used where the method sets none for that stage
    assert m.stage_values(2, {"ewc.lam": 5.0})["ewc"] == {"lam": 5.0}
    assert m.stage_values(3, {"ewc.lam": 5.0})["ewc"] == {"lam": 100.0}
    assert m.effective(3)["ewc.lam"] == [10.0, 10.0, 100.0]
    assert m.stage_lr(2, 1e-3) == 0.01 and Method.parse("ewc").stage_lr(2, 1e-3) == 1e-3
    assert Method.parse("ewc", {"lr@2": 0.5}).stage_lr(2, 1e-3) == 0.5
    assert m.within_rules and not Method.parse("si").within_rules
    assert Method.parse("ewc+replay").replay is not None and m.replay is None


@pytest.mark.parametrize(
    "name, settings, match",
    [
        ("ewc+foo", {}, "unknown method part"),
        ("ewc+ewc", {}, "repeats"),
        ("naive+ewc", {}, "cannot be combined"),
        ("ewc", {"ewc.normalize@2": 1}, "cannot change between stages"),
        ("ewc", {"ewc.lamda": 1}, "unknown setting"),
        ("ewc", {"foo.lam": 1}, "no part named"),
        ("ewc", {"momentum": 1}, "unknown setting"),
        ("ewc", {"ewc.lam": "x"}, "a number"),
        ("ewc", {"ewc.lam": 1, SettingKey("ewc", "lam"): 2}, "twice"),
    ],
)
def test_method_parse_errors(name, settings, match):
    with pytest.raises(ValueError, match=match):
        Method.parse(name, settings)


def test_stage_checks():
    assert Stage("a", 3, 1e-3, settings={"ewc.lam": 2}).settings == {"ewc.lam": 2.0}
    for kwargs, match in [
        ({"steps": 0}, "steps"),
        ({"steps": 2.0}, "steps"),
        ({"warmup": -1}, "warmup"),
        ({"lr": 0.0}, "lr"),
        ({"settings": {"ewc.lam@2": 1.0}}, "plain names"),
        ({"settings": {"ewc.lamda": 1.0}}, "unknown setting"),
        ({"settings": {"ewc.normalize": 1.0}}, "cannot change between stages"),
        ({"settings": {"lr": 1.0}}, "Stage.lr"),
    ]:
        with pytest.raises(ValueError, match=match):
            Stage(**{"task": "a", "steps": 3, "lr": 1e-3, **kwargs})


def test_unknown_scenario_and_option():
    with pytest.raises(ValueError, match="unknown scenario"):
        make_scenario("nope")
    with pytest.raises(ValueError, match="digits"):
        make_scenario("digits", colour="red")
    with pytest.raises(ValueError, match="setting"):
        make_scenario("digits", setting="pixel")


# -- runs ----------------------------------------------------------------------------------------------
def test_run_is_deterministic_and_its_first_stage_is_the_baseline(tiny):
    stages = short(tiny)
    a = run(tiny, "naive", stages, seed=3, split="val")
    b = run(tiny, "naive", stages, seed=3, split="val")
    c = run(tiny, "naive", stages, seed=4, split="val")
    assert a.matrix == b.matrix and a.matrix != c.matrix
    assert len(a.matrix) == 3 and all(len(row) == 3 for row in a.matrix)
    base = run_baseline(tiny, stages, seed=3, split="val")
    # stage 1 of any run is the first task trained alone from the same initialisation
    assert a.matrix[0][0] == base[0].value()
    _, y = tiny.tasks["01"].data("val").tensors
    assert base[0].n == len(y)


def test_run_in_another_order(tiny):
    stages = short(tiny, n=2, order=["23", "01"])
    result = run(tiny, "ewc", stages, seed=0, split="val", settings={"ewc.lam": 1.0})
    assert result.tasks == ["23", "01"]
    first = run(tiny, "naive", stages[:1], seed=0, split="val")
    assert result.matrix[0][0] == first.matrix[0][0]  # "23" trained first


def test_replay_keeps_an_old_task_that_naive_forgets():
    scenario = make_scenario("digits", setting="class", epochs=10)
    stages = scenario.stages()[:2]
    naive = run(scenario, "naive", stages, seed=0, split="val")
    replay = run(scenario, "replay", stages, seed=0, split="val", settings={"replay.capacity": 20})
    assert naive.matrix[0][0] > 0.9 and naive.matrix[1][0] < 0.1  # class-incremental: task 1 is lost
    assert replay.matrix[1][0] > 0.5


def test_joint_trains_every_task_at_once(tiny):
    stages = short(tiny, n=2, steps=6)
    result = run(tiny, "joint", stages, seed=0, split="val", settings={"lr": 2e-3})
    assert len(result.matrix) == 1 and len(result.matrix[0]) == 2
    assert result.settings == {"lr": 2e-3, "steps": 6}


def test_effective_settings_hold_every_stage(tiny):
    stages = short(tiny, n=3)
    eff = effective_settings("ewc+replay", stages, {"ewc.lam": 2.0, "ewc.lam@2": 3.0})
    assert eff["ewc.lam"] == [2.0, 3.0, 2.0]
    assert eff["replay.capacity"] == 10 and eff["lr"] == [1e-3] * 3


# -- store and summary ----------------------------------------------------------------------------------
def _result(method="naive", seed=0, matrix=((1.0,),), per_sample=((1.0, 0.0),)):
    final = [MeanMetric(torch.tensor(v)) for v in per_sample]
    return RunResult(method, seed, "test", ["a"] * len(final), [list(r) for r in matrix], final, {"lr": [1e-3]})


def test_store_round_trip_and_mismatch(tmp_path):
    store = RunStore(tmp_path)
    store.save(_result(per_sample=((1.0, 0.0, 1.0),)), {"scenario": "s"})
    back = store.load("naive", 0, "test", {"lr": [1e-3]}, {"scenario": "s"})
    assert back.final[0].per_sample.tolist() == [1.0, 0.0, 1.0]
    assert store.load("naive", 0, "test", {"lr": [2e-3]}, {"scenario": "s"}) is None
    assert store.load("naive", 0, "test", {"lr": [1e-3]}, {"scenario": "t"}) is None
    assert store.load("naive", 1, "test", {"lr": [1e-3]}, {"scenario": "s"}) is None
    assert not list(tmp_path.rglob("*.tmp"))
    bad = _result()
    bad.final = [object()]
    with pytest.raises(TypeError, match="Metric"):
        store.save(bad, {})


class RatioMetric:
    """A metric that is not a per-sample mean: the ratio of two sums over the images (as mIoU is)."""

    def __init__(self, hits, totals):
        self.hits, self.totals = torch.tensor(hits, dtype=torch.float64), torch.tensor(totals, dtype=torch.float64)
        self.n = len(hits)

    def value(self):
        return float(self.hits.sum() / self.totals.sum())

    def scores(self, counts):
        return (counts @ self.hits) / (counts @ self.totals)

    def image_ids(self):
        return [f"img{i}" for i in range(self.n)]


def test_store_keeps_a_metric_that_is_not_a_mean_by_its_standard_resamples(tmp_path):
    metric = RatioMetric([1.0, 0.0, 3.0, 2.0], [2.0, 1.0, 4.0, 2.0])
    result = _result()
    result.final = [metric, MeanMetric(torch.tensor([1.0, 0.0]), ids=["a", "b"])]
    store = RunStore(tmp_path)
    store.save(result, {"scenario": "s"})
    back = store.load("naive", 0, "test", {"lr": [1e-3]}, {"scenario": "s"}).final
    assert back[0].value() == pytest.approx(6.0 / 9.0)
    assert back[0].image_ids() == ["img0", "img1", "img2", "img3"] and back[0].n == 4
    counts = standard_counts(4)
    by_hand = torch.tensor([float(c @ metric.hits / (c @ metric.totals)) for c in counts], dtype=torch.float64)
    torch.testing.assert_close(back[0].scores(counts), by_hand)
    assert back[0].scores(torch.ones(3, 4)).tolist() == [pytest.approx(6.0 / 9.0)] * 3
    with pytest.raises(ValueError, match="standard resamples"):
        back[0].scores(resample_counts(4, 1000, seed=1))
    with pytest.raises(ValueError, match=r"\(R, 4\)"):
        back[0].scores(torch.ones(2, 3))
    assert back[1].per_sample.tolist() == [1.0, 0.0] and back[1].image_ids() == ["a", "b"]


def test_sequence_measures_by_hand():
    m = [[0.9, 0.2, 0.1], [0.6, 0.8, 0.1], [0.3, 0.7, 0.9]]
    out = sequence_measures(m)
    assert out["acc"] == pytest.approx((0.3 + 0.7 + 0.9) / 3)
    assert out["bwt"] == pytest.approx(((0.3 - 0.9) + (0.7 - 0.8)) / 2)
    assert out["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.7)) / 2)


def test_one_seed_interval_is_the_sample_bootstrap():
    g = torch.Generator().manual_seed(0)
    per_task = [(torch.rand(40, generator=g) < p).double() for p in (0.3, 0.8)]
    runs = [_result(matrix=((0.0, 0.0),), per_sample=[t.tolist() for t in per_task])]
    lo, hi = average_interval(runs, resamples=500)
    # the definition: task t's 500 resamples (counts seeded by its size), ACC's replicate the mean over tasks
    reps = []
    for t in per_task:
        idx = torch.randint(0, t.numel(), (500, t.numel()), generator=torch.Generator().manual_seed(t.numel()))
        reps.append(t[idx].mean(1))
    ref = torch.quantile(torch.stack(reps).mean(0), torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert (lo, hi) == pytest.approx((float(ref[0]), float(ref[1])))


def test_disagreeing_seeds_widen_the_interval():
    def runs(ps):
        g = torch.Generator().manual_seed(1)
        return [
            _result(seed=i, matrix=((p,),), per_sample=[(torch.rand(200, generator=g) < p).double().tolist()])
            for i, p in enumerate(ps)
        ]

    agree = average_interval(runs([0.6, 0.6, 0.6, 0.6, 0.6]))
    disagree = average_interval(runs([0.2, 0.9, 0.3, 0.95, 0.6]))
    assert disagree[1] - disagree[0] > 3 * (agree[1] - agree[0])
    summary = summarise({"m": runs([0.2, 0.9])})
    assert summary["m"]["seeds"] == [0, 1] and summary["m"]["acc_std"] > 0.3


# -- experiment, tune, CLI ----------------------------------------------------------------------------
def test_run_all_reads_back_from_the_store(tmp_path, tiny):
    stages = short(tiny, n=2)
    store, lines = RunStore(tmp_path), []
    first = run_all(tiny, ["naive"], [0, 1], "val", stages=stages, store=store, progress=lines.append)
    again = run_all(tiny, ["naive"], [0, 1], "val", stages=stages, store=store, progress=lines.append)
    assert [r.matrix for r in first["naive"]] == [r.matrix for r in again["naive"]]
    assert any("read back" in line for line in lines) and sum("[" in line for line in lines) == 2
    lines.clear()  # other steps per stage: nothing is read back
    longer = [dataclasses.replace(s, steps=s.steps + 1) for s in stages]
    run_all(tiny, ["naive"], [0], "val", stages=longer, store=store, progress=lines.append)
    assert not any("read back" in line for line in lines) and sum("[" in line for line in lines) == 1


def test_tune_picks_the_best_trial_and_flags_edges(tiny):
    grid = {"lwf.alpha": (0.1, 10.0), "replay.per_step": (4.0, 8.0)}
    out = tune(tiny, ["lwf", "lwf+replay"], grid, seeds=[100], progress=None)
    lwf = out["lwf"]
    assert lwf["score"] == max(t["score"] for t in lwf["trials"]) and len(lwf["trials"]) == 2
    assert lwf["edges"] == ["lwf.alpha"]  # a two-value grid: any choice is an edge
    combo = out["lwf+replay"]
    assert combo["score"] == max(t["score"] for t in combo["trials"])
    assert set(combo["settings"]) == {"lwf.alpha", "replay.per_step"}


def test_cli_report(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["--scenario", "digits", "--setting", "class", "--option", "epochs=1", "--methods", "naive,ewc"]
    assert main([*args, "--seeds", "0", "--workers", "1", "--out", str(out), "--set", "ewc.lam=5"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"naive", "ewc"}
    assert report["methods"]["ewc"]["settings"]["ewc.lam"] == [5.0] * 5
    assert "| naive |" in (out / "report.md").read_text()
    assert main([*args, "--seeds", "x", "--out", str(out)]) == 2
    assert "seeds" in capsys.readouterr().err


def test_cli_help_names_the_scenarios(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "digits" in capsys.readouterr().out


def test_seeds_parse_and_overlap_warning():
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(ValueError):
        parse_seeds("1,1")
    with pytest.warns(UserWarning, match="tune seeds"):
        _check_seeds([0, 1, 100], [100, 101])


# -- the rest of the family ------------------------------------------------------------------------------
def test_family_parts_hooks(tiny):
    from clreg.bench.parts import PartContext

    tasks = list(tiny.tasks.values())
    context = PartContext(tuple(tasks), ("trunk",))
    model = tiny.make_model(tasks)
    x, y = tasks[0].data("train").tensors
    x, y = x[:8], y[:8]
    der = PARTS["der"].from_values({"capacity": 5})
    reg = der.regularizer(model, 0, context)
    der.observe(reg, x, y, model(x).detach())
    assert len(reg.buffer) == 5  # a reservoir of 5 from 8 samples seen
    er_ace = PARTS["er_ace"].from_values({})
    reg = er_ace.regularizer(model, 0, context)
    out = model(x)
    # the incoming loss: the cross-entropy over the classes present in the batch (0 and 1 here)
    expected = torch.nn.functional.cross_entropy(out[:, :2], y)
    torch.testing.assert_close(er_ace.task_loss(reg, tasks[0], out, y), expected)
    fd = PARTS["fd"].from_values({"alpha": 2.0})
    reg = fd.regularizer(model, 0, context)
    assert reg.alpha == 2.0
    with pytest.raises(ValueError, match="feature modules"):
        fd.regularizer(model, 0, PartContext(tuple(tasks)))
    agem = PARTS["agem"].from_values({"capacity": 4})
    assert agem.regularizer(model, 0, context).memory.capacity_per_task == 4


@pytest.mark.parametrize("method", ["der", "derpp", "er_ace", "agem", "fd"])
def test_family_methods_run(tiny, method):
    result = run(tiny, method, short(tiny, n=2, steps=3), seed=0, split="val")
    assert len(result.matrix) == 2 and all(0.0 <= v <= 1.0 for row in result.matrix for v in row)


def test_labels_as_output_indices_are_refused_with_a_head_per_task():
    scenario = make_scenario("digits", setting="task", epochs=1)
    for method in ("derpp", "er_ace"):
        with pytest.raises(ValueError, match="selects channels"):
            run(scenario, method, short(scenario, n=2, steps=2), seed=0, split="val")
    assert "derpp" not in scenario.methods and "der" in scenario.methods
    run(scenario, "der", short(scenario, n=2, steps=2), seed=0, split="val")  # DER's MSE reads every output


def test_saved_model_in_another_order_loads_and_scores(tmp_path, tiny, capsys):
    from clreg.bench.checkpoint import evaluate_model, load_model

    stages = short(tiny, n=3, order=["45", "23", "01"])
    result = run(tiny, "ewc", stages, seed=1, split="test", save=tmp_path / "m.pt")
    scenario, tasks, _, meta = load_model(tmp_path / "m.pt")
    assert [t.name for t in tasks] == ["45", "23", "01"] and scenario.options == tiny.options
    assert meta["method"] == "ewc" and meta["seed"] == 1
    assert list(evaluate_model(tmp_path / "m.pt", "test").values()) == result.matrix[-1]
    assert main(["--evaluate", str(tmp_path / "m.pt")]) == 0
    assert "45: " in capsys.readouterr().out
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a clreg\\.bench model"):
        load_model(tmp_path / "other.pt")


def test_cli_saves_models(tmp_path):
    out = tmp_path / "r"
    args = ["--scenario", "digits", "--option", "epochs=1", "--methods", "naive", "--seeds", "0"]
    assert main([*args, "--workers", "1", "--out", str(out), "--save-models"]) == 0
    assert (out / "models" / "naive-seed0.pt").exists()
    with pytest.raises(SystemExit):
        main(["--methods", "naive"])  # neither --scenario nor --evaluate


@pytest.mark.parametrize("setting", ["task", "domain", "class"])
def test_shipped_digits_choices_were_tuned_on_seeds_the_report_does_not_use(setting):
    scenario = make_scenario("digits", setting=setting)
    shipped = scenario.tuned()
    assert set(shipped["seeds"]).isdisjoint(parse_seeds("0-4"))
    assert set(shipped["methods"]) == set(scenario.methods)  # every method of the setting has its choice
    for method, chosen in shipped["methods"].items():
        if method != "joint":
            Method.parse(method, chosen)  # every choice is a valid setting of the method


def test_shipped_choices_apply_only_to_the_options_they_were_tuned_with():
    assert make_scenario("digits", setting="class").tuned()["seeds"] == [100, 101]
    assert make_scenario("digits", setting="class", epochs=2).tuned() == {}
    assert make_scenario("digits", setting="task", lr=2e-3).tuned() == {}
