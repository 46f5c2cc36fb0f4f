"""Labels of an output whose ``channels`` pick a task's classes: by default a label is a class index of
the whole output (``labels="output"``); ``labels="channels"`` reads positions in ``channels``. Each
estimator against a per-sample autograd loop written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from clreg import EWC, OutputSpec, TaskSpec
from clreg.functional import fisher_diagonal

CHANNELS = (2, 3, 7)


def model_and_data(n: int = 9) -> tuple[nn.Module, TensorDataset, TensorDataset]:
    """A ten-way linear model; labels drawn from CHANNELS, as class indices and as positions."""
    torch.manual_seed(0)
    model = nn.Linear(4, 10).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    positions = torch.randint(0, len(CHANNELS), (n,), generator=g)
    absolute = torch.tensor(CHANNELS)[positions]
    return model, TensorDataset(x, absolute), TensorDataset(x, positions)


def squared_grads(model: nn.Module, losses: list[torch.Tensor], weights: list[float] | None = None) -> dict:
    """Σ_k w_k (∂ loss_k)², per parameter."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        for (n, _), g in zip(model.named_parameters(), grads):
            total[n] += (1.0 if weights is None else weights[k]) * g.square()
    return total


def reference(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, estimator: str) -> dict:
    """The Fisher of the selected logits, from its definition, sample by sample (labels as positions)."""
    n = len(x)
    if estimator == "batched":  # one batch: the squared gradient of the batch-mean loss
        logp = F.log_softmax(model(x)[:, list(CHANNELS)], 1)
        return squared_grads(model, [-logp.gather(1, labels[:, None]).mean()])
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(n):
        logp = F.log_softmax(model(x[i : i + 1])[:, list(CHANNELS)], 1)[0]
        if estimator == "empirical":
            part = squared_grads(model, [logp[labels[i]]])
        else:  # exact: Σ_c p_c g_c² over the selected classes
            p = logp.detach().exp()
            part = squared_grads(model, [logp[c] for c in range(len(CHANNELS))], p.tolist())
        for name in total:
            total[name] += part[name] / n
    return total


@pytest.mark.parametrize("estimator", ["exact", "empirical", "batched"])
def test_labels_are_class_indices_of_the_output(estimator: str) -> None:
    model, absolute, positions = model_and_data()
    spec = OutputSpec(channels=CHANNELS)
    ours = fisher_diagonal(model, absolute, outputs=spec, estimator=estimator, batch_size=len(absolute))
    by_position = fisher_diagonal(
        model, positions, outputs=OutputSpec(channels=CHANNELS, labels="channels"), estimator=estimator,
        batch_size=len(absolute),
    )  # fmt: skip
    ref = reference(model, *positions.tensors, estimator)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name])
        torch.testing.assert_close(by_position[name], ref[name])


def test_mc_takes_class_indices_and_reads_no_labels_but_the_ignore_mask() -> None:
    model, absolute, positions = model_and_data()
    a = fisher_diagonal(model, absolute, outputs=OutputSpec(channels=CHANNELS), estimator="mc", mc_samples=3)
    b = fisher_diagonal(
        model, positions, outputs=OutputSpec(channels=CHANNELS, labels="channels"), estimator="mc", mc_samples=3
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def dense_model_and_labels() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(B, 5, 3, 3) logits; labels in channels (1, 4) as class indices, one pixel ignored (255)."""
    torch.manual_seed(2)
    model = nn.Conv2d(2, 5, 1).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 4])[torch.randint(0, 2, (4, 3, 3), generator=g)]
    labels[0, 0, 0] = 255
    return model, x, labels


def test_dense_labels_with_channels_and_an_ignore_index() -> None:
    """Empirical Fisher of dense logits (per-location convention n·(∇ mean log-likelihood)²) over
    channels (1, 4), labels as class indices, the ignored pixel left out."""
    model, x, labels = dense_model_and_labels()
    spec = OutputSpec(channels=(1, 4), ignore_index=255)
    ours = fisher_diagonal(model, TensorDataset(x, labels), outputs=spec, estimator="empirical")
    ref = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(len(x)):
        logp = F.log_softmax(model(x[i : i + 1])[:, [1, 4]], 1)[0]  # (2, 3, 3)
        valid = labels[i] != 255
        pos = (labels[i] == 4).long()
        mean = logp.gather(0, pos[None])[0][valid].mean()
        part = squared_grads(model, [mean])
        for name in ref:
            ref[name] += valid.sum() * part[name] / len(x)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name])


def test_a_label_outside_the_channels_names_both_conventions() -> None:
    model, absolute, positions = model_and_data()
    with pytest.raises(
        ValueError, match=r"label [01] is not one of the selected channels \(2, 3, 7\).*labels='channels'"
    ):
        fisher_diagonal(model, positions, outputs=OutputSpec(channels=CHANNELS), estimator="empirical")
    with pytest.raises(ValueError, match=r"label [237] is outside \[0, 3\) \(labels='channels'.*labels='output'"):
        fisher_diagonal(
            model, absolute, outputs=OutputSpec(channels=CHANNELS, labels="channels"), estimator="empirical"
        )


def test_ewc_consolidates_a_task_with_its_own_labels() -> None:
    """The issue's case: a ten-way output, the task's channels (2, 3), the task's labels 2 and 3."""
    torch.manual_seed(4)
    net = nn.Linear(4, 10)
    x, y = torch.randn(8, 4), torch.tensor([2, 3] * 4)
    reg = EWC(net, estimator="empirical")
    reg.consolidate(net, TensorDataset(x, y), TaskSpec(outputs=[OutputSpec(channels=(2, 3))]))
    assert int(reg.n_tasks) == 1


def test_bad_spec_values_are_refused() -> None:
    with pytest.raises(ValueError, match="labels must be one of"):
        OutputSpec(labels="relative")
    with pytest.raises(ValueError, match="ignore_index 3 is one of the channels"):
        OutputSpec(channels=(2, 3), ignore_index=3)
    assert OutputSpec.from_config(OutputSpec(channels=(1,), labels="channels").to_config()).labels == "channels"
