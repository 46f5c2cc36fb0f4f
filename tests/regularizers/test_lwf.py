"""The LwF module: the teacher, several outputs, selectors and errors, against hand sums."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import TensorDataset

import clreg
from clreg import OutputSpec, TaskSpec
from clreg.functional import regression_distillation, sigmoid_distillation, softmax_distillation
from clreg.regularizers.lwf import FORMS, classes_seen
from models import MultiHead


def test_lwf_module_on_several_outputs_matches_hand_sum() -> None:
    torch.manual_seed(0)
    model = MultiHead()
    objectness = lambda out: torch.sigmoid(out["det"]["heatmap"]).amax(1)  # noqa: E731
    spec = TaskSpec(
        outputs=[
            OutputSpec(select="seg", kind="softmax", channels=[0, 1, 2]),
            OutputSpec(select="det.heatmap", kind="sigmoid"),
            OutputSpec(select=("det", "box"), kind="regression", weight=objectness),
        ]
    )
    lwf = clreg.LwF(model, temperature=2.0, alpha=0.7)
    x = torch.randn(3, 3, 6, 6)
    model.eval()  # the teacher runs in eval mode: compare with an eval-mode student
    lwf.consolidate(model, None, spec)
    out = model(x)
    assert lwf(model, inputs=x, outputs=out).item() == pytest.approx(0.0, abs=1e-6)
    # move the student; the teacher stays the consolidated model, run in eval mode
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = model(x)
    got = lwf(model, inputs=x, outputs=out)
    t_out = lwf.teacher(model, x)
    ref = 0.7 * (
        softmax_distillation(out["seg"], t_out["seg"], 2.0, channels=[0, 1, 2])
        + sigmoid_distillation(out["det"]["heatmap"], t_out["det"]["heatmap"])
        + regression_distillation(out["det"]["box"], t_out["det"]["box"], weight=objectness(t_out))
    )
    torch.testing.assert_close(got, ref)
    assert got.item() > 0
    g = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    assert any(gi is not None and gi.abs().sum() > 0 for gi in g)
    model.train()  # the teacher runs in eval mode and puts every module back as it was
    lwf(model, inputs=x, outputs=model(x))
    assert all(m.training for m in model.modules())


def test_lwf_teacher_is_model_at_consolidation_in_eval_mode() -> None:
    torch.manual_seed(1)
    model = MultiHead()
    lwf = clreg.LwF(model, outputs=OutputSpec(select="cls"))
    model.train()
    x = torch.randn(4, 3, 5, 5)
    model(x)  # BN running statistics move
    lwf.consolidate(model)
    snapshot = MultiHead()
    snapshot.load_state_dict(model.state_dict())
    snapshot.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
        model(x)
    torch.testing.assert_close(lwf.teacher(model, x)["cls"], snapshot(x)["cls"])
    assert model.training


def test_lwf_needs_inputs_and_checks_selectors() -> None:
    model = MultiHead()
    lwf = clreg.LwF(model, outputs=OutputSpec(select="cls"))
    lwf.consolidate(model)
    with pytest.raises(ValueError, match="needs the batch's inputs"):
        lwf(model)
    bad = clreg.LwF(model, outputs=OutputSpec(select="logits"))
    bad.consolidate(model)
    with pytest.raises(ValueError, match="key 'logits' not found"):
        bad(model, inputs=torch.randn(1, 3, 4, 4))
    not_a_tensor = clreg.LwF(model, outputs=OutputSpec(select="det"))
    not_a_tensor.consolidate(model)
    with pytest.raises(ValueError, match="gave dict"):
        not_a_tensor(model, inputs=torch.randn(1, 3, 4, 4))


def test_lwf_on_tuple_outputs() -> None:
    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x), self.b(x)

    model = Two()
    lwf = clreg.LwF(model, outputs=[OutputSpec(select=1)])
    lwf.consolidate(model)
    with torch.no_grad():
        model.b.weight.add_(1.0)
    x = torch.randn(5, 3)
    out = model(x)
    torch.testing.assert_close(
        lwf(model, inputs=x, outputs=out), softmax_distillation(out[1], lwf.teacher(model, x)[1], 2.0)
    )


# -- the forms: which classes of the consolidated outputs are distilled --------------------------------

T = 2.0
TASK_LABELS = ((0, 1), (2, 3), (4, 5))


def t2_kl(student: torch.Tensor, teacher: torch.Tensor, classes) -> torch.Tensor:
    """T² KL(softmax(teacher[S]/T) ‖ softmax(student[S]/T)) over the classes S on dim 1, summed over S,
    averaged over the batch and locations."""
    idx = list(classes)
    q = torch.softmax(teacher[:, idx] / T, 1)
    p = torch.softmax(student[:, idx] / T, 1)
    return T * T * (q * (q.log() - p.log())).sum(1).mean()


def labelled(labels, n: int = 8, seed: int = 0) -> TensorDataset:
    """n samples of 4 features whose labels cycle through ``labels``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([labels[i % len(labels)] for i in range(n)])
    return TensorDataset(torch.randn(n, 4, generator=g), y)


def nudge(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def value_and_reference(lwf: clreg.LwF, model: torch.nn.Module, classes_per_term) -> tuple:
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(5))
    out = model(x)
    teacher = lwf.teacher(model, x)
    ref = lwf.alpha * sum(t2_kl(out, teacher, c) for c in classes_per_term)
    return lwf(model, inputs=x, outputs=out), ref


FORM_TERMS = {  # the terms' classes after 1, 2 and 3 tasks with labels {0,1}, {2,3}, {4,5}
    "seen": [[(0, 1)], [(0, 1, 2, 3)], [(0, 1, 2, 3, 4, 5)]],
    "per_task": [[(0, 1)], [(0, 1), (2, 3)], [(0, 1), (2, 3), (4, 5)]],
    "all": [[tuple(range(10))]] * 3,
}


@pytest.mark.parametrize("form", list(FORM_TERMS))
def test_lwf_forms_against_t2_kl_by_hand(form: str) -> None:
    """A ten-way output, a default TaskSpec per task: while task k + 1 trains, the terms come from tasks
    1..k only (the current task's classes are never distilled)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 10)
    lwf = clreg.LwF(model, temperature=T, alpha=0.6, form=form)
    for k, labels in enumerate(TASK_LABELS):
        lwf.consolidate(model, labelled(labels, seed=k), TaskSpec())
        nudge(model, seed=10 + k)
        terms = FORM_TERMS[form][k]
        want = [None if c == tuple(range(10)) else c for c in terms]
        assert [o.channels for o in lwf.outputs] == want
        got, ref = value_and_reference(lwf, model, terms)
        assert got.item() > 0
        torch.testing.assert_close(got, ref)


def test_lwf_explicit_channels_and_labels_are_the_outputs_own_classes() -> None:
    """A spec's channels are the task's classes whatever its labels; a label is a channel of the output
    (3 means channel 3), so channels (2, 3) and labels {3, 5} join as classes (2, 3, 5)."""
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 10)
    lwf = clreg.LwF(model, temperature=T)
    lwf.consolidate(model, labelled((0,)), TaskSpec(outputs=[OutputSpec(channels=(3, 2))]))
    assert [o.channels for o in lwf.outputs] == [(2, 3)]
    lwf.consolidate(model, labelled((3, 5)), TaskSpec())
    nudge(model, seed=3)
    assert [o.channels for o in lwf.outputs] == [(2, 3, 5)]
    got, ref = value_and_reference(lwf, model, [(2, 3, 5)])
    torch.testing.assert_close(got, ref)
    lwf.form = "per_task"  # each task's own softmax: the spec's channels as given, then the labels
    got, ref = value_and_reference(lwf, model, [(3, 2), (3, 5)])
    torch.testing.assert_close(got, ref)


def test_lwf_dense_output_does_not_count_the_ignore_index() -> None:
    torch.manual_seed(2)
    model = torch.nn.Conv2d(3, 5, 1)
    g = torch.Generator().manual_seed(0)
    masks = torch.tensor([0, 2])[torch.randint(0, 2, (4, 6, 6), generator=g)]
    masks[:, 0] = 255
    data = TensorDataset(torch.randn(4, 3, 6, 6, generator=g), masks)
    lwf = clreg.LwF(model, temperature=T)
    lwf.consolidate(model, data, TaskSpec(outputs=[OutputSpec(ignore_index=255)]))
    assert [o.channels for o in lwf.outputs] == [(0, 2)]
    nudge(model, seed=4)
    x = torch.randn(3, 3, 6, 6)
    out = model(x)
    torch.testing.assert_close(lwf(model, inputs=x, outputs=out), t2_kl(out, lwf.teacher(model, x), (0, 2)))
    unmarked = clreg.LwF(model, temperature=T)  # 255 counted as a class of a five-channel output
    unmarked.consolidate(model, data, TaskSpec())
    with pytest.raises(ValueError, match=r"has 5 channels, but the classes to distil include 255"):
        unmarked(model, inputs=x, outputs=out)


def test_lwf_classes_covering_every_channel_give_the_whole_output_term() -> None:
    """The same computation as the whole output's (no index_select): equal to the last bit."""
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 3)
    seen, whole = clreg.LwF(model, temperature=T), clreg.LwF(model, temperature=T, form="all")
    for labels in ((0, 1), (2,)):
        for lwf in (seen, whole):
            lwf.consolidate(model, labelled(labels), TaskSpec())
    assert seen.outputs[0].channels == (0, 1, 2)
    nudge(model, seed=5)
    x = torch.randn(6, 4)
    out = model(x)
    a, b = seen(model, inputs=x, outputs=out), whole(model, inputs=x, outputs=out)
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a, list(model.parameters()), retain_graph=True)
    gb = torch.autograd.grad(b, list(model.parameters()))
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))
    assert seen._cache_tensors() == []  # no channel index kept: the whole output is used


def test_lwf_reads_labels_from_a_dataset_a_loader_and_dict_targets() -> None:
    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int):
            return torch.randn(4), {"cls": i % 3 + 4, "box": torch.rand(4)}

    spec = TaskSpec(outputs=[OutputSpec(select="cls"), OutputSpec(select="box", kind="regression")])
    assert classes_seen(Items(), spec.outputs) == [(4, 5, 6), None]
    loader = torch.utils.data.DataLoader(labelled((1, 7)), batch_size=3)
    assert classes_seen(loader, [OutputSpec()]) == [(1, 7)]
    x = torch.randn(5, 4)
    nothing = [
        None,  # no data
        TensorDataset(x),  # no targets
        TensorDataset(x, torch.rand(5, 3)),  # soft labels
        iter([(x, torch.zeros(5, dtype=torch.long))]),  # a one-shot iterator: left for the others
        [{"input": x}],  # not (input, target) batches
    ]
    for data in nothing:
        assert classes_seen(data, [OutputSpec()]) == [None]
    assert classes_seen(labelled((0,)), [OutputSpec(kind="sigmoid")]) == [None]
    with pytest.raises(ValueError, match=r"include -100, which is no class: give OutputSpec\(ignore_index=-100\)"):
        classes_seen(labelled((-100, 2)), [OutputSpec()])


def three_tasks(form: str, seed: int = 0) -> tuple[torch.nn.Module, clreg.LwF]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 10)
    lwf = clreg.LwF(model, temperature=T, alpha=0.8, form=form)
    for k, labels in enumerate(TASK_LABELS):
        lwf.consolidate(model, labelled(labels, seed=k), TaskSpec())
    nudge(model, seed=9)
    return model, lwf


def reloaded(lwf: clreg.LwF, model: torch.nn.Module, **kw) -> clreg.LwF:
    buf = io.BytesIO()
    torch.save(lwf.state_dict(), buf)
    buf.seek(0)
    fresh = clreg.LwF(model, **kw)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    return fresh


@pytest.mark.parametrize("form", FORMS)
def test_lwf_state_round_trip_restores_each_form(form: str) -> None:
    model, lwf = three_tasks(form)
    config = lwf.state_dict()["_extra_state"]["config"]
    assert config["form"] == form and config["task_seen"] == [[0, 1], [2, 3], [4, 5]]
    other = next(f for f in FORMS if f != form)
    fresh = reloaded(lwf, model, form=other)  # the saved form comes back, as the hyperparameters do
    assert fresh.form == form and fresh.outputs == lwf.outputs and fresh.alpha == 0.8
    x = torch.randn(5, 4)
    torch.testing.assert_close(fresh(model, inputs=x), lwf(model, inputs=x), rtol=0, atol=0)


def test_lwf_loads_a_state_saved_before_forms() -> None:
    """The record of a clreg without forms: hyperparameters, ``task_outputs`` and
    ``task_outputs_callable``; its tasks' classes are unknown, so each output is distilled whole."""
    model, lwf = three_tasks("seen")
    sd = lwf.state_dict()
    old = {
        "temperature": T,
        "alpha": 0.8,
        "t_squared": True,
        "task_outputs": [OutputSpec().to_config(), OutputSpec(select=None, channels=(1, 2)).to_config()],
        "task_outputs_callable": 0,
    }
    fresh = clreg.LwF(model, form="per_task")
    fresh.load_state_dict({**sd, "_extra_state": {**sd["_extra_state"], "config": old}}, strict=True)
    assert fresh.form == "per_task" and [o.channels for o in fresh.outputs] == [None, (1, 2)]
    x = torch.randn(5, 4)
    out = model(x)
    teacher = fresh.teacher(model, x)
    ref = 0.8 * (t2_kl(out, teacher, range(10)) + t2_kl(out, teacher, (1, 2)))
    torch.testing.assert_close(fresh(model, inputs=x, outputs=out), ref)


def test_lwf_rejects_a_bad_form() -> None:
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"form must be one of \('seen', 'per_task', 'all'\), got 'paper'"):
        clreg.LwF(model, form="paper")
    lwf = clreg.LwF(model)
    with pytest.raises(ValueError, match="got 'old'"):
        lwf.form = "old"
    lwf.consolidate(model)
    sd = lwf.state_dict()
    bad = {**sd["_extra_state"], "config": {**sd["_extra_state"]["config"], "form": "everything"}}
    with pytest.raises(ValueError, match="got 'everything'"):
        clreg.LwF(model).load_state_dict({**sd, "_extra_state": bad})


def test_first_call_after_consolidation_inside_a_compiled_function() -> None:
    """The terms are built when the state changes, so LwF's first call after a consolidation may be
    the compiled one (dynamo cannot build them: frozen dataclasses); its value is the definition's,
    T² · KL(teacher ‖ student) at T = 2, the teacher being the model at the consolidation."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x = torch.randn(8, 4)
    lwf = clreg.LwF(model, temperature=2.0, alpha=1.0)
    lwf.consolidate(model, TensorDataset(x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])))
    with torch.no_grad():
        teacher = model(x)
        model[2].weight.add_(0.5)
    torch.compiler.reset()
    value = torch.compile(lambda m, a: lwf(m, inputs=a), backend="aot_eager")(model, x)
    student = model(x)
    p = torch.softmax(teacher / 2.0, dim=1)
    want = 4.0 * (p * (p.log() - torch.log_softmax(student / 2.0, dim=1))).sum(1).mean()
    torch.testing.assert_close(value, want)
