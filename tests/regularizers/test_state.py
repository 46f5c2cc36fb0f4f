"""Checkpoints (and one written in format version 1), the bytes held, devices, dtypes, the two modes under
GradScaler / accumulation / clipping, compile."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import clreg
from clreg import OutputSpec, TaskSpec
from models import MLP, MultiHead, classification, train_task

KINDS = ["ewc", "online_ewc", "si", "mas", "lwf"]


def data(seed: int = 0, n: int = 12) -> TensorDataset:
    return classification(seed, n)


def build(kind: str, model: torch.nn.Module) -> clreg.Regularizer:
    return {
        "ewc": lambda: clreg.EWC(model, lam=3.0, estimator="exact"),
        "online_ewc": lambda: clreg.OnlineEWC(model, lam=2.0, gamma=0.7, estimator="empirical"),
        "si": lambda: clreg.SI(model, c=0.5, xi=0.1),
        "mas": lambda: clreg.MAS(model, lam=4.0),
        "lwf": lambda: clreg.LwF(model, temperature=2.0, alpha=1.5),
    }[kind]()


def consolidated(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = MLP()
    reg = build(kind, model)
    for t in range(2):
        train_task(model, reg, data(t))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, reg


def value_and_grad(model, reg, x):
    out = model(x)
    v = reg(model, inputs=x, outputs=out)
    return v.detach(), torch.autograd.grad(v, list(model.parameters()), allow_unused=True)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_through_torch_save(kind: str) -> None:
    model, reg = consolidated(kind)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "reg": reg.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = MLP()
    model2.load_state_dict(ckpt["model"])
    fresh = build(kind, model2)
    if isinstance(fresh, clreg.LwF):
        fresh.temperature = 5.0  # hyperparameters come back from the checkpoint
    fresh.load_state_dict(ckpt["reg"], strict=True)
    x = torch.randn(5, 4)
    v1, g1 = value_and_grad(model, reg, x)
    v2, g2 = value_and_grad(model2, fresh, x)
    assert v1.item() > 0
    torch.testing.assert_close(v1, v2)
    for a, b in zip(g1, g2):
        if a is not None:
            torch.testing.assert_close(a, b)
    assert int(fresh.n_tasks) == 2
    for k, v in reg.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, fresh.state_dict()[k]), k


def test_state_errors() -> None:
    model, ewc = consolidated("ewc")
    sd = ewc.state_dict()
    with pytest.raises(ValueError, match=r"not of a SI|of a EWC"):
        clreg.SI(model).load_state_dict(sd, strict=False)
    bad = dict(sd)
    bad["_extra_state"] = {**sd["_extra_state"], "format_version": 99}
    with pytest.raises(ValueError, match="format version 99"):
        clreg.EWC(model).load_state_dict(bad)
    with pytest.raises(ValueError, match="different parameters"):
        clreg.EWC(MLP(h=7)).load_state_dict(sd, strict=False)
    with pytest.raises(ValueError, match="format version is missing"):
        clreg.EWC(model).load_state_dict({**sd, "_extra_state": {"x": 1}})


def test_wrong_model_errors() -> None:
    model, ewc = consolidated("ewc")
    with pytest.raises(ValueError, match="has shape"):
        ewc(MLP(h=7))
    with pytest.raises(ValueError, match="missing from this model"):
        ewc(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="unknown parameter name"):
        clreg.EWC(model, params=["net.9.weight"])
    with pytest.raises(TypeError, match=r"nn\.Module"):
        clreg.EWC("model")
    lwf = clreg.LwF(model)
    with pytest.raises(ValueError, match=r"parameter 'net\.0\.weight' changed shape"):
        lwf.consolidate(MLP(h=7))
    with pytest.raises(ValueError, match="differ from the model"):
        lwf.consolidate(torch.nn.Linear(4, 3))


def test_nan_importance_names_the_parameter() -> None:
    model = MLP()
    with torch.no_grad():
        model.net[2].bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"parameter 'net\.\d\.(weight|bias)' contains NaN"):
        clreg.EWC(model).consolidate(model, data())


def test_parameter_selection_and_wrapper_prefixes() -> None:
    model = MultiHead()
    ewc = clreg.EWC(model, params=lambda n, p: "trunk.1" not in n)  # leave BatchNorm out
    assert not any(n.startswith("trunk.1") for n in ewc.param_names)
    compiled = torch.compile(model, backend="eager")
    on_compiled = clreg.MAS(compiled, lam=1.0)
    assert on_compiled.param_names == [n for n, _ in model.named_parameters()]
    on_compiled.consolidate(
        compiled, TensorDataset(torch.randn(2, 3, 4, 4)), TaskSpec(outputs=[OutputSpec(select="cls")])
    )
    plain = clreg.MAS(model, lam=1.0)
    plain.load_state_dict(on_compiled.state_dict())  # a compiled model's state loads into the plain one
    torch.testing.assert_close(plain(model), on_compiled(compiled))
    model.seg.weight.requires_grad_(False)
    assert "seg.weight" not in clreg.EWC(model).param_names  # frozen parameters are skipped


def test_device_and_dtype_moves() -> None:
    _model, ewc = consolidated("ewc")
    ewc.to("meta")
    assert all(t.is_meta for t in ewc.importance.tensors + ewc.anchor.tensors)
    model64 = MLP().double()
    ewc64 = clreg.EWC(model64)
    assert ewc64.importance.tensors[0].dtype == torch.float64
    if torch.cuda.is_available():  # pragma: no cover - on a GPU machine
        m, reg = consolidated("si")
        m.cuda()
        reg.cuda()
        assert reg(m).device.type == "cuda"


@pytest.mark.parametrize("kind", ["ewc", "si", "mas", "online_ewc"])
def test_bf16_model_keeps_float32_state(kind: str) -> None:
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    reg = build(kind, model)
    ds = TensorDataset(data().tensors[0].to(torch.bfloat16), data().tensors[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    x, y = ds.tensors
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
    reg.consolidate(model, ds)
    assert all(t.dtype == torch.float32 for t in reg.importance.tensors + reg.anchor.tensors)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    opt.zero_grad()
    F.cross_entropy(model(x).float(), y).backward()
    task = [p.grad.clone() for p in model.parameters()]
    reg._pre_step([True] * len(task))
    expected = clreg.functional.quadratic_penalty_grad(
        list(model.parameters()), reg.importance.tensors, reg.anchor.tensors, reg.scale
    )
    for p, t, e in zip(model.parameters(), task, expected):
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad.float(), (t + e).float(), rtol=2e-2, atol=2e-2)
    value = reg(model)
    assert value.dtype == torch.float32 and value.item() > 0


# -- the two modes ---------------------------------------------------------------------------------


def step_grads(kind: str, mode: str, variant: str, clip: float | None = None):
    """Gradient at the optimizer step (what the pre-hook leaves in .grad) for one step."""
    model, reg = consolidated(kind, seed=3)
    x, y = data(7).tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step changes nothing; we read .grad
    captured = []
    if mode == "attached":
        reg.attach(opt)
    opt.register_step_pre_hook(lambda o, a, k: captured.append([p.grad.clone() for p in model.parameters()]))
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if variant == "scaler" else None
    opt.zero_grad()
    parts = [(x[:5], y[:5], 5 / 12), (x[5:], y[5:], 7 / 12)] if variant == "accumulate" else [(x, y, 1.0)]
    for xb, yb, w in parts:
        out = model(xb)
        loss = F.cross_entropy(out, yb) * w + w * reg(model, inputs=xb, outputs=out)
        (scaler.scale(loss) if scaler else loss).backward()
    if clip is not None:
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return captured[0]


@pytest.mark.parametrize("kind", ["ewc", "online_ewc", "si", "mas"])
@pytest.mark.parametrize("variant", ["plain", "accumulate", "scaler"])
def test_both_modes_give_the_plain_float32_gradient(kind: str, variant: str) -> None:
    reference = step_grads(kind, "autograd", "plain")
    for mode in ("autograd", "attached"):
        got = step_grads(kind, mode, variant)  # attached: read by a hook that runs after clreg's
        for a, b in zip(got, reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lwf_gradient_under_scaler_and_accumulation() -> None:
    ref = step_grads("lwf", "autograd", "plain")
    for variant in ("accumulate", "scaler"):
        for a, b in zip(step_grads("lwf", "autograd", variant), ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_attached_penalty_is_added_after_clipping() -> None:
    """Attached: the user's clipping sees the task gradient only; the penalty is added afterwards."""
    model, reg = consolidated("ewc", seed=3)
    x, y = data(7).tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt)
    seen = []
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    clipped = [p.grad.clone() for p in model.parameters()]
    opt.register_step_pre_hook(lambda o, a, k: seen.append([p.grad.clone() for p in model.parameters()]))
    opt.step()
    pen = clreg.functional.quadratic_penalty_grad(
        list(model.parameters()), reg.importance.tensors, reg.anchor.tensors, reg.scale
    )
    for s, c, p in zip(seen[0], clipped, pen):
        torch.testing.assert_close(s, c + p)


def test_attached_value_is_detached_and_equal() -> None:
    model, reg = consolidated("ewc")
    v_auto = reg(model)
    reg.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    v_att = reg(model)
    assert not v_att.requires_grad
    torch.testing.assert_close(v_att, v_auto.detach())
    with pytest.raises(ValueError, match="already attached"):
        reg.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="cannot be attached"):
        clreg.LwF(model).attach(torch.optim.SGD(model.parameters(), lr=0.1))


# -- torch.compile ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_training_step(kind: str) -> None:
    torch.manual_seed(0)
    model = MLP()
    reg = build(kind, model)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.2)
    x, y = data().tensors
    if isinstance(reg, clreg.SI):
        reg.track(opt)
    losses = []
    for task in range(2):
        for _ in range(3):
            opt.zero_grad()
            out = compiled(x)
            loss = F.cross_entropy(out, y) + reg(compiled, inputs=x, outputs=out)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        reg.consolidate(compiled, data(task), TaskSpec())
    assert all(torch.isfinite(torch.tensor(losses)))
    out = compiled(x)
    eager = reg(model, inputs=x, outputs=model(x))
    torch.testing.assert_close(reg(compiled, inputs=x, outputs=out), eager, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("ewc", ["lam"]),
        ("online_ewc", ["lam", "gamma"]),
        ("si", ["c", "xi", "clamp", "path_gradient"]),
        ("mas", ["lam", "normalize"]),
        ("lwf", ["temperature", "alpha", "t_squared"]),
    ],
)
def test_saved_hyperparameters_are_declared_and_validated_on_load(kind: str, names: list[str]) -> None:
    model, reg = consolidated(kind)
    assert list(type(reg).hyperparameters) == names
    sd = reg.state_dict()
    config = sd["_extra_state"]["config"]
    assert list(config)[: len(names)] == names and all(config[n] == getattr(reg, n) for n in names)
    bad = {**sd, "_extra_state": {**sd["_extra_state"], "config": {**config, names[0]: -1.0}}}
    with pytest.raises(ValueError, match=f"{names[0]} must be in"):
        build(kind, model).load_state_dict(bad)
    unknown = {**sd, "_extra_state": {**sd["_extra_state"], "config": {**config, "beta": 1.0}}}
    with pytest.raises(ValueError, match=r"hyperparameters \['beta'\]"):
        build(kind, model).load_state_dict(unknown)


# -- a checkpoint written in format version 1 --------------------------------------------------------

DATA = Path(__file__).resolve().parents[1] / "data"


def _maker():
    spec = importlib.util.spec_from_file_location("make_state_v1", DATA / "make_state_v1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved() -> dict:
    return torch.load(DATA / "state_v1.pt", weights_only=True)


@pytest.mark.parametrize("name", ["ewc", "online_ewc", "si", "mas", "lwf", "compose"])
def test_version_1_state_loads_and_gives_the_saved_penalty(saved: dict, name: str) -> None:
    model = MLP()
    model.load_state_dict(saved["model"])
    reg = _maker().builders(model)[name]
    reg.load_state_dict(saved["states"][name], strict=True)
    x = saved["inputs"]
    value = reg(model, inputs=x, outputs=model(x))
    torch.testing.assert_close(value.detach(), saved["values"][name], rtol=0, atol=0)
    grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    for g, p, ref in zip(grads, model.parameters(), saved["grads"][name]):
        torch.testing.assert_close(torch.zeros_like(p) if g is None else g, ref, rtol=0, atol=0)
    members = reg.members if isinstance(reg, clreg.Compose) else [reg]
    assert [m.state_bytes() for m in members] == saved["state_bytes"][name]
    for key, t in reg.state_dict().items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, saved["states"][name][key]), key


def test_version_1_replay_buffer_loads(saved: dict) -> None:
    buf = clreg.ReplayBuffer(1)
    buf.load_state_dict(saved["replay"], strict=True)
    assert buf.tasks == ["det", "cls"] and buf.capacity_per_task == 3
    assert buf.state_bytes() == saved["replay_bytes"]
    draw = buf.sample(4, generator=torch.Generator().manual_seed(2))
    for task, (x, _y) in saved["replay_next"].items():
        assert torch.equal(draw[task][0], x)


# -- the bytes held ---------------------------------------------------------------------------------

F32, I64, F64 = 4, 8, 8


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def task(n: int = 6) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def attached_step(model: torch.nn.Module, reg: clreg.Regularizer) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    x, y = task().tensors
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    reg.detach()


def test_quadratic_penalties_count_buffers_then_caches() -> None:
    model = MLP()
    p = n_params(model)
    for reg in (clreg.EWC(model), clreg.OnlineEWC(model, gamma=0.5), clreg.MAS(model)):
        held = 2 * F32 * p + F64 + I64  # importance, anchor, offset, n_tasks
        assert reg.state_bytes() == held
        reg.consolidate(model, task())
        reg(model)  # the autograd value keeps √A
        assert reg.state_bytes() == held + F32 * p
        attached_step(model, reg)  # the attached step keeps A·m
        assert reg.state_bytes() == held + 2 * F32 * p


def test_si_counts_its_path_and_the_gradient_snapshot() -> None:
    model = MLP()
    p = n_params(model)
    si = clreg.SI(model)
    held = 4 * F32 * p + F64 + 2 * I64  # importance, anchor, omega, previous; offset, n_tasks, steps
    assert si.state_bytes() == held
    attached_step(model, si)
    si.consolidate(model)
    si(model)
    assert si.state_bytes() == held + F32 * p  # √A
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si.attach(opt)
    x, y = task().tensors
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # an own penalty and the task path: the task gradient is kept in a snapshot
    assert si.state_bytes() == held + 3 * F32 * p  # √A, A·m, the snapshot


def test_lwf_counts_every_parameter_and_buffer_of_the_model() -> None:
    model = MultiHead(width=6)
    lwf = clreg.LwF(model)
    lwf.consolidate(model)
    bn = model.trunk[1]
    buffers = F32 * (bn.running_mean.numel() + bn.running_var.numel()) + I64  # num_batches_tracked
    assert lwf.state_bytes() == F32 * n_params(model) + buffers + I64  # + n_tasks


def test_compose_and_replay_buffer() -> None:
    model = MLP()
    reg = clreg.Compose(clreg.EWC(model), clreg.LwF(model))
    assert reg.state_bytes() == reg["ewc"].state_bytes() + reg["lwf"].state_bytes()
    buf = clreg.ReplayBuffer(2)
    buf.add("det", [(torch.zeros(3), {"boxes": torch.zeros(k, 4), "tag": "x"}) for k in (1, 3)])
    buf.add("cls", [(torch.zeros(2, dtype=torch.float64), torch.tensor(1))])
    assert buf.state_bytes() == F32 * (3 + 4 + 3 + 12) + F64 * 2 + I64
