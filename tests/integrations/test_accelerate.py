"""clreg in a plain ``accelerate.Accelerator`` loop with gradient accumulation.

The reference is a loop written here in plain PyTorch (no Accelerate, no clreg): every window of
m ≤ k micro-batches (m = k but in a last, shorter window at the end of the data, where Accelerate also
steps) is one SGD-with-momentum step on

    g = (1/k) Σ_{j ≤ m} ∇L_j(θ)  +  s · λ F ⊙ (θ − θ*)

The first term is what Accelerate's ``backward`` leaves in ``.grad``: each micro-batch's loss divided
by k (by k also in the shorter window). The second is the gradient of clreg's EWC,
(λ/2) Σ_i F_i (θ_i − θ*_i)² (the ½ of Kirkpatrick et al., so the gradient has no 2), with s = 1 when it
is attached (added once per optimizer step) and s = m/k in the autograd mode (the penalty rides in each
micro-batch's loss and is divided by k with it). F is the ``exact`` Fisher written here from its
definition (the mean over samples of Σ_c p_c (∂ log p_c / ∂θ)²), θ* the parameters at the
consolidation. SI's path is ω = −Σ_steps g_task ⊙ Δθ over the optimizer steps, g_task the first term.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("accelerate")

from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.state import AcceleratorState, GradientState

from clreg.regularizers.compose import Compose
from clreg.regularizers.ewc import EWC
from clreg.regularizers.si import SI

K = 4  # micro-batches per optimizer step
MICRO = 2  # samples per micro-batch
N = 20  # task-2 samples: 10 micro-batches, so windows of 4, 4 and 2 (the end of the data) per epoch
N_FULL = 16  # 8 micro-batches: windows of 4 and 4
EPOCHS = 2  # 6 optimizer steps in all
LR, MU, LAM = 0.1, 0.9, 5.0


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate's state is shared by every Accelerator of a process: start and leave it clean."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def data(t: int, n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(10 + t)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    return TensorDataset(x, (x @ w).argmax(1))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def exact_fisher(model: nn.Module, ds: TensorDataset) -> list[torch.Tensor]:
    """F_i = (1/N) Σ_n Σ_c p(c|x_n) (∂ log p(c|x_n) / ∂θ_i)², one backward per sample and class."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    x = ds.tensors[0]
    for n in range(len(x)):
        logp = F.log_softmax(model(x[n : n + 1]), dim=1)[0]
        for c in range(logp.numel()):
            grads = torch.autograd.grad(logp[c], params, retain_graph=True)
            for t, g in zip(total, grads):
                t.add_(logp[c].exp().detach() * g**2)
    return [t / len(x) for t in total]


def task1_then_move(model: nn.Module) -> tuple[EWC, list[torch.Tensor], list[torch.Tensor]]:
    """EWC consolidated on task 1 at the initial parameters (the anchor), then the parameters moved away
    from it so the penalty's gradient is not zero from the first step. Returns (ewc, F, θ*)."""
    task1 = data(1, 12)
    ewc = EWC(model, lam=LAM, estimator="exact")
    ewc.consolidate(model, task1)
    fisher = exact_fisher(model, task1)
    anchor = [p.detach().clone() for p in model.parameters()]
    for have, want in zip(ewc.importance.tensors, fisher):  # the Fisher the reference uses is EWC's
        torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return ewc, fisher, anchor


def reference(
    model: nn.Module,
    fisher: list[torch.Tensor],
    anchor: list[torch.Tensor],
    *,
    n: int = N,
    per_micro_batch: bool = False,
    penalty_times: float = 1.0,
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Plain PyTorch: (θ after every step, SI's ω, the number of optimizer steps). The penalty's share
    of a step: ``penalty_times``, times m/k with ``per_micro_batch`` (the autograd mode)."""
    names = [name for name, _ in model.named_parameters()]
    theta = [p.detach().clone() for p in model.parameters()]
    x, y = data(2, n).tensors
    micro = [(x[i : i + MICRO], y[i : i + MICRO]) for i in range(0, n, MICRO)]
    buf: list[torch.Tensor] | None = None
    omega = [torch.zeros_like(t) for t in theta]
    steps = 0
    for _ in range(EPOCHS):
        for start in range(0, len(micro), K):
            leaves = [t.clone().requires_grad_(True) for t in theta]
            loss = sum(
                F.cross_entropy(functional_call(model, dict(zip(names, leaves)), (xb,)), yb) / K
                for xb, yb in micro[start : start + K]
            )
            task = torch.autograd.grad(loss, leaves)
            share = penalty_times * (len(micro[start : start + K]) / K if per_micro_batch else 1.0)
            g = [gt + share * LAM * f * (t - a) for gt, f, t, a in zip(task, fisher, theta, anchor)]
            buf = g if buf is None else [MU * b + gi for b, gi in zip(buf, g)]
            new = [t - LR * b for t, b in zip(theta, buf)]
            omega = [o - gt * (nt - t) for o, gt, nt, t in zip(omega, task, new, theta)]
            theta, steps = new, steps + 1
    return theta, omega, steps


def accelerate_loop(model: nn.Module, reg: nn.Module, mode: str, n: int = N) -> None:
    """Task 2 in a plain Accelerate loop with accumulation. ``mode``: ``"attached"`` (EWC and SI on the
    torch optimizer under Accelerate's wrapper, nothing in the loss), ``"autograd"`` (the penalties in each
    micro-batch's loss, SI tracking the torch optimizer) or ``"wrapper"`` (attached to the wrapper)."""
    accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MU)
    loader = DataLoader(data(2, n), batch_size=MICRO)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    assert isinstance(opt, AcceleratedOptimizer) and type(opt.optimizer) is torch.optim.SGD
    if mode == "attached":
        reg.attach(opt.optimizer)
    elif mode == "wrapper":
        reg.attach(opt)
    else:
        for tracker in reg.members_that("tracks_path") if isinstance(reg, Compose) else []:
            tracker.track(opt.optimizer)
    for _ in range(EPOCHS):
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                if mode == "autograd":
                    loss = loss + reg(model)
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()


def close(have: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for h, w in zip(have, want, strict=True):
        torch.testing.assert_close(h, w, rtol=1e-9, atol=1e-11)


def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_attached_the_penalty_gradient_is_added_once_per_optimizer_step() -> None:
    """Attached to ``opt.optimizer``: Accelerate calls the torch optimizer's ``step`` only when it syncs
    (every k-th micro-batch and at the end of the data), so the pre-hook adds λF(θ−θ*) once per step,
    the short last window included. 20 micro-batch passes, 6 steps: the reference's parameters."""
    model = net()
    ewc, fisher, anchor = task1_then_move(model)
    want, _, steps = reference(model, fisher, anchor)
    assert steps == 6
    # the check can fail: the penalty twice per step, or not at all, lands elsewhere
    assert distance(reference(model, fisher, anchor, penalty_times=2.0)[0], want) > 1e-3
    assert distance(reference(model, fisher, anchor, penalty_times=0.0)[0], want) > 1e-3
    accelerate_loop(model, ewc, "attached")
    close([p.detach() for p in model.parameters()], want)


@pytest.mark.parametrize("n", [N_FULL, N])
def test_autograd_the_penalty_is_divided_by_k_with_each_micro_batchs_loss(n: int) -> None:
    """The penalty in each micro-batch's loss: Accelerate divides it by k with the task loss, and θ does
    not move within a window, so a full window's k shares add up to the attached mode's once-per-step
    gradient (n = 16: the same parameters as the attached reference). A short last window of m
    micro-batches gets m/k of it, as the task loss does (n = 20: the reference with that share, which is
    not the attached one)."""
    model = net()
    ewc, fisher, anchor = task1_then_move(model)
    want, _, _ = reference(model, fisher, anchor, n=n, per_micro_batch=True)
    once, _, _ = reference(model, fisher, anchor, n=n)
    if n == N_FULL:
        close(want, once)
    else:
        assert distance(want, once) > 1e-3
    accelerate_loop(model, ewc, "autograd", n=n)
    close([p.detach() for p in model.parameters()], want)


def test_attaching_to_accelerates_wrapper_is_refused() -> None:
    """``accelerator.prepare`` returns an AcceleratedOptimizer: an Optimizer subclass that never ran
    ``Optimizer.__init__`` (no hook tables) and whose own ``step`` is not hooked. Attaching to it is a
    TypeError that names the torch optimizer inside, before any step."""
    model = net()
    ewc, _, _ = task1_then_move(model)
    start = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"AcceleratedOptimizer wraps an optimizer.*AcceleratedOptimizer\.optimizer"):
        accelerate_loop(model, ewc, "wrapper")
    assert not ewc.attached
    close([p.detach() for p in model.parameters()], start)


@pytest.mark.parametrize("mode", ["attached", "autograd"])
def test_si_counts_one_step_per_optimizer_step_and_integrates_the_task_gradient(mode: str) -> None:
    """SI's step post-hook on the torch optimizer runs once per optimizer step: 6 steps for 20
    micro-batches, not 20; its ω is −Σ g_task ⊙ Δθ with g_task the mean of the micro-batches' task
    gradients, EWC's share subtracted: added once by the attached hook, or recorded from the window's
    autograd backward passes (each divided by k) and summed."""
    model = net()
    ewc, fisher, anchor = task1_then_move(model)
    si = SI(model, c=1.0, xi=0.1)  # its path starts here; no task consolidated, so no penalty of its own
    reg = Compose(ewc, si)
    want, omega, steps = reference(model, fisher, anchor, per_micro_batch=mode == "autograd")
    accelerate_loop(model, reg, mode)
    assert int(si.steps) == steps == 6
    close([p.detach() for p in model.parameters()], want)
    assert max(float(o.abs().max()) for o in omega) > 1e-3
    close(list(si.omega.tensors), omega)
    close(list(si.previous.tensors), want)
    si.consolidate(model)  # the path of this task is consolidated as in a plain loop
    assert int(si.steps) == 0 and any(float(w.abs().sum()) > 0 for w in si.importance.tensors)


def test_save_state_and_load_state_carry_a_registered_regularizer(tmp_path) -> None:
    """``accelerator.register_for_checkpointing(reg)``: ``save_state`` writes the regularizer's
    ``state_dict`` beside the model's, and ``load_state`` in a restarted process (a fresh Accelerator,
    model and regularizer) puts it back: EWC's Fisher and anchor, SI's path and step count."""
    model = net()
    ewc, _, _ = task1_then_move(model)
    reg = Compose(ewc, SI(model, c=1.0, xi=0.1))
    accelerate_loop(model, reg, "attached")
    reg.detach()
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(model)
    accelerator.register_for_checkpointing(reg)
    accelerator.save_state(tmp_path / "ckpt")
    saved = {k: v.clone() for k, v in reg.state_dict().items() if isinstance(v, torch.Tensor)}
    assert int(saved["members.1.steps"]) == 6 and int(saved["members.0.n_tasks"]) == 1

    AcceleratorState._reset_state(True)  # a restarted process
    GradientState._reset_state()
    model2 = net()
    fresh = Compose(EWC(model2, lam=LAM, estimator="exact"), SI(model2, c=1.0, xi=0.1))
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(model2)
    accelerator.register_for_checkpointing(fresh)
    accelerator.load_state(tmp_path / "ckpt")
    loaded = fresh.state_dict()
    assert saved.keys() <= loaded.keys()
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name
    close([p.detach() for p in model2.parameters()], [p.detach() for p in model.parameters()])
    assert fresh["ewc"](model2).item() == reg["ewc"](model).item() > 0


@pytest.mark.parametrize("processes", [1, 2])
def test_the_example_runs(processes: int, tmp_path) -> None:
    """The example with --smoke, in one process and under DDP with two (gloo, torchrun's free port): 10
    micro-batches of task 1 and k = 4 make 3 optimizer steps (4, 4, 2); split over two processes, each
    takes 2 for its 5 (4, 1)."""
    root = Path(__file__).resolve().parents[2]
    script = [str(root / "examples" / "accelerate_loop.py"), "--smoke", "--path", str(tmp_path / "clreg.pt")]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if processes == 2 else []
    out = subprocess.run(
        [sys.executable, *launch, *script],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    steps = "task 1: 3 optimizer steps, 10 micro-batches" if processes == 1 else "task 1: 2 optimizer steps, 5 "
    for line in (steps, "restored exactly: True", "naive fine-tuning: task 1", "EWC + SI + LwF:    task 1"):
        assert out.stdout.count(line) == 1, out.stdout  # printed by the main process alone
