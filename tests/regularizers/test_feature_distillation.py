"""FeatureDistillation: each loss against its paper's definition written here, features computed by
calling the submodules by hand on the model and on a copy of it taken at the consolidation; gradients
against autograd of that reference; the watched forward against the second forward; the contract."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import clreg
from clreg.functional.feature_distillation import (
    cosine_feature_distillation,
    l2_feature_distillation,
    pod_spatial_distillation,
)
from clreg.regularizers.feature_distillation import FeatureDistillation
from clreg.testing import check_regularizer
from feature_distillation_worker import ConvNet

KINDS = ("l2", "cosine", "pod")
MODULES = ["stem", "block.0"]  # a Conv-BN-Tanh block's output and a bare conv's, both (B, C, H, W)


class TinyCNN(ConvNet):
    """stem: Conv(3→4)-BN-Tanh; block: Conv(4→5)-Tanh; head: global mean, Linear."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__((3, 4, 5), seed)


def features_by_hand(model: TinyCNN, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of ``stem`` and ``block.0`` from calling the submodules directly."""
    h = model.stem(x)
    return {"stem": h, "block.0": model.block[0](h)}


# -- the definitions, written from the papers ---------------------------------------------------------


def lfl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """LFL: (1/B) Σ_b ‖s_b − t_b‖², the squared norm over every element of a sample's feature."""
    return sum(((s[b] - t[b]) ** 2).sum() for b in range(len(s))) / len(s)


def lucir(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """LUCIR: (1/B) Σ_b (1 − ⟨s_b, t_b⟩ / (‖s_b‖ ‖t_b‖))."""
    total = 0.0
    for b in range(len(s)):
        u, v = s[b].flatten(), t[b].flatten()
        total = total + 1 - (u @ v) / (u.norm() * v.norm())
    return total / len(s)


def pod(s: torch.Tensor, t: torch.Tensor, square: bool = True, normalize: bool = True) -> torch.Tensor:
    """PODNet POD-spatial, per sample, on a = h² (``square``, the released implementation) or a = h
    (the paper's equations): the width pooling Σ_w a (C×H) and the height pooling Σ_h a (C×W).
    ``normalize`` (the released implementation): Φ = [width ‖ height] / ‖[width ‖ height]‖, then
    ‖Φ_s − Φ_t‖ (not squared). Otherwise (the paper's equations) POD-width + POD-height:
    Σ_c Σ_h (Σ_w a_s − Σ_w a_t)² + Σ_c Σ_w (Σ_h a_s − Σ_h a_t)². Mean over the batch."""

    def pooled(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # h: (C, H, W)
        a = h**2 if square else h
        width_pooled = torch.stack([a[:, :, w] for w in range(a.shape[2])]).sum(0)  # (C, H)
        height_pooled = torch.stack([a[:, r, :] for r in range(a.shape[1])]).sum(0)  # (C, W)
        return width_pooled, height_pooled

    def unit(h: torch.Tensor) -> torch.Tensor:
        v = torch.cat([p.flatten() for p in pooled(h)])
        return v / v.norm()

    total = 0.0
    for b in range(len(s)):
        if normalize:
            total = total + (unit(s[b]) - unit(t[b])).norm()
        else:
            (ws, hs), (wt, ht) = pooled(s[b]), pooled(t[b])
            pod_width = sum((ws[c, r] - wt[c, r]) ** 2 for c in range(ws.shape[0]) for r in range(ws.shape[1]))
            pod_height = sum((hs[c, w] - ht[c, w]) ** 2 for c in range(hs.shape[0]) for w in range(hs.shape[1]))
            total = total + pod_width + pod_height
    return total / len(s)


DEFINITION = {"l2": lfl, "cosine": lucir, "pod": pod}


def reference(model, teacher, x, kind, weights, alpha=1.0, square=True, normalize=True) -> torch.Tensor:
    """α Σ_m w_m ℓ(student_m, teacher_m): the teacher a frozen copy in eval mode, features by hand."""
    with torch.no_grad():
        t = features_by_hand(teacher.eval(), x)
    s = features_by_hand(model, x)
    loss = (lambda a, b: pod(a, b, square, normalize)) if kind == "pod" else DEFINITION[kind]
    return alpha * sum(w * loss(s[m], t[m]) for m, w in weights.items())


def consolidated(kind: str = "l2", modules=MODULES, seed: int = 0, **kw):
    """A model, its FeatureDistillation consolidated on it, the copy taken then, and the model moved."""
    model = TinyCNN(seed)
    fd = FeatureDistillation(model, modules=modules, kind=kind, **kw)
    model.train()
    model(torch.randn(8, 3, 6, 6))  # BatchNorm's statistics move before the consolidation
    fd.consolidate(model)
    teacher = copy.deepcopy(model)
    nudge(model)
    return model, fd, teacher


def nudge(model: nn.Module, scale: float = 0.2, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def batch(n: int = 5, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 6, 7, generator=torch.Generator().manual_seed(seed))


def grads(value: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    """d value / d parameter, zeros where the value does not depend on a parameter (the head)."""
    params = list(model.parameters())
    out = torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(out, params)]


# -- values and gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("modules", [MODULES, {"stem": 0.3, "block.0": 2.0}, ["block.0"]])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_value_and_gradient_match_the_definition(kind, modules, mode) -> None:
    model, fd, teacher = consolidated(kind, modules, alpha=0.7)
    weights = modules if isinstance(modules, dict) else {m: 1 / len(modules) for m in modules}
    getattr(model, mode)()
    x = batch()
    with fd.watch(model):
        out = model(x)
    value = fd(model, inputs=x, outputs=out)
    ref = reference(model, teacher, x, kind, weights, alpha=0.7)
    assert value.item() > 1e-4
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads(value, model), grads(ref, model)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    assert all(m.training == (mode == "train") for m in model.modules())  # the teacher restored every mode


@pytest.mark.parametrize(("square", "normalize"), [(True, True), (False, True), (True, False), (False, False)])
def test_pod_conventions(square, normalize) -> None:
    """Every pairing of ``square`` and ``normalize``: (True, True) the released implementation (the
    default), (False, False) the paper's equations; each its own value."""
    model, fd, teacher = consolidated("pod", square=square, normalize=normalize)
    model.eval()
    x = batch()
    value = fd(model, inputs=x, outputs=model(x))
    weights = {m: 0.5 for m in MODULES}
    ref = reference(model, teacher, x, "pod", weights, square=square, normalize=normalize)
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads(value, model), grads(ref, model)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    others = [(a, b) for a in (True, False) for b in (True, False) if (a, b) != (square, normalize)]
    for a, b in others:
        other = reference(model, teacher, x, "pod", weights, square=a, normalize=b)
        assert abs(value.item() - other.item()) > 1e-3 * max(1.0, abs(other.item()))


def test_pod_defaults_are_the_released_implementation() -> None:
    model = TinyCNN()
    fd = FeatureDistillation(model, modules=MODULES, kind="pod")
    assert (fd.square, fd.normalize) == (True, True)


@pytest.mark.parametrize("kind", KINDS)
def test_second_forward_equals_the_watched_one(kind, caplog) -> None:
    model, fd, _ = consolidated(kind)
    model.eval()
    x = batch()
    with fd.watch(model):
        out = model(x)
    watched = fd(model, inputs=x, outputs=out)
    with caplog.at_level(logging.INFO, logger="clreg"):
        second = fd(model, inputs=x, outputs=model(x))
    assert "second time" in caplog.text
    torch.testing.assert_close(second, watched)
    for a, b in zip(grads(second, model), grads(watched, model)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_student_equal_to_teacher_gives_zero(kind) -> None:
    model = TinyCNN()
    fd = FeatureDistillation(model, modules=MODULES, kind=kind)
    model.eval()
    fd.consolidate(model)
    x = batch()
    with fd.watch(model):
        out = model(x)
    value = fd(model, inputs=x, outputs=out)
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert all(torch.isfinite(g).all() and g.abs().max() < 1e-5 for g in grads(value, model))


def test_teacher_is_the_model_at_consolidation_in_eval_mode() -> None:
    model, fd, teacher = consolidated()
    model.train()
    x = batch()
    model(x)  # the model's BatchNorm statistics move again; the teacher's stay as consolidated
    got = fd.teacher_features(model, x)
    want = features_by_hand(teacher.eval(), x)
    for m in MODULES:
        torch.testing.assert_close(got[m], want[m])
        assert not got[m].requires_grad
    assert all(m.training for m in model.modules())


# -- the watch ---------------------------------------------------------------------------------------


def test_watch_records_gradient_forwards_and_each_call_takes_them() -> None:
    model, fd, teacher = consolidated()
    model.eval()
    x, other = batch(), batch(seed=9)
    with fd.watch(model) as watch:
        out = model(x)
        with torch.no_grad():
            model(other)  # an evaluation: not recorded
        assert set(fd._student) == set(MODULES)
        value = fd(model, inputs=x, outputs=out)
        assert fd._student == {}  # taken by the call
    torch.testing.assert_close(value, reference(model, teacher, x, "l2", {m: 0.5 for m in MODULES}))
    model(x)
    assert fd._student == {}  # the hooks are gone with the block
    watch.remove()  # idempotent


def test_watched_forward_on_other_inputs_is_an_error() -> None:
    model, fd, _ = consolidated()
    with fd.watch(model):
        out = model(batch(n=4))
    with pytest.raises(ValueError, match=r"module 'stem': student and teacher features differ in shape"):
        fd(model, inputs=batch(n=5), outputs=out)


def test_watch_survives_lwf_teacher_in_compose() -> None:
    """LwF's teacher runs the same modules (without gradients) between the forward and the call: the
    watched student features are not overwritten."""
    model, fd, teacher = consolidated("cosine")
    model.eval()
    lwf = clreg.LwF(model)
    lwf.consolidate(model)
    nudge(model, seed=4)
    reg = clreg.Compose(lwf, fd)
    x = batch()
    with fd.watch(model):
        out = model(x)
    value = reg(model, inputs=x, outputs=out)
    alone = reference(model, teacher, x, "cosine", {m: 0.5 for m in MODULES})
    assert reg.last_values["featuredistillation"] == pytest.approx(alone.item(), rel=1e-5)
    torch.testing.assert_close(value, alone + lwf(model, inputs=x, outputs=model(x)))


def test_watch_on_a_compiled_model() -> None:
    model, fd, teacher = consolidated("pod")
    model.eval()
    compiled = torch.compile(model, backend="eager")
    x = batch()
    with fd.watch(compiled):
        out = compiled(x)
    assert set(fd._student) == set(MODULES)
    value = fd(compiled, inputs=x, outputs=out)
    ref = reference(model, teacher, x, "pod", {m: 0.5 for m in MODULES})
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-7)


def test_module_missing_from_the_watched_forward() -> None:
    class Skips(TinyCNN):
        def forward(self, x):  # block.0 never runs
            return self.head(self.stem(x).mean((2, 3))[:, :5].repeat(1, 2)[:, :5])

    model = Skips()
    fd = FeatureDistillation(model, modules=MODULES)
    fd.consolidate(model)
    x = batch()
    with fd.watch(model):
        out = model(x)
    with pytest.raises(ValueError, match=r"modules \['block.0'\] did not run in the watched forward"):
        fd(model, inputs=x, outputs=out)


# -- bad inputs --------------------------------------------------------------------------------------


def test_unknown_module_is_named_with_close_names() -> None:
    model = TinyCNN()
    with pytest.raises(ValueError, match=r"no module 'block\.2'; close names: \['block\.1', 'block\.0', 'block'"):
        FeatureDistillation(model, modules=["stem", "block.2"])
    with pytest.raises(ValueError, match=r"'head\.weight' is a parameter or buffer: name its module.*'head'"):
        FeatureDistillation(model, modules="head.weight")


def test_non_tensor_output_is_an_error() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)

        def forward(self, x):
            return self.a(x), x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair, self.out = Pair(), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.pair(x)[0])

    model = Net()
    fd = FeatureDistillation(model, modules="pair")
    fd.consolidate(model)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"module 'pair' returned a tuple, not a tensor"):
        fd(model, inputs=x)
    with pytest.raises(ValueError, match=r"module 'pair' returned a tuple, not a tensor"), fd.watch(model):
        model(x)


def test_pod_needs_four_dimensional_features() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    fd = FeatureDistillation(model, modules=["1"], kind="pod")
    fd.consolidate(model)
    with pytest.raises(ValueError, match=r"module '1': 'pod' needs \(B, C, H, W\) features, got shape \(3, 6\)"):
        fd(model, inputs=torch.randn(3, 4))


def test_needs_inputs_and_is_zero_before_consolidation() -> None:
    model = TinyCNN()
    fd = FeatureDistillation(model, modules=MODULES)
    x = batch()
    with fd.watch(model):
        out = model(x)
    value = fd(model, inputs=x, outputs=out)
    assert isinstance(value, torch.Tensor) and value.shape == () and value.item() == 0.0
    assert fd._student == {}  # the watched features are dropped all the same
    fd.consolidate(model)
    with pytest.raises(ValueError, match="needs the batch's inputs"):
        fd(model, outputs=model(x))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": -1.0}, ValueError, r"alpha must be in \[0.0"),
        ({"kind": "kl"}, ValueError, r"kind must be one of \('l2', 'cosine', 'pod'\), got 'kl'"),
        ({"square": True}, ValueError, "square applies to kind='pod' only, got kind='l2'"),
        ({"normalize": False, "kind": "cosine"}, ValueError, "normalize applies to kind='pod' only"),
        ({"square": 1, "kind": "pod"}, TypeError, "square must be a bool"),
        ({"normalize": "yes", "kind": "pod"}, TypeError, "normalize must be a bool"),
        ({"eps": 0.0}, ValueError, r"eps must be in \(0.0"),
        ({"teacher_params": "some"}, ValueError, "teacher_params must be one of"),
        ({"modules": []}, ValueError, "at least one module"),
        ({"modules": ["stem", "stem"]}, ValueError, r"named more than once: \['stem'\]"),
        ({"modules": {"stem": -1.0}}, ValueError, r"the weight of module 'stem' must be in \[0.0"),
        ({"modules": {"stem": float("inf")}}, ValueError, "must be finite"),
        ({"modules": 3}, TypeError, "modules must be a name"),
    ],
)
def test_hyperparameters_are_checked(kwargs, error, match) -> None:
    kw = {"modules": MODULES, **kwargs}
    with pytest.raises(error, match=match):
        FeatureDistillation(TinyCNN(), **kw)
    fd = FeatureDistillation(TinyCNN(), modules=MODULES)
    with pytest.raises(ValueError):
        fd.alpha = -0.5


def test_attach_is_refused() -> None:
    model = TinyCNN()
    fd = FeatureDistillation(model, modules=MODULES)
    with pytest.raises(TypeError, match="no closed-form gradient"):
        fd.attach(torch.optim.SGD(model.parameters(), lr=0.1))


# -- state -------------------------------------------------------------------------------------------


def test_state_round_trip_restores_teacher_and_config() -> None:
    model, fd, teacher = consolidated("pod", {"stem": 0.25, "block.0": 1.5}, square=False, normalize=False, alpha=0.3)
    model.eval()
    buf = io.BytesIO()
    torch.save(fd.state_dict(), buf)
    buf.seek(0)
    fresh = FeatureDistillation(TinyCNN(seed=7), modules="stem")  # other config, other weights
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert (fresh.kind, fresh.alpha, fresh.square, fresh.normalize) == ("pod", 0.3, False, False)
    assert fresh.module_weights == {"stem": 0.25, "block.0": 1.5}
    assert int(fresh.n_tasks) == 1
    x = batch()
    torch.testing.assert_close(fresh(model, inputs=x), fd(model, inputs=x))
    for name, t in fresh.teacher_features(model, x).items():
        torch.testing.assert_close(t, features_by_hand(teacher.eval(), x)[name])


def test_state_is_built_on_the_same_model() -> None:
    fd = FeatureDistillation(TinyCNN(), modules=MODULES)
    other = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="state was saved for different parameters"):
        FeatureDistillation(other, modules="0").load_state_dict(fd.state_dict(), strict=True)
    with pytest.raises(ValueError, match="differ from the model FeatureDistillation was built on"):
        fd.consolidate(other)


def test_teacher_params_selected_keeps_only_the_trainable_ones() -> None:
    model = TinyCNN()
    for p in model.stem.parameters():
        p.requires_grad_(False)
    every = FeatureDistillation(model, modules=MODULES)
    some = FeatureDistillation(model, modules=MODULES, teacher_params="selected")
    assert some.teacher_params.names == ["block.0.weight", "block.0.bias", "head.weight", "head.bias"]
    model.eval()
    every.consolidate(model)
    some.consolidate(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2)
    x = batch()
    torch.testing.assert_close(some(model, inputs=x), every(model, inputs=x))
    with torch.no_grad():
        model.stem[0].weight.mul_(1.5)  # the "selected" teacher reads the frozen stem from the model
    assert some.teacher_features(model, x)["stem"].sub(every.teacher_features(model, x)["stem"]).abs().max() > 1e-3
    for p in model.stem.parameters():
        p.requires_grad_(True)
    with pytest.raises(ValueError, match="parameters outside the selection train"):
        FeatureDistillation(model, modules=MODULES, params=lambda n, p: n.startswith("head"), teacher_params="selected")


# -- the contract ------------------------------------------------------------------------------------


def contract_reference(kind: str):
    def ref(model, reg, inputs, tasks):
        pod_options = {"square": reg.square, "normalize": reg.normalize}
        return reference(model, tasks[-1].model, inputs, kind, reg.module_weights, reg.alpha, **pod_options)

    return ref


# The paper's POD is a sum of squares of raw pooled sums, not scale-free: at α = 0.8 the contract's SGD
# steps blow the block's weights up, so it gets a small α.
@pytest.mark.parametrize(
    ("kind", "options"),
    [*((k, {"alpha": 0.8}) for k in KINDS), ("pod", {"square": False, "normalize": False, "alpha": 0.01})],
)
def test_contract(kind, options) -> None:
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(6, 3, 5, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
    check_regularizer(
        lambda m: FeatureDistillation(m, modules=MODULES, kind=kind, **options),
        TinyCNN(),
        data,
        reference=contract_reference(kind),
    )


# -- the functional core -----------------------------------------------------------------------------


@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
    scale=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**16),
)
def test_functional_losses_against_definitions(shape, scale, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(l2_feature_distillation(s, t), lfl(s, t))
    torch.testing.assert_close(cosine_feature_distillation(s, t), lucir(s, t))
    for square in (True, False):
        for normalize in (True, False):
            got = pod_spatial_distillation(s, t, square=square, normalize=normalize)
            torch.testing.assert_close(got, pod(s, t, square, normalize))
    # cosine and normalised POD compare directions: a positive scale of the student changes nothing
    torch.testing.assert_close(cosine_feature_distillation(scale * s, t), lucir(s, t))
    torch.testing.assert_close(pod_spatial_distillation(scale * s, t), pod(s, t))
    torch.testing.assert_close(pod_spatial_distillation(scale * s, t, square=False), pod(s, t, square=False))


def test_functional_losses_in_float32_under_autocast_inputs() -> None:
    s, t = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()
    for f in (l2_feature_distillation, cosine_feature_distillation, pod_spatial_distillation):
        assert f(s, t).dtype == torch.float32
