"""Token logits (B, L, V) with the classes last, labels shifted by one and -100 ignored: each
estimator equals a per-sequence loop written from the dense convention, the vectorised, looped and
per-layer paths agree, ``mc``'s draws follow the model's distribution, ``exact`` is refused, bad
labels are caught; inputs taken as keyword arguments (``clreg.KeywordInputs``) in the Fisher and in
LwF's teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import clreg
from clreg.data import KeywordInputs, tree_map
from clreg.functional import fisher_diagonal
from clreg.integrations.causal_lm import CausalLMDataset, causal_lm_batches, causal_lm_output, causal_lm_spec
from models import Items, TinyLM, V, sequences


def reference(model: TinyLM, items: list, labels_of) -> dict[str, torch.Tensor]:
    """Mean over sequences of n · (∇ (1/n) Σ_t log p(y_{t+1} | x_≤t))², the labels from ``labels_of``."""
    params = dict(model.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for it in items:
        logits = model(it["input_ids"][None], it["attention_mask"][None])["logits"][0, :-1]  # (L-1, V)
        y = labels_of(it, logits)[1:]
        valid = y != -100
        n = int(valid.sum())
        logp = F.log_softmax(logits, -1)[valid].gather(1, y[valid][:, None]).sum() / n
        for k, g in zip(params, torch.autograd.grad(logp, list(params.values()))):
            total[k] += n * g.square()
    return {k: t / len(items) for k, t in total.items()}


def assert_close_dicts(a: dict, b: dict, **kw) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **kw)


@pytest.mark.parametrize("path", [{"vectorize": True}, {"vectorize": False}, {"engine": "layers"}])
def test_the_empirical_fisher_of_token_logits_is_the_per_sequence_loops(path) -> None:
    model, items = TinyLM().double(), sequences()
    got = fisher_diagonal(model, CausalLMDataset(Items(items)), spec=causal_lm_spec(), estimator="empirical", **path)
    want = reference(model, items, lambda it, logits: it["labels"])
    assert_close_dicts(got, want, rtol=1e-9, atol=1e-12)


def test_the_class_last_layout_equals_the_same_logits_with_classes_on_dim_1() -> None:
    """The same model with its logits transposed to (B, V, L) and class_dim=1 gives the same Fisher:
    the layout is read where it is, not a different quantity."""
    model, items = TinyLM().double(), sequences()

    class ClassesFirst(torch.nn.Module):
        def __init__(self, lm: TinyLM) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask=None):
            return {"logits": self.lm(input_ids, attention_mask)["logits"].transpose(1, 2)}

    first = clreg.OutputSpec(select="logits", class_dim=1, shift=1, ignore_index=-100)
    data = CausalLMDataset(Items(items))
    for est in ("empirical", "batched"):
        a = fisher_diagonal(model, data, spec=causal_lm_spec(), estimator=est)
        b = fisher_diagonal(ClassesFirst(model), data, outputs=first, estimator=est)
        assert_close_dicts(a, {k.removeprefix("lm."): v for k, v in b.items()}, rtol=1e-9, atol=1e-12)


def test_batched_is_the_squared_gradient_of_the_batch_mean_token_loss() -> None:
    model, items = TinyLM().double(), sequences(4)
    batch = torch.utils.data.default_collate(items)
    got = fisher_diagonal(model, causal_lm_batches([batch]), spec=causal_lm_spec(), estimator="batched")
    logits = model(batch["input_ids"], batch["attention_mask"])["logits"][:, :-1]
    y = batch["labels"][:, 1:]
    per_token = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100, reduction="none")
    loss = (per_token.sum(1) / (y != -100).sum(1)).mean()
    params = dict(model.named_parameters())
    want = {k: g.square() for k, g in zip(params, torch.autograd.grad(loss, list(params.values())))}
    assert_close_dicts(got, want, rtol=1e-9, atol=1e-12)


def test_mc_paths_agree_and_the_draws_follow_the_model() -> None:
    """The vectorised, looped and per-layer paths use the same draws; with many draws the estimate
    approaches its expectation, (1/n) Σ_t Σ_v p_tv (∇ log p_tv)² per sequence (the draws are
    independent per token, so the cross terms vanish)."""
    model, items = TinyLM().double(), sequences(3)
    data = CausalLMDataset(Items(items))
    kw = dict(spec=causal_lm_spec(), estimator="mc", mc_samples=4000, seed=3)
    vmapped = fisher_diagonal(model, data, engine="per_sample", **kw)
    assert_close_dicts(fisher_diagonal(model, data, vectorize=False, **kw), vmapped, rtol=1e-9, atol=1e-12)
    assert_close_dicts(fisher_diagonal(model, data, engine="layers", **kw), vmapped, rtol=1e-9, atol=1e-12)

    params = dict(model.named_parameters())
    want = {k: torch.zeros_like(p) for k, p in params.items()}
    for it in items:
        logits = model(it["input_ids"][None])["logits"][0, :-1]
        valid = it["labels"][1:] != -100
        n = int(valid.sum())
        logp = F.log_softmax(logits, -1)
        for t in valid.nonzero().flatten().tolist():
            for v in range(V):
                grads = torch.autograd.grad(logp[t, v], list(params.values()), retain_graph=True)
                for k, g in zip(params, grads):
                    want[k] += logp[t, v].exp().detach() * g.square() / n
    total_got = sum(t.sum() for t in vmapped.values())
    total_want = sum(t.sum() for t in want.values()) / len(items)
    assert abs(float(total_got / total_want) - 1.0) < 0.05


def test_exact_over_a_vocabulary_is_refused_and_bad_labels_are_named() -> None:
    model, items = TinyLM(), sequences(3)
    with pytest.raises(ValueError, match="vocabulary"):
        fisher_diagonal(model, CausalLMDataset(Items(items)), spec=causal_lm_spec(), estimator="exact")
    items[2]["labels"][3] = V  # one past the vocabulary
    with pytest.raises(ValueError, match=rf"sample 2: label {V} is outside \[0, {V}\)"):
        fisher_diagonal(model, CausalLMDataset(Items(items)), spec=causal_lm_spec(), estimator="empirical")
    with pytest.raises(ValueError, match="class_dim"):
        clreg.OutputSpec(class_dim=0)
    with pytest.raises(ValueError, match="shift"):
        clreg.OutputSpec(shift=-1)


def test_the_spec_checkpoints_and_labels_default_to_the_unpadded_inputs() -> None:
    out = causal_lm_output()
    assert clreg.OutputSpec.from_config(out.to_config()) == out
    ids = torch.tensor([[3, 1, 4, 1]])
    ((inputs, labels),) = causal_lm_batches([{"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0]])}])
    assert isinstance(inputs, KeywordInputs) and sorted(inputs) == ["attention_mask", "input_ids"]
    assert labels.tolist() == [[3, 1, 4, -100]]
    with pytest.raises(ValueError, match="input_ids"):
        list(causal_lm_batches([{"ids": ids}]))
    assert isinstance(tree_map(lambda t: t * 2, inputs), KeywordInputs)


def test_lwf_distils_token_logits_over_the_vocabulary_with_keyword_inputs() -> None:
    model = TinyLM()
    lwf = clreg.LwF(model, temperature=2.0)
    items = sequences(4)
    lwf.consolidate(model, None, causal_lm_spec())
    teacher = TinyLM()  # the same weights (same seed) as the consolidated model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = torch.utils.data.default_collate(items)
    inputs = KeywordInputs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    out = model(**inputs)
    got = lwf(model, inputs=inputs, outputs=out)
    log_q = F.log_softmax(teacher(**inputs)["logits"] / 2.0, -1)
    log_p = F.log_softmax(out["logits"] / 2.0, -1)
    want = 4.0 * (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
