"""benchmarks/digits_avalanche.py: the conversions between clreg's and Avalanche's conventions (against
hand-derived values and against each library's penalty written here from its definition), the
disagreement rule and the choice on constructed numbers, the capped SI importance, the handling of a
diverged run and the report; with avalanche-lib installed, Avalanche's own plugins at the converted
strengths, its SI snapshots on a CPU, the shared start of both libraries' runs and a short end-to-end run."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import clreg

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "digits_avalanche.py"
_SPEC = importlib.util.spec_from_file_location("digits_avalanche", _PATH)
da = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("digits_avalanche", da)  # its dataclasses look their module up
_SPEC.loader.exec_module(da)

P = da.Protocol()


# -- conversions ----------------------------------------------------------------------------------------


def test_conversions_hand_derived() -> None:
    """Each row derived by hand from the two penalties (see the docs page's table)."""
    assert da.avalanche_kwargs("ewc", 6.0, P) == {"ewc_lambda": 3.0}  # (λ/2) Σ F Δ² = λ_A Σ F Δ²
    assert da.avalanche_kwargs("online_ewc", 6.0, P) == {"ewc_lambda": 3.0, "mode": "online", "decay_factor": 1.0}
    assert da.avalanche_kwargs("si", 0.25, P) == {"si_lambda": 0.5, "eps": 1e-3}  # c Σ ΩΔ² = (λ_A/2) Σ ΩΔ²
    assert da.avalanche_kwargs("lwf", 0.5, P) == {"alpha": 2.0, "temperature": 2.0}  # α T² KL = α_A KL, T = 2
    assert da.avalanche_kwargs("lwf", 0.5, da.Protocol(temperature=3.0))["alpha"] == pytest.approx(4.5)
    assert da.avalanche_kwargs("mas", 7.0, P) == {"lambda_reg": 7.0, "alpha": 0.5}
    assert da.avalanche_kwargs("replay", None, P) == {"mem_size": 100}  # 5 tasks × 20
    assert da.avalanche_kwargs("naive", None, P) == {}
    assert da.avalanche_strength("ewc", 1e4, P) == 5e3
    assert da.clreg_strength("si", 3.0, P) == 1.5
    for method, (_, grid) in da.GRIDS.items():
        for value in grid:
            assert da.clreg_strength(method, da.avalanche_strength(method, value, P), P) == pytest.approx(value)


@pytest.mark.parametrize(
    ("method", "strength"),
    [("ewc", -1.0), ("ewc", None), ("si", math.nan), ("naive", 1.0), ("replay", 2.0), ("x", None)],
)
def test_conversion_rejects(method: str, strength: float | None) -> None:
    with pytest.raises(ValueError):
        da.avalanche_kwargs(method, strength, P)


def _tiny(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(12, 5, generator=g), torch.randint(0, 2, (12,), generator=g)


def _move(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def test_ewc_penalty_at_converted_lambda() -> None:
    """clreg's EWC with the batch-squared Fisher equals Avalanche's penalty written here: its importance
    the mean over batches of the squared gradient of the batch-mean loss, λ_A Σ F (θ − θ*)², no ½."""
    model, x, y = _tiny()
    lam = 3.0
    ewc = clreg.EWC(model, lam=lam, estimator="batched")
    ewc.consolidate(model, DataLoader(TensorDataset(x, y), batch_size=4))
    anchor = [p.detach().clone() for p in model.parameters()]
    fisher = [torch.zeros_like(p) for p in model.parameters()]
    for xb, yb in zip(x.split(4), y.split(4)):
        grads = torch.autograd.grad(F.cross_entropy(model(xb), yb), list(model.parameters()))
        for f, g in zip(fisher, grads):
            f += g.square() / 3
    _move(model)
    lam_av = da.avalanche_kwargs("ewc", lam, P)["ewc_lambda"]
    want = lam_av * sum((f * (p - a).square()).sum() for f, p, a in zip(fisher, model.parameters(), anchor)).detach()
    torch.testing.assert_close(ewc(model), want.detach(), rtol=1e-5, atol=1e-8)
    assert float(want) > 0


def test_lwf_penalty_at_converted_alpha() -> None:
    """clreg's α T² KL over the classes seen equals Avalanche's α_A · KL(teacher ‖ student) at T, summed over
    the seen classes and averaged over the batch (``kl_div(..., reduction="batchmean")``), no T²."""
    model, x, y = _tiny(1)
    alpha = 0.7
    lwf = clreg.LwF(model, temperature=P.temperature, alpha=alpha)
    lwf.consolidate(model, TensorDataset(x, y), clreg.TaskSpec())  # classes seen: {0, 1} of 4
    with torch.no_grad():
        teacher = model(x)
    _move(model)
    student = model(x)
    alpha_av = da.avalanche_kwargs("lwf", alpha, P)["alpha"]
    t = P.temperature
    seen = [0, 1]
    want = alpha_av * F.kl_div(
        F.log_softmax(student[:, seen] / t, dim=1), F.softmax(teacher[:, seen] / t, dim=1), reduction="batchmean"
    )
    torch.testing.assert_close(lwf(model, inputs=x, outputs=student), want, rtol=1e-5, atol=1e-8)
    assert float(want.detach()) > 0


def _set_quadratic(reg: nn.Module, importance: list[torch.Tensor], anchor: list[torch.Tensor]) -> None:
    state = reg.state_dict()
    names = [k.removeprefix("importance.") for k in state if k.startswith("importance.")]
    for name, imp, a in zip(names, importance, anchor):
        state[f"importance.{name}"] = imp.clone()
        state[f"anchor.{name}"] = a.clone()
    state["n_tasks"] = torch.ones_like(state["n_tasks"])
    reg.load_state_dict(state)


@pytest.mark.parametrize("method", ["si", "mas"])
def test_si_and_mas_penalties_at_converted_strength(method: str) -> None:
    """Given the same importance Ω and anchor: clreg's c Σ Ω Δ² is Avalanche's SI (λ_A/2) Σ Ω Δ², and
    clreg's λ Σ Ω Δ² is Avalanche's MAS λ_A Σ Ω Δ², at the converted strengths."""
    model, _, _ = _tiny(2)
    g = torch.Generator().manual_seed(5)
    omega = [torch.rand(p.shape, generator=g) for p in model.parameters()]
    anchor = [p.detach().clone() for p in model.parameters()]
    strength = 0.3
    reg = clreg.SI(model, c=strength) if method == "si" else clreg.MAS(model, lam=strength)
    _set_quadratic(reg, omega, anchor)
    _move(model)
    sq = sum((o * (p - a).square()).sum() for o, p, a in zip(omega, model.parameters(), anchor))
    if method == "si":
        want = da.avalanche_kwargs("si", strength, P)["si_lambda"] / 2 * sq
    else:
        want = da.avalanche_kwargs("mas", strength, P)["lambda_reg"] * sq
    torch.testing.assert_close(reg(model), want.detach(), rtol=1e-5, atol=1e-8)


# -- rule, choice, capped importance, divergence, report ----------------------------------------------------


def test_compare_rule_on_constructed_numbers() -> None:
    same = da.compare([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])  # difference 0.1, both sds 0.1: not more than the spread
    assert same["diff"] == pytest.approx(0.1)
    assert same["spread"] == pytest.approx(0.1)
    assert same["disagree"] is False
    apart = da.compare([0.8, 0.8, 0.8], [0.5, 0.6, 0.7])  # 0.2 > max(0, 0.1)
    assert apart["disagree"] is True
    assert apart["diff"] == pytest.approx(0.2)
    assert apart["clreg_sd"] == 0.0
    assert apart["avalanche_sd"] == pytest.approx(0.1)
    below = da.compare([0.1, 0.3], [0.5, 0.5])  # clreg below: the sign says so; sd of (0.1, 0.3) is √0.02
    assert below["diff"] == pytest.approx(-0.3)
    assert below["spread"] == pytest.approx(math.sqrt(0.02))
    assert below["disagree"] is True
    with pytest.raises(ValueError):
        da.mean_sd([])


def test_choose() -> None:
    assert da.choose({1.0: [0.5, 0.7], 10.0: [0.8, 0.8], 100.0: [0.1, 0.2]}) == (10.0, False)
    assert da.choose({1.0: [0.6], 10.0: [0.6], 100.0: [0.2]}) == (1.0, True)  # a tie: the smaller, at the end
    assert da.choose({1.0: [0.1], 10.0: [0.2], 100.0: [0.3]}) == (100.0, True)
    with pytest.raises(ValueError):
        da.choose({})


def test_capped_importance_keeps_the_raw_sum() -> None:
    """Avalanche's SI importance: min(Σ_t term_t, cap) with the running sum itself uncapped."""

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.importance = nn.Module()
            self.importance.register_buffer("w", torch.zeros(3))

    reg = Holder()
    raw: dict[str, torch.Tensor] = {}
    for term in ([5e-4, 2e-3, -1e-3], [1e-4, -3e-3, 5e-4]):
        before = da._importance(reg)
        reg.importance.w.add_(torch.tensor(term))  # what clreg's SI with clamp=None adds at a consolidation
        da._cap_importance(reg, raw, before, 1e-3)
    torch.testing.assert_close(raw["importance.w"], torch.tensor([6e-4, -1e-3, -5e-4]))
    torch.testing.assert_close(reg.importance.w, torch.tensor([6e-4, -1e-3, -5e-4]))
    # the second term's 2e-3 on the first entry would be lost if the sum were capped as it goes
    reg.importance.w.zero_()
    raw = {}
    for term in ([2e-3, 0.0, 0.0], [-1.5e-3, 0.0, 0.0]):
        before = da._importance(reg)
        reg.importance.w.add_(torch.tensor(term))
        da._cap_importance(reg, raw, before, 1e-3)
    torch.testing.assert_close(reg.importance.w, torch.tensor([5e-4, 0.0, 0.0]))


@pytest.mark.parametrize("a", [0.5, 0.3])
def test_running_average_as_weighted_sum(a: float) -> None:
    """Avalanche's MAS average Ω_t = a Ω_t−1 + (1 − a) I_t (Ω_0 = I_0), by its recursion here, equals
    a^t Σ_j w_j I_j with clreg's task weights w_j from the script."""
    for t in range(5):
        coeffs = [1.0]  # the recursion on the coefficients of I_0, …, I_t
        for _ in range(1, t + 1):
            coeffs = [a * c for c in coeffs] + [1 - a]
        weights = [da._spec(j, {"mas_average": a}).weight for j in range(t + 1)]
        assert [a**t * w for w in weights] == pytest.approx(coeffs)
    assert da._spec(3, {}).weight == 1.0


def test_a_diverged_run_scores_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = [object()] * 5

    def refuses(*args, **kwargs):
        raise ValueError("Fisher of parameter 'w' contains NaN: check the data")

    def nan_model(*args, **kwargs):
        model = nn.Linear(2, 2)
        with torch.no_grad():
            model.weight.fill_(math.nan)
        return model

    def other_error(*args, **kwargs):
        raise ValueError("a real mistake")

    monkeypatch.setitem(da.TRAINERS, "clreg", refuses)
    assert da.run(da.CLREG, "ewc", 1.0, "class", 0, tasks, P, "val") == [0.0] * 5
    monkeypatch.setitem(da.TRAINERS, "clreg", nan_model)
    assert da.run(da.CLREG, "ewc", 1.0, "class", 0, tasks, P, "val") == [0.0] * 5
    monkeypatch.setitem(da.TRAINERS, "clreg", other_error)
    with pytest.raises(ValueError, match="a real mistake"):
        da.run(da.CLREG, "ewc", 1.0, "class", 0, tasks, P, "val")


def test_evaluate_tunes_on_tune_seeds_and_reports_on_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tuning runs every grid value on the tune seeds' validation split, the report runs the report seeds'
    test split at the choice; with ``fixed`` only the report runs, at that strength."""
    calls: list[tuple] = []

    def fake_run(variant, method, strength, setting, seed, tasks, proto, split):
        calls.append((strength, seed, split))
        best = 1.0 if split == "val" and strength == 100.0 else 0.5  # the validation peak: λ = 100
        return [best + 0.01 * seed] * 5

    monkeypatch.setattr(da, "run", fake_run)
    out = da.evaluate(da.AVALANCHE, "ewc", "class", [], P, [7, 8], [0, 1], lambda _: None)
    grid = da.GRIDS["ewc"][1]
    assert sorted((s, seed) for s, seed, split in calls if split == "val") == sorted(
        (s, t) for s in grid for t in (7, 8)
    )
    assert [(s, seed) for s, seed, split in calls if split == "test"] == [(100.0, 0), (100.0, 1)]
    assert out["choice"] == 100.0
    assert out["choice_own"] == {"ewc_lambda": 50.0}
    assert out["test"] == pytest.approx([0.5, 0.51])
    calls.clear()
    fixed = da.evaluate(da.CLREG, "ewc", "class", [], P, [7, 8], [0, 1], lambda _: None, fixed=1e6)
    assert calls == [(1e6, 0, "test"), (1e6, 1, "test")]
    assert fixed["fixed"] is True
    assert fixed["choice_own"] == {"lam": 1e6}
    assert "(fixed)" in da.fmt_strength(fixed)


def _side(mean: float, sd: float, choice: dict | None = None, edge: bool = False) -> dict:
    out = {"mean": mean, "sd": sd, "test": [mean]}
    if choice is not None:
        out |= {"choice_own": choice, "edge": edge}
    return out


def test_table() -> None:
    results = {
        "protocol": {"lr": 1e-3, "batch_size": 32, "epochs": 20},
        "seeds": [0, 1],
        "tune_seeds": [100],
        "wall_s": 12.0,
        "settings": {
            "class": {
                "si": {
                    "clreg": _side(0.25, 0.01, {"c": 1.0}),
                    "avalanche": _side(0.19, 0.02, {"si_lambda": 2.0}, edge=True),
                    "compare": da.compare([0.24, 0.26], [0.18, 0.20]),
                },
                "naive": {
                    "clreg": _side(0.19, 0.01),
                    "avalanche": _side(0.19, 0.01),
                    "compare": da.compare([0.2], [0.2]),
                },
            }
        },
    }
    text = da.table(results)
    # sds √0.0002 each over two seeds: se = √(0.0002/2 + 0.0002/2) = 0.01414, Δ/se = 0.06/0.01414 = 4.2
    assert (
        "| si | 0.250 ± 0.010 | c=1 | 0.190 ± 0.020 | si_lambda=2 (grid end) | +0.060 | 0.014 | 4.2 | **yes** |" in text
    )
    assert "| naive | 0.190 ± 0.010 | – | 0.190 ± 0.010 | – | +0.000 | 0.000 | – | no |" in text


def test_parse() -> None:
    args = da.parse(["--out", "x"])
    assert args.seeds == [0, 1, 2, 3, 4]
    assert args.tune_seeds == [100, 101]
    assert args.settings == ["class"]
    assert da.parse(["--out", "x", "--settings", "class,domain", "--isolate", "si-cap"]).isolate == ["si-cap"]
    with pytest.raises(SystemExit):
        da.parse(["--out", "x", "--seeds", "0,100"])  # a tune seed among the report seeds
    with pytest.raises(SystemExit):
        da.parse(["--out", "x", "--settings", "task"])


# -- with Avalanche ---------------------------------------------------------------------------------------


def _avalanche():
    pytest.importorskip("avalanche", reason="avalanche-lib is not installed")
    pytest.importorskip("sklearn")
    from avalanche.training import plugins

    return plugins


def test_avalanche_si_snapshots_are_views_on_cpu() -> None:
    plugins = _avalanche()
    SIPlugin = plugins.SynapticIntelligencePlugin
    model, _, _ = _tiny()
    plugin = SIPlugin(si_lambda=1.0)
    SIPlugin.create_syn_data(model, plugin.ewc_data, plugin.syn_data, set())
    SIPlugin.extract_weights(model, plugin.syn_data["old_theta"], set())
    first = model[0].weight
    assert plugin.syn_data["old_theta"]["0.weight"].data.data_ptr() == first.data_ptr()  # a view
    with da.copied_si_snapshots(True):
        SIPlugin.extract_weights(model, plugin.syn_data["old_theta"], set())
    assert plugin.syn_data["old_theta"]["0.weight"].data.data_ptr() != first.data_ptr()  # a copy
    SIPlugin.extract_weights(model, plugin.syn_data["old_theta"], set())  # the plugin is restored after
    assert plugin.syn_data["old_theta"]["0.weight"].data.data_ptr() == first.data_ptr()


@pytest.mark.parametrize("copied", [False, True])
def test_avalanche_si_importance_on_cpu(monkeypatch: pytest.MonkeyPatch, copied: bool) -> None:
    """Two tasks of one epoch: Avalanche's SI importances are exactly 0 on a CPU, and not with copies."""
    _avalanche()
    plugins: list = []
    build = da._avalanche_plugin

    def keep(*args, **kwargs):
        plugins.append(build(*args, **kwargs))
        return plugins[-1]

    monkeypatch.setattr(da, "_avalanche_plugin", keep)
    tasks = da.split_digits(0)[:2]
    da.train_avalanche("si", 1.0, "domain", 0, tasks, da.Protocol(epochs=1), {"si_copy": copied})
    largest = max(float(v.data.abs().max()) for v in plugins[0].ewc_data[1].values())
    if copied:
        assert largest > 0
    else:
        assert largest == 0.0


def test_avalanche_plugins_at_converted_strength() -> None:
    """Avalanche's own LwF, SI and MAS penalties (its code, on a minimal strategy) equal clreg's at the
    converted strengths, given the same teacher, importance and anchor."""
    plugins = _avalanche()
    from types import SimpleNamespace

    model, x, y = _tiny(4)
    lwf = clreg.LwF(model, temperature=P.temperature, alpha=0.7)
    lwf.consolidate(model, TensorDataset(x, y), clreg.TaskSpec())
    theirs = plugins.LwFPlugin(**da.avalanche_kwargs("lwf", 0.7, P))
    theirs.lwf.prev_model = copy.deepcopy(model)  # the teacher, as its plugin keeps it
    theirs.lwf.prev_classes_by_task[0] = {0, 1}
    _move(model)
    out = model(x)
    torch.testing.assert_close(lwf(model, inputs=x, outputs=out), theirs.lwf(x, out, model), rtol=1e-5, atol=1e-8)

    g = torch.Generator().manual_seed(6)
    omega = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    si = clreg.SI(model, c=0.3)
    _set_quadratic(si, list(omega.values()), list(anchor.values()))
    ewc_data = (
        {n: SimpleNamespace(data=a.flatten()) for n, a in anchor.items()},
        {n: SimpleNamespace(data=o.flatten()) for n, o in omega.items()},
    )
    _move(model, 8)
    av_si = plugins.SynapticIntelligencePlugin.compute_ewc_loss(
        model, ewc_data, set(), "cpu", lambd=da.avalanche_kwargs("si", 0.3, P)["si_lambda"]
    )
    torch.testing.assert_close(si(model), av_si, rtol=1e-5, atol=1e-8)

    mas = clreg.MAS(model, lam=0.3)
    _set_quadratic(mas, list(omega.values()), list(anchor.values()))
    plugin = plugins.MASPlugin(lambda_reg=da.avalanche_kwargs("mas", 0.3, P)["lambda_reg"])
    plugin.importance = {n: o.clone() for n, o in omega.items()}
    plugin.params = {n: a.clone() for n, a in anchor.items()}
    strategy = SimpleNamespace(model=model, clock=SimpleNamespace(train_exp_counter=1), loss=torch.ones(()))
    plugin.before_backward(strategy)
    torch.testing.assert_close(mas(model), strategy.loss - 1, rtol=1e-5, atol=1e-8)


def test_both_libraries_start_from_the_same_model() -> None:
    _avalanche()
    tasks = da.split_digits(0)
    zero = da.Protocol(epochs=0)
    ours = da.train_clreg("naive", None, "class", 3, tasks, zero)
    theirs = da.train_avalanche("naive", None, "class", 3, tasks, zero)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", ["naive", "ewc"])
def test_clreg_on_avalanches_batches_reproduces_avalanche(method: str) -> None:
    """On the batches Avalanche trained on, clreg's loop gives Avalanche's model: bitwise for naive, to
    float rounding for EWC with the batch-squared Fisher at the converted λ (two tasks, two epochs)."""
    _avalanche()
    tasks = da.split_digits(0)[:2]
    proto = da.Protocol(epochs=2)
    strength = None if method == "naive" else 1e4
    theirs = da.train_avalanche(method, strength, "domain", 1, tasks, proto)
    ours = da.train_clreg(method, strength, "domain", 1, tasks, proto, {"order": "avalanche", "estimator": "batched"})
    other = da.train_clreg(method, strength, "domain", 1, tasks, proto)  # clreg's own order
    for a, b in zip(ours.parameters(), theirs.parameters()):
        if method == "naive":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = max(float((c - b).detach().abs().max()) for c, b in zip(other.parameters(), theirs.parameters()))
    assert moved > 1e-2  # the order alone moves the model


def test_main_end_to_end(tmp_path: Path) -> None:
    _avalanche()
    results = da.main(
        ["--out", str(tmp_path), "--methods", "naive,lwf", "--epochs", "1", "--seeds", "0,1", "--tune-seeds", "7"]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seeds"] == [0, 1]
    lwf = saved["settings"]["class"]["lwf"]
    assert set(lwf["clreg"]["tune"]) == {repr(v) for v in da.GRIDS["lwf"][1]}
    assert lwf["avalanche"]["choice_own"]["alpha"] == pytest.approx(lwf["avalanche"]["choice"] * 4)
    assert len(lwf["clreg"]["test"]) == 2
    assert all(0.0 <= s <= 1.0 for s in lwf["clreg"]["test"] + lwf["avalanche"]["test"])
    assert lwf["compare"]["diff"] == pytest.approx(lwf["clreg"]["mean"] - lwf["avalanche"]["mean"])
    assert "| lwf |" in (tmp_path / "results.md").read_text()
    assert results["settings"]["class"]["naive"]["clreg"]["mean"] == pytest.approx(
        saved["settings"]["class"]["naive"]["clreg"]["mean"]
    )
