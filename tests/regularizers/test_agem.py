"""A-GEM: the projection against the paper's formula written here (flatten, dot, subtract), one SGD
step against a hand computation, the reference's draws, state, the ledger with SI, bad inputs."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import clreg
from clreg.functional.agem import agem_coefficient, agem_dots, agem_project, agem_project_
from clreg.regularizers.agem import AGEM
from models import rand_like_shapes, shapes

# -- the reference, from the paper (eq. 11) ----------------------------------------------------------


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def projected_by_formula(grads, reference) -> list[torch.Tensor]:
    """g − (g·r / r·r) r when g·r < 0, over the concatenation of every tensor; split back."""
    g, r = flat(grads), flat(reference)
    dot = torch.dot(g, r)
    if dot < 0:
        g = g - dot / torch.dot(r, r) * r
    out, start = [], 0
    for t in grads:
        out.append(g[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return out


# -- the functional core -----------------------------------------------------------------------------


@given(shapes, st.integers(0, 2**31 - 1), st.booleans())
def test_projection_equals_the_formula(shape_list, seed, conflict) -> None:
    grads = rand_like_shapes(shape_list, torch.float64, seed)
    ref = rand_like_shapes(shape_list, torch.float64, seed + 1)
    if conflict == (torch.dot(flat(grads), flat(ref)) >= 0):  # both cases, whatever the draw
        ref = [-r for r in ref]
    out = agem_project(grads, ref)
    for o, e in zip(out, projected_by_formula(grads, ref)):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)


@given(shapes, st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_projection_properties(shape_list, seed, scale) -> None:
    grads = rand_like_shapes(shape_list, torch.float64, seed)
    ref = [scale * r for r in rand_like_shapes(shape_list, torch.float64, seed + 7)]
    g, r = flat(grads), flat(ref)
    out = flat(agem_project(grads, ref))
    tol = 1e-10 * float(g.norm() * r.norm())
    assert float(torch.dot(out, r)) >= -tol  # no conflict left
    assert float(out.norm()) <= float(g.norm()) * (1 + 1e-12)  # the norm never grows
    if torch.dot(g, r) >= 0:
        assert torch.equal(out, g)  # unchanged when there is no conflict


def test_projection_is_over_every_tensor_at_once() -> None:
    # per tensor, the first would be projected (1·-1 < 0); over the whole vector g·r = -1 + 4 > 0: unchanged
    grads, ref = [torch.tensor([1.0]), torch.tensor([2.0])], [torch.tensor([-1.0]), torch.tensor([2.0])]
    assert all(torch.equal(a, b) for a, b in zip(agem_project(grads, ref), grads))
    torch.testing.assert_close(agem_dots(grads, ref), torch.tensor([3.0, 5.0]))


def test_projection_edge_cases_and_dtypes() -> None:
    g = [torch.tensor([1.0, -1.0])]
    assert torch.equal(agem_project(g, [torch.zeros(2)])[0], g[0])  # g_ref = 0: nothing to project on
    assert agem_coefficient(-1.0, 0.0) == 0.0 and agem_coefficient(float("nan"), 1.0) == 0.0
    assert agem_coefficient(-2.0, 4.0) == -0.5 and agem_coefficient(0.0, 4.0) == 0.0
    bf = [torch.tensor([1.0, -2.0], dtype=torch.bfloat16)]
    assert agem_dots(bf, [torch.tensor([0.0, 1.0])]).dtype == torch.float32
    agem_project_(bf, [torch.tensor([0.0, 1.0])], -2.0)
    assert bf[0].dtype == torch.bfloat16 and bf[0].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="as many reference"):
        agem_project(g, [])
    with pytest.raises(ValueError, match="shape"):
        agem_project(g, [torch.zeros(3)])


# -- one SGD step by hand ----------------------------------------------------------------------------

LR = 0.1


def mse(m, x, y) -> torch.Tensor:
    return ((m(x).squeeze(-1) - y) ** 2).mean()


def regression_model() -> torch.nn.Linear:
    model = torch.nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.25, 1.0]]))
        model.bias.fill_(0.1)
    return model


def mse_grads(w, b, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """∇ of mean((x·w + b − y)²): (2/n) Σ r x and (2/n) Σ r, r the residual."""
    r = x @ w + b - y
    return 2 * (r[:, None] * x).mean(0), 2 * r.mean()


def make_data(seed: int, n: int, target: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, torch.full((n,), target, dtype=torch.float64) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)


class Spy:
    """A reference loss that records what it was given."""

    def __init__(self, loss=mse) -> None:
        self.loss, self.calls = loss, []

    def __call__(self, m, x, y):
        self.calls.append((x.clone(), y.clone()))
        return self.loss(m, x, y)


@pytest.mark.parametrize("conflict", [True, False])
@pytest.mark.parametrize("sample_size", [6, 2])  # the whole memory (any order), or a seeded draw of 2
def test_one_sgd_step_equals_hand_computation(conflict, sample_size) -> None:
    model = regression_model()
    mem_x, mem_y = make_data(1, 6, 5.0)
    x, y = make_data(2, 4, -5.0 if conflict else 5.0)
    memory = clreg.ReplayBuffer(6, seed=0)
    memory.add("old", (mem_x, mem_y))
    spy = Spy()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    agem = AGEM(model, spy, memory=memory, sample_size=sample_size, seed=3).attach(opt)
    w0, b0 = model.weight.detach()[0].clone(), model.bias.detach()[0].clone()
    opt.zero_grad()
    mse(model, x, y).backward()
    opt.step()

    ((drawn_x, drawn_y),) = spy.calls
    if sample_size == 6:  # every stored sample, once
        assert sorted(drawn_x[:, 0].tolist()) == sorted(mem_x[:, 0].tolist())
    gw, gb = mse_grads(w0, b0, x, y)
    rw, rb = mse_grads(w0, b0, drawn_x, drawn_y)
    g, r = torch.cat([gw, gb[None]]), torch.cat([rw, rb[None]])
    dot = torch.dot(g, r)
    assert (dot < 0) == conflict  # the case is what it says
    if dot < 0:
        g = g - dot / torch.dot(r, r) * r
    torch.testing.assert_close(model.weight.detach()[0], w0 - LR * g[:3], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.bias.detach()[0], b0 - LR * g[3], rtol=1e-12, atol=1e-12)
    assert (int(agem.steps), int(agem.draws), int(agem.projections)) == (1, 1, int(conflict))


def test_the_draw_is_fixed_by_the_seed_and_the_counter() -> None:
    def drawn(seed: int) -> list[list[float]]:
        model, memory, spy = regression_model(), clreg.ReplayBuffer(8, seed=0), Spy()
        memory.add(0, make_data(1, 8, 1.0))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        AGEM(model, spy, memory=memory, sample_size=3, seed=seed).attach(opt)
        for _ in range(3):
            opt.zero_grad()
            mse(model, *make_data(2, 4, 0.0)).backward()
            opt.step()
        return [c[0][:, 0].tolist() for c in spy.calls]

    first = drawn(5)
    assert first == drawn(5) and first != drawn(6)
    assert len({tuple(d) for d in first}) == 3  # each step a new draw


# -- what the reference is made of ------------------------------------------------------------------


def capture_after(opt, model) -> list[list[torch.Tensor]]:
    """A step pre-hook registered now (after A-GEM's): the gradients the optimizer will use."""
    seen: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(
        lambda o, a, k: seen.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
    )
    return seen


def test_mapping_loss_weights_tasks_by_their_share_of_the_draw() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4).double()
    memory = clreg.ReplayBuffer(5, seed=1)
    memory.add("a", (torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))))
    memory.add("b", (torch.randn(5, 3, dtype=torch.float64), torch.randint(2, 4, (5,))))
    spies = {
        "a": Spy(lambda m, x, y: F.cross_entropy(m(x), y)),
        "b": Spy(lambda m, x, y: F.mse_loss(m(x)[:, 0], y.double())),
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    AGEM(model, spies, memory=memory, sample_size=3).attach(opt)
    seen = capture_after(opt, model)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 4, (4,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = [p.grad.clone() for p in model.parameters()]
    opt.step()

    (xa, ya), (xb, yb) = spies["a"].calls[0], spies["b"].calls[0]
    assert (len(xa), len(xb)) == (2, 1)  # k = 3 over two tasks: the first gets one more
    ref_loss = 2 / 3 * F.cross_entropy(model(xa), ya) + 1 / 3 * F.mse_loss(model(xb)[:, 0], yb.double())
    ref = torch.autograd.grad(ref_loss, list(model.parameters()))
    for got, want in zip(seen[0], projected_by_formula(g, ref)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_reference_every_reuses_the_last_draw() -> None:
    model = regression_model()
    memory = clreg.ReplayBuffer(6, seed=0)
    memory.add(0, make_data(1, 6, 5.0))
    spy = Spy()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    agem = AGEM(model, spy, memory=memory, sample_size=2, reference_every=2).attach(opt)
    seen = capture_after(opt, model)
    x, y = make_data(2, 4, -5.0)
    grads, params = [], []
    for _ in range(3):
        params.append(copy.deepcopy(model))
        opt.zero_grad()
        mse(model, x, y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    assert len(spy.calls) == 2 and int(agem.draws) == 2  # steps 1 and 3 draw, step 2 reuses
    refs = []
    for step, call in ((0, 0), (0, 0), (2, 1)):  # the reference of step 2 is step 1's, at step 1's parameters
        m = params[step]
        refs.append(torch.autograd.grad(mse(m, *spy.calls[call]), list(m.parameters())))
    for got, g, r in zip(seen, grads, refs):
        for a, b in zip(got, projected_by_formula(g, r)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert int(agem.projections) == 3


def test_a_parameter_without_gradient_is_left_out() -> None:
    torch.manual_seed(2)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 1), "b": torch.nn.Linear(3, 1)}).double()
    memory = clreg.ReplayBuffer(4)
    memory.add(0, make_data(1, 4, 5.0))
    both = lambda m, x, y: ((m["a"](x) + m["b"](x)).squeeze(-1) - y).pow(2).mean()  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    AGEM(model, Spy(both), memory=memory, sample_size=4).attach(opt)
    seen = capture_after(opt, model)
    x, y = make_data(2, 4, -5.0)
    opt.zero_grad()
    mse(model["a"], x, y).backward()  # "b" gets no gradient
    g = [model["a"].weight.grad.clone(), model["a"].bias.grad.clone()]
    opt.step()
    mx, my = memory.sample(4, torch.Generator().manual_seed(0))[0]  # every stored sample: the draw's order is moot
    ref = torch.autograd.grad(both(model, mx, my), [model["a"].weight, model["a"].bias])
    assert seen[0][2] is None and seen[0][3] is None
    for got, want in zip(seen[0][:2], projected_by_formula(g, ref)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# -- state -------------------------------------------------------------------------------------------


def run_steps(model, opt, n) -> list[list[torch.Tensor]]:
    seen = []
    for i in range(n):
        opt.zero_grad()
        mse(model, *make_data(10 + i, 4, -5.0)).backward()
        opt.step()
        seen.append([p.detach().clone() for p in model.parameters()])
    return seen


def test_state_round_trip_mid_task_gives_the_same_next_projections() -> None:
    def build(model):
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        agem = AGEM(model, Spy(), capacity_per_task=5, sample_size=2, reference_every=3, seed=4)
        return agem.attach(opt), opt

    model = regression_model()
    agem, opt = build(model)
    run_steps(model, opt, 2)  # no memory yet: plain steps
    agem.consolidate(model, TensorDataset(*make_data(1, 9, 5.0)))
    run_steps(model, opt, 4)  # draws at steps 1 and 4 of the task: mid-way through the second reference
    buf = io.BytesIO()
    torch.save(agem.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    twin = copy.deepcopy(model)
    fresh, twin_opt = build(twin)
    fresh.load_state_dict(state, strict=True)
    assert len(fresh.memory) == 5 and int(fresh.age) == 1 and int(fresh.draws) == 2
    ours, theirs = run_steps(model, opt, 4), run_steps(twin, twin_opt, 4)  # two reuses, a new draw, a reuse
    for a, b in zip(ours, theirs):
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert agem.loss_fn.calls[-1][0].equal(fresh.loss_fn.calls[-1][0])  # the same samples drawn
    assert int(fresh.projections) > 0 and int(agem.projections) == int(fresh.projections)

    other, _ = build(copy.deepcopy(model))  # without the state, the next steps differ
    assert int(other.draws) == 0 and len(other.memory) == 0


def test_state_keys_and_bytes() -> None:
    model = regression_model()
    agem = AGEM(model, mse, capacity_per_task=3)
    agem.consolidate(model, (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)))
    keys = set(agem.state_dict())
    assert {"steps", "draws", "projections", "age", "n_tasks", "memory._extra_state", "_extra_state"} <= keys
    assert agem.get_extra_state()["config"] == {"sample_size": 64, "reference_every": 1, "seed": 0}
    assert agem.state_bytes() >= 3 * (3 + 1) * 8  # the memory's samples count


# -- consolidate and the memory -----------------------------------------------------------------------


def test_consolidate_fills_its_own_memory() -> None:
    model = regression_model()
    agem = AGEM(model, mse, capacity_per_task=4, seed=1)
    x, y = torch.arange(30.0).view(10, 3).double(), torch.arange(10.0).double()
    agem.consolidate(model, TensorDataset(x, y))
    agem.consolidate(model, DataLoader(TensorDataset(x + 100, y + 100), batch_size=3))
    assert agem.memory.tasks == [0, 1] and len(agem.memory) == 8
    for task, offset in ((0, 0.0), (1, 100.0)):
        stored = agem.memory.samples(task)
        firsts = [float(s[0][0]) for s in stored]
        assert len(set(firsts)) == 4 and all((f - offset) in x[:, 0].tolist() for f in firsts)
        assert all(float(s[1]) == (float(s[0][0]) - offset) / 3 + offset for s in stored)  # pairs kept together
    with pytest.raises(ValueError, match="needs the task's data"):
        agem.consolidate(model)
    with pytest.raises(TypeError, match="Dataset"):
        agem.consolidate(model, torch.zeros(3))


def test_a_given_memory_is_left_alone() -> None:
    model, memory = regression_model(), clreg.ReplayBuffer(2)
    agem = AGEM(model, mse, memory=memory)
    agem.consolidate(model, TensorDataset(*make_data(1, 4, 0.0)))
    assert len(memory) == 0 and agem.memory is memory and int(agem.n_tasks) == 1


# -- modes, Compose and the ledger --------------------------------------------------------------------


def test_forward_is_zero_and_compose_attaches_it() -> None:
    model = regression_model()
    ewc = clreg.EWC(model, lam=2.0)
    agem = AGEM(model, mse, capacity_per_task=3, sample_size=3)
    reg = clreg.Compose(ewc, agem)
    value = agem(model)
    assert value.item() == 0.0 and value.device == model.weight.device and not value.requires_grad
    assert reg.members_that("attachable") == [ewc, agem] and reg.members_that("tracks_path") == []
    reg.consolidate(model, TensorDataset(*make_data(1, 5, 5.0)))
    assert len(agem.memory) == 3 and int(ewc.n_tasks) == 1
    with torch.no_grad():
        model.weight.add_(0.1)
    torch.testing.assert_close(reg(model), ewc(model))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    reg.attach(opt)
    assert agem.attached and ewc.attached
    run_steps(model, opt, 1)
    assert int(agem.draws) == 1


def test_pre_step_without_hook_equals_the_hook() -> None:
    results = []
    for hook in (True, False):
        model = regression_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        agem = AGEM(model, mse, capacity_per_task=4, sample_size=4)
        agem.consolidate(model, TensorDataset(*make_data(1, 4, 5.0)))
        agem.attach(opt, hook=hook)
        opt.zero_grad()
        mse(model, *make_data(2, 4, -5.0)).backward()
        if not hook:
            agem.pre_step()
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
        assert int(agem.projections) == 1
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("path_gradient", ["task", "total"])
@pytest.mark.parametrize("order", ["agem_first", "si_first"])
@pytest.mark.parametrize("si_mode", ["attach", "track"])
def test_si_integrates_the_task_gradient_along_projected_steps(path_gradient, order, si_mode) -> None:
    model = regression_model()
    memory = clreg.ReplayBuffer(6, seed=0)
    memory.add(0, make_data(1, 6, 5.0))
    si = clreg.SI(model, c=0.5, xi=0.1, path_gradient=path_gradient)
    agem = AGEM(model, mse, memory=memory, sample_size=6)
    agem.ledger = si.ledger
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    before = capture_after(opt, model)  # registered first: the task gradient, before any hook
    for r in (agem, si) if order == "agem_first" else (si, agem):
        getattr(r, si_mode if r is si else "attach")(opt)
    after = capture_after(opt, model)  # registered last: what the optimizer uses
    run_steps(model, opt, 2)
    si.consolidate(model)  # from here SI (attached) adds its own penalty too
    before.clear(), after.clear()
    params = [[p.detach().clone() for p in model.parameters()]]
    params += run_steps(model, opt, 3)
    assert int(agem.projections) >= 4
    used = before if path_gradient == "task" else after
    for k, omega in enumerate(si.omega.tensors):
        want = -sum(used[s][k] * (params[s + 1][k] - params[s][k]) for s in range(3))
        torch.testing.assert_close(omega, want, rtol=1e-10, atol=1e-12)
    assert not torch.equal(before[0][0], after[0][0])  # the projection did change the gradient


# -- bad inputs ---------------------------------------------------------------------------------------


def step_with(loss_fn) -> None:
    model = regression_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    agem = AGEM(model, loss_fn, capacity_per_task=2, sample_size=2).attach(opt)
    agem.consolidate(model, TensorDataset(*make_data(1, 2, 0.0)))
    run_steps(model, opt, 1)


def test_empty_memory_means_no_projection_and_no_draw() -> None:
    model, twin = regression_model(), regression_model()
    spy = Spy()
    opt, twin_opt = torch.optim.SGD(model.parameters(), lr=LR), torch.optim.SGD(twin.parameters(), lr=LR)
    agem = AGEM(model, spy, capacity_per_task=2).attach(opt)
    for a, b in zip(run_steps(model, opt, 2), run_steps(twin, twin_opt, 2)):
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert spy.calls == [] and (int(agem.steps), int(agem.draws), int(agem.projections)) == (2, 0, 0)


def test_attach_twice_is_an_error() -> None:
    model = regression_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    agem = AGEM(model, mse, capacity_per_task=2).attach(opt)
    with pytest.raises(ValueError, match="already attached"):
        agem.attach(opt)
    agem.detach()
    agem.attach(opt)  # after detach: fine


def test_bad_losses() -> None:
    with pytest.raises(ValueError, match=r"scalar \(0-d\).*shape \(2,\)"):
        step_with(lambda m, x, y: (m(x).squeeze(-1) - y) ** 2)
    with pytest.raises(TypeError, match="must return a scalar tensor, got float"):
        step_with(lambda m, x, y: 1.0)
    with pytest.raises(ValueError, match="without a gradient"):
        step_with(lambda m, x, y: y.sum())
    with pytest.raises(ValueError, match="NaN or inf"):
        step_with(lambda m, x, y: mse(m, x, y) * float("nan"))
    with pytest.raises(ValueError, match="has no loss for it"):
        step_with({5: mse})


def test_bad_settings() -> None:
    model = regression_model()
    with pytest.raises(ValueError, match="exactly one of memory"):
        AGEM(model, mse)
    with pytest.raises(ValueError, match="exactly one of memory"):
        AGEM(model, mse, clreg.ReplayBuffer(2), capacity_per_task=2)
    with pytest.raises(TypeError, match="ReplayBuffer"):
        AGEM(model, mse, memory=[1, 2])
    with pytest.raises(TypeError, match="callable"):
        AGEM(model, "mse", capacity_per_task=2)
    with pytest.raises(TypeError, match="task 0 has a str"):
        AGEM(model, {0: "mse"}, capacity_per_task=2)
    with pytest.raises(ValueError, match="empty"):
        AGEM(model, {}, capacity_per_task=2)
    for kw, err in (
        ({"sample_size": 0}, ValueError),
        ({"sample_size": 2.0}, TypeError),
        ({"reference_every": 0}, ValueError),
        ({"reference_every": True}, TypeError),
        ({"seed": -1}, ValueError),
        ({"capacity_per_task": 0}, ValueError),
    ):
        with pytest.raises(err, match=next(iter(kw))):
            AGEM(model, mse, **{"capacity_per_task": 2, **kw})
    agem = AGEM(model, mse, capacity_per_task=2)
    with pytest.raises(ValueError, match="sample_size must be >= 1"):
        agem.sample_size = -3


def test_sharded_parameters_need_a_fresh_reference_every_step(monkeypatch) -> None:
    monkeypatch.setattr(clreg._params.ParamSet, "sharded", property(lambda self: True))
    AGEM(regression_model(), mse, capacity_per_task=2)
    with pytest.raises(ValueError, match=r"FSDP2 needs reference_every=1"):
        AGEM(regression_model(), mse, capacity_per_task=2, reference_every=3)


def test_bfloat16_parameters() -> None:
    model = regression_model().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agem = AGEM(model, mse, capacity_per_task=4, sample_size=4, reference_every=2)
    agem.consolidate(model, TensorDataset(*(t.bfloat16() for t in make_data(1, 4, 5.0))))
    agem.attach(opt)
    seen = capture_after(opt, model)
    opt.zero_grad()
    mse(model, *(t.bfloat16() for t in make_data(2, 4, -5.0))).backward()
    opt.step()
    assert agem.reference.tensors[0].dtype == torch.float32 and seen[0][0].dtype == torch.bfloat16
    mx, my = agem.memory.sample(4, torch.Generator().manual_seed(0))[0]
    ref = torch.autograd.grad(mse(model, mx, my), list(model.parameters()))
    assert float(torch.dot(flat(seen[0]), flat(ref))) >= -0.05 * float(flat(seen[0]).norm() * flat(ref).norm())
