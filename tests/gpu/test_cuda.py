"""The GPU checks: what the CPU tests cannot show. Every test carries the ``gpu`` marker and the whole
module is skipped, with one reason, when ``torch.cuda.is_available()`` is False.

* each regularizer on CUDA tensors against the same run on the CPU (identical weights and data, the
  same seeds): its state after two tasks, its value and gradient in the autograd mode and, where it
  has one, the ``.grad`` its attached mode leaves for the optimizer's step;
* :func:`clreg.functional.fisher_diagonal` for ``empirical``, ``mc`` and ``exact``, by the per-layer
  engine and the per-sample path, on CUDA against the CPU (the ``mc`` draws are keyed by the sample and
  the seed on CPU generators, so both devices draw the same labels);
* the attached mode under fp16 autocast with a ``GradScaler``, through a step the scaler skips (an inf
  injected into a gradient): the penalty's gradient is added once to the unscaled gradient of each step
  taken, nothing on the skipped one, and SI's path integral sees the task gradient alone; the same for
  the autograd mode;
* bf16 and fp16 autocast forwards with the penalty added: the value in float32, equal to the float32
  value for the penalties of the parameters alone, and a finite backward;
* ``torch.compile`` (inductor) of a training step's loss with a penalty: losses, values, parameters and
  state equal to the eager run's (also with LwF's first call after a consolidation inside the compiled
  region);
* the one-head model's latency at 512 × 512 (the challenge's limit: 150 ms per image on a T4),
  timed by :func:`clreg.onehead.model.cpu_latency` on the model on the GPU.

Run on a GPU machine with ``python -m pytest -m gpu tests/gpu`` (or ``python benchmarks/gpu_checks.py
--out DIR``, which also writes the figures). TF32 is switched off for the comparisons, so a GPU matmul
or convolution is a float32 one.

To exercise the tests' logic without a GPU, ``CLREG_GPU_TEST_DEVICE=cpu`` runs them with the CPU as the
"device": every comparison is then CPU against CPU (equal by construction: it checks the test code, not
CUDA), ``torch.compile`` uses the ``aot_eager`` backend, and the latency test times a 128 × 128 image
without checking the limit.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import clreg
from clreg.functional import fisher_diagonal
from clreg.regularizers.agem import AGEM
from clreg.regularizers.der import DER
from clreg.regularizers.er_ace import ERACE
from clreg.regularizers.l2sp import L2SP
from clreg.regularizers.rwalk import RWalk
from models import MLP, PixelModel

DEVICE = torch.device(os.environ.get("CLREG_GPU_TEST_DEVICE", "cuda"))
ON_CPU = DEVICE.type == "cpu"  # the logic run (CLREG_GPU_TEST_DEVICE=cpu)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False)",
    ),
]

VALUE_TOL = {"rtol": 1e-4, "atol": 1e-6}  # value and gradients, CUDA against the CPU (float32, no TF32)
STATE_TOL = {"rtol": 1e-3, "atol": 1e-5}  # state after two tasks of training (path scores divide by Δ²)


@pytest.fixture(autouse=True)
def _float32_matmuls():
    """No TF32 in the comparisons: a GPU matmul or convolution is then a float32 one."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def device() -> torch.device:
    return DEVICE


# -- models, data and the regularizers --------------------------------------------------------------


class ConvNet(nn.Module):
    """A convolution (KFC's factors, cuDNN on the GPU), tanh, pooling and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 4)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda: MLP(c=4), (4,)),
    "conv": (ConvNet, (3, 6, 6)),
}
CLASSES = 4
TASK_LABELS = {0: (0, 2), 1: (2, 4), 2: (0, 4)}  # task 0: classes 0-1, task 1: 2-3, the evaluation batch: all


def task_data(model_name: str, task: int, n: int = 12) -> TensorDataset:
    """``n`` CPU samples of task ``task`` (seeded: the same on every call)."""
    g = torch.Generator().manual_seed(100 + task)
    lo, hi = TASK_LABELS[task]
    return TensorDataset(torch.randn(n, *MODELS[model_name][1], generator=g), torch.randint(lo, hi, (n,), generator=g))


def _ce(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(m(x), y)


BUILDERS: dict[str, Callable[[nn.Module], clreg.Regularizer]] = {
    "ewc": lambda m: clreg.EWC(m, lam=3.0, estimator="mc", mc_samples=2, seed=1),
    "online_ewc": lambda m: clreg.OnlineEWC(m, lam=2.0, gamma=0.7, estimator="empirical"),
    "si": lambda m: clreg.SI(m, c=0.5, xi=0.1),
    "lwf": lambda m: clreg.LwF(m, temperature=2.0, alpha=1.5),
    "mas": lambda m: clreg.MAS(m, lam=4.0),
    "kfac_ewc": lambda m: clreg.KFACEWC(m, lam=2.0),
    "l2sp": lambda m: L2SP(m, alpha=0.5),
    "rwalk": lambda m: RWalk(m, lam=1.0, update_every=2, eps=1e-2),
    "agem": lambda m: AGEM(m, _ce, capacity_per_task=8, sample_size=6),
    "der": lambda m: DER(m, capacity=16, alpha=0.5, beta=0.5, batch_size=6, device=DEVICE),  # buffer on the device
    "er_ace": lambda m: ERACE(m, capacity=16, batch_size=6),  # buffer on the CPU, draws moved
}
KINDS = list(BUILDERS)
PENALTIES = [k for k in KINDS if k != "agem"]  # A-GEM is not a penalty: it acts in the attached mode only
ATTACHABLE = ["ewc", "online_ewc", "si", "mas", "kfac_ewc", "l2sp", "rwalk", "agem"]
PARAM_ONLY = ["ewc", "online_ewc", "si", "mas", "kfac_ewc", "l2sp", "rwalk"]  # the value needs no forward


def train_two_tasks(model: nn.Module, reg: clreg.Regularizer, model_name: str, device: torch.device) -> None:
    """Two tasks of three SGD steps with the regularizer in the loss (SI and RWalk tracking the optimizer,
    A-GEM attached, DER and ER-ACE observing each batch), each consolidated on its CPU data set."""
    for task in range(2):
        ds = task_data(model_name, task)
        x, y = (t.to(device) for t in ds.tensors)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        if reg.tracks_path:
            reg.track(opt)
        elif isinstance(reg, AGEM):
            reg.attach(opt)
        for _ in range(3):
            opt.zero_grad()
            out = model(x)
            task_loss = reg.incoming_loss(out, y) if isinstance(reg, ERACE) else F.cross_entropy(out, y)
            (task_loss + reg(model, inputs=x, outputs=out)).backward()
            opt.step()
            if isinstance(reg, DER):
                reg.observe(x, y, out.detach())
            elif isinstance(reg, ERACE):
                reg.observe(x, y)
        reg.detach()
        reg.consolidate(model, ds, clreg.TaskSpec())


def prepared(kind: str, model_name: str, device: torch.device) -> tuple[nn.Module, clreg.Regularizer]:
    """The model (seeded weights, built on the CPU and moved) and its regularizer after two tasks, the
    weights then moved off the anchors by a seeded step so every penalty is active."""
    torch.manual_seed(0)
    model = MODELS[model_name][0]().to(device)
    reg = BUILDERS[kind](model)
    train_two_tasks(model, reg, model_name, device)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(device))
    return model, reg


def eval_batch(model_name: str, device: torch.device) -> tuple[Tensor, Tensor]:
    return tuple(t.to(device) for t in task_data(model_name, 2).tensors)


def value_and_grads(model: nn.Module, reg: clreg.Regularizer, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    out = model(x)
    v = reg(model, inputs=x, outputs=out)
    params = list(model.parameters())
    grads = torch.autograd.grad(v, params, allow_unused=True)
    return v.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def grads_at_step(model: nn.Module, reg: clreg.Regularizer, x: Tensor, y: Tensor) -> list[Tensor]:
    """Attached: the ``.grad`` the optimizer steps with (read by a pre-hook registered after clreg's)
    after one backward of the task loss; the step itself changes nothing (lr 0)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([p.grad.clone() for p in model.parameters()]))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert len(seen) == 1
    return seen[0]


def assert_same_state(on_device: clreg.Regularizer, on_cpu: clreg.Regularizer) -> None:
    a, b = on_device.state_dict(), on_cpu.state_dict()
    assert list(a) == list(b)
    for key, t in a.items():
        if not isinstance(t, Tensor):
            continue
        if key.startswith("buffer.") or key.startswith("memory."):
            assert t.device.type in ("cpu", DEVICE.type), key  # replay storage: where it was asked to be
        else:
            assert t.device.type == DEVICE.type, key
        if t.is_floating_point():
            torch.testing.assert_close(t.cpu(), b[key], **STATE_TOL, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(t.cpu(), b[key]), key


def cpu_and_device(kind: str, model_name: str) -> tuple[tuple, tuple]:
    return prepared(kind, model_name, torch.device("cpu")), prepared(kind, model_name, DEVICE)


# -- each regularizer: CUDA against the CPU ----------------------------------------------------------


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", PENALTIES)
def test_value_gradient_and_state_match_the_cpu(kind: str, model_name: str) -> None:
    (m_cpu, r_cpu), (m_dev, r_dev) = cpu_and_device(kind, model_name)
    assert_same_state(r_dev, r_cpu)
    x, _ = eval_batch(model_name, torch.device("cpu"))
    v_cpu, g_cpu = value_and_grads(m_cpu, r_cpu, x)
    v_dev, g_dev = value_and_grads(m_dev, r_dev, x.to(DEVICE))
    assert v_dev.device.type == DEVICE.type and v_dev.dtype == torch.float32
    assert v_cpu.item() > 0  # an active penalty, not a trivial zero
    torch.testing.assert_close(v_dev.cpu(), v_cpu, **VALUE_TOL)
    assert any(g.abs().sum() > 0 for g in g_cpu)
    for gd, gc in zip(g_dev, g_cpu):
        assert gd.device.type == DEVICE.type
        torch.testing.assert_close(gd.cpu(), gc, **VALUE_TOL)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", ATTACHABLE)
def test_attached_grad_matches_the_cpu_and_the_autograd_mode(kind: str, model_name: str) -> None:
    (m_cpu, r_cpu), (m_dev, r_dev) = cpu_and_device(kind, model_name)
    x, y = eval_batch(model_name, torch.device("cpu"))
    if kind == "agem":  # the projected gradient; a projection must happen for the check to mean anything
        assert_same_state(r_dev, r_cpu)
        done = int(r_cpu.projections)
        got_cpu, got_dev = grads_at_step(m_cpu, r_cpu, x, y), grads_at_step(m_dev, r_dev, x.to(DEVICE), y.to(DEVICE))
        assert int(r_cpu.projections) == int(r_dev.projections) == done + 1
    else:  # the reference on the device: the task's gradient plus the autograd mode's penalty gradient
        xd, yd = x.to(DEVICE), y.to(DEVICE)
        task = torch.autograd.grad(F.cross_entropy(m_dev(xd), yd), list(m_dev.parameters()))
        _, pen = value_and_grads(m_dev, r_dev, xd)
        got_cpu, got_dev = grads_at_step(m_cpu, r_cpu, x, y), grads_at_step(m_dev, r_dev, xd, yd)
        for g, t, p in zip(got_dev, task, pen):
            torch.testing.assert_close(g, t + p, **VALUE_TOL)
    for gd, gc in zip(got_dev, got_cpu):
        assert gd.device.type == DEVICE.type
        torch.testing.assert_close(gd.cpu(), gc, **VALUE_TOL)


# -- the Fisher: CUDA against the CPU ---------------------------------------------------------------


@pytest.mark.parametrize("engine", ["layers", "per_sample"])
@pytest.mark.parametrize("estimator", ["empirical", "mc", "exact"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_fisher_diagonal_matches_the_cpu(model_name: str, estimator: str, engine: str) -> None:
    torch.manual_seed(0)
    model = MODELS[model_name][0]()
    on_device = copy.deepcopy(model).to(DEVICE)
    data = task_data(model_name, 2)  # a CPU data set: clreg moves each chunk to the model's device
    kw = {"estimator": estimator, "mc_samples": 3, "seed": 7, "engine": engine, "chunk_size": 5}
    ref = fisher_diagonal(model, data, **kw)
    got = fisher_diagonal(on_device, data, **kw)
    assert list(got) == list(ref) == [n for n, _ in model.named_parameters()]
    assert all(f.sum() > 0 for f in ref.values())
    for name, f in got.items():
        assert f.device.type == DEVICE.type
        torch.testing.assert_close(f.cpu(), ref[name], **VALUE_TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("engine", ["layers", "per_sample"])
@pytest.mark.parametrize("estimator", ["empirical", "mc"])
def test_dense_fisher_with_ignored_pixels_matches_the_cpu(estimator: str, engine: str) -> None:
    """Per-pixel logits (B, C, H, W), a quarter of the labels 255 (ignored); the data on the device."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 2, 4, 4, generator=g), torch.randint(0, 3, (6, 4, 4), generator=g)
    y[torch.rand(y.shape, generator=g) < 0.25] = 255
    torch.manual_seed(0)
    model = PixelModel()
    on_device = copy.deepcopy(model).to(DEVICE)
    kw = {
        "outputs": clreg.OutputSpec(ignore_index=255),
        "estimator": estimator,
        "mc_samples": 2,
        "seed": 11,
        "engine": engine,
    }
    ref = fisher_diagonal(model, TensorDataset(x, y), **kw)
    got = fisher_diagonal(on_device, TensorDataset(x.to(DEVICE), y.to(DEVICE)), **kw)
    assert all(f.sum() > 0 for f in ref.values())
    for name, f in got.items():
        assert f.device.type == DEVICE.type
        torch.testing.assert_close(f.cpu(), ref[name], **VALUE_TOL, msg=lambda m, name=name: f"{name}: {m}")


# -- fp16 autocast with a GradScaler, through a skipped step --------------------------------------------


def ewc_and_si(device: torch.device) -> tuple[nn.Module, clreg.Compose]:
    """EWC and SI in one Compose (one ledger), both consolidated after a first task trained attached in
    float32; the weights then moved off the anchor."""
    torch.manual_seed(0)
    model = MLP(c=CLASSES).to(device)
    reg = clreg.Compose(clreg.EWC(model, lam=2.0, estimator="exact"), clreg.SI(model, c=0.5, xi=0.1))
    ds = task_data("mlp", 0)
    x, y = (t.to(device) for t in ds.tensors)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    reg.attach(opt)
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    reg.detach()
    reg.consolidate(model, ds, clreg.TaskSpec())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(device))
    return model, reg


def penalty_grad(reg: clreg.Compose, params: list[Tensor]) -> list[Tensor]:
    """EWC's λ F (θ − θ*) (one task) plus SI's 2c Ω (θ − θ*), from their stored importances and anchors."""
    ewc, si = reg["ewc"], reg["si"]
    out = []
    for p, f, a_e, om, a_s in zip(
        params, ewc.importance.tensors, ewc.anchor.tensors, si.importance.tensors, si.anchor.tensors
    ):
        theta = p.detach().float()
        out.append(ewc.lam * f * (theta - a_e) + 2 * si.c * om * (theta - a_s))
    return out


class Iteration:
    """One fp16-autocast iteration under a GradScaler, with what the step saw: the unscaled ``.grad`` before
    clreg's hooks (``before``, read by a pre-hook registered first) and after them (``after``)."""

    def __init__(self, model: nn.Module, reg: clreg.Compose, opt: torch.optim.Optimizer, mode: str) -> None:
        self.model, self.reg, self.opt, self.mode = model, reg, opt, mode
        self.before: list[list[Tensor]] = []
        self.after: list[list[Tensor]] = []
        self.scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**12)
        opt.register_step_pre_hook(lambda o, a, k: self.before.append(self._grads()))
        if mode == "attached":
            reg.attach(opt, self.scaler)
        else:
            reg.track(opt, self.scaler)
        opt.register_step_pre_hook(lambda o, a, k: self.after.append(self._grads()))
        self.x, self.y = (t.to(DEVICE) for t in task_data("mlp", 1).tensors)

    def _grads(self) -> list[Tensor]:
        return [p.grad.detach().clone() for p in self.model.parameters()]

    def task_grad(self) -> list[Tensor]:
        """The task loss's gradient under the same autocast, without scaling (a power of two scales exactly)."""
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            loss = F.cross_entropy(self.model(self.x).float(), self.y)
        return list(torch.autograd.grad(loss, list(self.model.parameters())))

    def run(self, inject_inf: bool = False) -> dict:
        """Forward, backward, (an inf put in a gradient), ``scaler.step`` and ``update``; returns the
        parameters, SI's ω and step count and the scale before the step, and the task gradient."""
        params = list(self.model.parameters())
        si = self.reg["si"]
        state = {
            "theta": [p.detach().clone() for p in params],
            "omega": [w.clone() for w in si.omega.tensors],
            "steps": int(si.steps),
            "scale": self.scaler.get_scale(),
            "task": self.task_grad(),
            "penalty": penalty_grad(self.reg, params),
        }
        self.opt.zero_grad()
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            out = self.model(self.x)
            loss = F.cross_entropy(out.float(), self.y) + self.reg(self.model, inputs=self.x, outputs=out)
        self.scaler.scale(loss).backward()
        if inject_inf:
            params[0].grad.view(-1)[0] = float("inf")
        self.scaler.step(self.opt)
        self.scaler.update()
        return state


FP16_TOL = {"rtol": 1e-3, "atol": 1e-5}


def check_taken_step(it: Iteration, state: dict, lr: float) -> None:
    """The step taken: the penalty's gradient added once to the unscaled task gradient, the update made
    with it, and SI's ω moved by −g_task · Δθ (g_task without any penalty)."""
    before, after = it.before[-1], it.after[-1]
    params = list(it.model.parameters())
    for b, a, t, pen in zip(before, after, state["task"], state["penalty"]):
        if it.mode == "attached":  # clreg's hooks add the penalty after the unscale
            torch.testing.assert_close(b, t, **FP16_TOL)
            torch.testing.assert_close(a, b + pen, **FP16_TOL)
        else:  # the autograd mode: the penalty came through the (scaled) backward
            torch.testing.assert_close(b, t + pen, **FP16_TOL)
            torch.testing.assert_close(a, b)
    for p, theta, a in zip(params, state["theta"], after):
        torch.testing.assert_close(p.detach(), theta - lr * a, rtol=1e-5, atol=1e-6)
    si = it.reg["si"]
    assert int(si.steps) == state["steps"] + 1
    for w, w0, p, theta, t in zip(si.omega.tensors, state["omega"], params, state["theta"], state["task"]):
        torch.testing.assert_close(w - w0, -t * (p.detach() - theta), **FP16_TOL)


def check_skipped_step(it: Iteration, state: dict, hooks_before: int) -> None:
    """The step skipped: no hook ran, nothing moved, SI's path untouched, the scale halved."""
    assert len(it.before) == len(it.after) == hooks_before
    for p, theta in zip(it.model.parameters(), state["theta"]):
        assert torch.equal(p.detach(), theta)
    si = it.reg["si"]
    assert int(si.steps) == state["steps"]
    for w, w0 in zip(si.omega.tensors, state["omega"]):
        assert torch.equal(w, w0)
    assert it.scaler.get_scale() == state["scale"] / 2


def scaler_run(mode: str) -> tuple[Iteration, list[dict]]:
    model, reg = ewc_and_si(DEVICE)
    lr = 0.05
    it = Iteration(model, reg, torch.optim.SGD(model.parameters(), lr=lr), mode)
    states = []
    states.append(it.run())
    check_taken_step(it, states[-1], lr)
    states.append(it.run(inject_inf=True))
    check_skipped_step(it, states[-1], hooks_before=1)
    states.append(it.run())
    return it, states


def test_fp16_gradscaler_attached_through_a_skipped_step() -> None:
    it, states = scaler_run("attached")
    check_taken_step(it, states[-1], 0.05)
    assert len(it.after) == 2


def test_fp16_gradscaler_autograd_gradient_through_a_skipped_step() -> None:
    """The autograd mode's ``.grad`` at each step taken: the task's plus the penalty's, once."""
    it, states = scaler_run("autograd")
    before, state = it.before[-1], states[-1]
    for b, t, pen in zip(before, state["task"], state["penalty"]):
        torch.testing.assert_close(b, t + pen, **FP16_TOL)


def test_fp16_gradscaler_autograd_path_after_a_skipped_step() -> None:
    it, states = scaler_run("autograd")
    check_taken_step(it, states[-1], 0.05)


# -- bf16 / fp16 autocast forwards with the penalty ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", PENALTIES)
def test_autocast_forward_with_the_penalty(kind: str, dtype: torch.dtype) -> None:
    model, reg = prepared(kind, "conv", DEVICE)
    x, y = eval_batch("conv", DEVICE)
    state = copy.deepcopy(reg.state_dict())
    v32, g32 = value_and_grads(model, reg, x)
    reg.load_state_dict(state)  # the replay draws start again from the same counter
    with torch.autocast(DEVICE.type, dtype=dtype):
        out = model(x)
        value = reg(model, inputs=x, outputs=out)
        task = reg.incoming_loss(out, y) if isinstance(reg, ERACE) else F.cross_entropy(out, y)
    assert value.dtype == torch.float32 and math.isfinite(value.item())
    if kind in PARAM_ONLY:  # computed from the parameters in float32 whatever the autocast
        torch.testing.assert_close(value.detach(), v32, rtol=1e-5, atol=1e-7)
        params = list(model.parameters())
        g = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        for gi, ref, p in zip(g, g32, params):
            torch.testing.assert_close(torch.zeros_like(p) if gi is None else gi, ref, rtol=1e-5, atol=1e-7)
    else:  # through low-precision forwards: near the float32 value
        torch.testing.assert_close(value.detach(), v32, rtol=2e-2, atol=1e-3)
    model.zero_grad()
    (task + value).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# -- torch.compile -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ewc", "si", "kfac_ewc", "lwf", "lwf-cold"])
def test_compiled_training_step_equals_eager(kind: str) -> None:
    """The step's loss (forward, task loss, penalty) compiled, backward and step as usual; three steps,
    against the same steps eager on a twin (the same weights and state). ``lwf``: one eager call of the
    regularizer before the first step (on both twins); ``lwf-cold``: the first call is the compiled one."""
    torch.compiler.reset()
    backend = "aot_eager" if ON_CPU else "inductor"
    runs = {}
    for compiled in (False, True):
        model, reg = prepared(kind.removesuffix("-cold"), "mlp", DEVICE)
        x, y = eval_batch("mlp", DEVICE)
        if kind == "lwf":
            reg(model, inputs=x, outputs=model(x))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if reg.tracks_path:
            reg.track(opt)

        def loss_fn(x: Tensor, y: Tensor, model=model, reg=reg) -> tuple[Tensor, Tensor]:
            out = model(x)
            penalty = reg(model, inputs=x, outputs=out)
            return F.cross_entropy(out, y) + penalty, penalty

        fn = torch.compile(loss_fn, backend=backend) if compiled else loss_fn
        values = []
        for _ in range(3):
            opt.zero_grad()
            loss, penalty = fn(x, y)
            loss.backward()
            opt.step()
            values.append(torch.stack([loss.detach(), penalty.detach()]))
        runs[compiled] = (torch.stack(values), [p.detach() for p in model.parameters()], reg.state_dict())
    (v_e, p_e, s_e), (v_c, p_c, s_c) = runs[False], runs[True]
    assert (v_e[:, 1] > 0).all()
    torch.testing.assert_close(v_c, v_e, **VALUE_TOL)
    for a, b in zip(p_c, p_e):
        torch.testing.assert_close(a, b, **VALUE_TOL)
    for key, t in s_e.items():
        if isinstance(t, Tensor) and t.is_floating_point():
            torch.testing.assert_close(s_c[key], t, **STATE_TOL)


# -- the one-head model's latency --------------------------------------------------------------------


class OnDevice:
    """The one-head model on the device, called as :func:`~clreg.onehead.model.cpu_latency` calls it: each
    call moves its input there and waits for the GPU before it returns, so the wall-clock timing holds
    all the GPU's work (and, for the whole model, the image's copy to the device)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model.to(device), device

    def _done(self, out):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def eval(self) -> OnDevice:
        self.model.eval()
        return self

    def __call__(self, x: Tensor):
        return self._done(self.model(x.to(self.device)))

    def neck_features(self, x: Tensor) -> Tensor:
        return self._done(self.model.neck_features(x.to(self.device)))

    def head(self, neck: Tensor) -> Tensor:
        return self.model.head(neck)

    def split(self, t: Tensor, size) -> dict:
        return self._done(self.model.split(t, size))


def test_onehead_latency_at_512_within_the_challenge_limit(record_property) -> None:
    pytest.importorskip("timm", reason="the one-head model needs the benchmark extra (timm)")
    from clreg.onehead import UnifiedOneHead
    from clreg.onehead.model import cpu_latency

    torch.manual_seed(0)
    model = UnifiedOneHead(det_classes=10, seg_classes=21, cls_classes=10)
    size, repeats = (128, 3) if ON_CPU else (512, 50)
    lat = cpu_latency(OnDevice(model, DEVICE), size=size, repeats=repeats, warmup=5)
    for key in ("model_ms", "head_ms", "head_share", "size"):
        record_property(key, lat[key])
    record_property("device", torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu")
    assert lat["size"] == size and lat["head_ms"] > 0 and lat["model_ms"] > 0
    if not ON_CPU:
        assert lat["model_ms"] < 150.0, f"{lat['model_ms']:.1f} ms per 512×512 image, the limit is 150 ms"
