"""DER / ER-ACE under torch.distributed: one spawned two-process gloo group (see logit_replay_worker.py),
compared with a single process on the concatenated batches and with hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import _gloo

_gloo.require(fsdp2=True)

import logit_replay_worker as worker  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ranks = _gloo.run_ranks(worker.scenario, tmp_path_factory.mktemp("logit_replay"))
    return ranks, worker.scenario(0, 1)


def test_buffer_is_global_identical_on_ranks_and_equal_to_one_process(runs) -> None:
    ranks, single = runs
    assert int(single["buffer/seen"]) == sum(map(sum, worker.SIZES))
    for k in ("buffer/inputs", "buffer/labels", "buffer/outputs", "buffer/seen"):
        for r in ranks:
            torch.testing.assert_close(r[k], single[k], rtol=0, atol=0, msg=k)
    ids = single["buffer/inputs"][:, 0].long()
    assert torch.equal(single["buffer/labels"], ids * 10)  # each sample kept its own label and output
    assert set(ids.tolist()) - set(range(5)), "later samples replaced some of the first five"


def test_each_rank_draws_its_own_samples(runs) -> None:
    """The draw is seeded by the rank: rank 0 draws what one process draws, rank 1 other samples; every
    draw is 3 distinct slots of the 5 stored, and a rank's successive draws differ."""
    ranks, single = runs
    assert torch.equal(ranks[0]["buffer/draws"], single["buffer/draws"])
    assert not torch.equal(ranks[1]["buffer/draws"], ranks[0]["buffer/draws"])
    for r in ranks:
        for draw in r["buffer/draws"]:
            assert len(set(draw.tolist())) == 3 and int(draw.min()) >= 0 and int(draw.max()) < 5
        assert not torch.equal(r["buffer/draws"][0], r["buffer/draws"][1])


def test_a_batch_refused_on_one_rank_is_an_error_on_every_rank(runs) -> None:
    """No rank is left waiting in a collective: rank 1's bad batch raises on rank 1 with its own message
    and on rank 0 naming rank 1; first batches of another structure raise on both; the next good batch
    is stored on both (2 samples from each rank)."""
    ranks, single = runs
    own = "observe(): 2 samples in the batch, but outputs has 1 rows"
    assert single["refusal/rows"].startswith(own)
    assert ranks[1]["refusal/rows"].startswith(own)
    assert ranks[0]["refusal/rows"].startswith("observe(): rank 1 refused its batch: " + own)
    for r in ranks:
        assert "the first batch differs between ranks" in r["refusal/structure"]
        assert int(r["refusal/seen"]) == 4


def hand_ace(logits: torch.Tensor, labels: torch.Tensor, kept: set[int]) -> torch.Tensor:
    rows = [-(z[y] - torch.log(sum(torch.exp(z[c]) for c in sorted(kept)))) for z, y in zip(logits, labels)]
    return sum(rows) / len(rows)


def test_er_ace_present_classes_are_the_global_batch(runs) -> None:
    ranks, _ = runs
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(3, 5, generator=g) for _ in range(2)]
    union = set(torch.cat(worker.ACE_LABELS).tolist())
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res[f"ace/True/{r}"], hand_ace(logits[r], worker.ACE_LABELS[r], union))
        own = set(worker.ACE_LABELS[r].tolist())
        torch.testing.assert_close(res[f"ace/False/{r}"], hand_ace(logits[r], worker.ACE_LABELS[r], own))


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_step_with_der_plus_plus_equals_one_process(runs, kind) -> None:
    """Draws of the whole buffer: the replayed forwards run through the DDP-wrapped / FSDP2-sharded
    model; the parameters after the step equal the single process's (float32, sums in another order:
    rtol 1e-5)."""
    ranks, single = runs
    keys = [k for k in single if k.startswith(f"step/{kind}/4/param/")]
    assert len(keys) == 4
    for k in keys:
        for r in ranks:
            torch.testing.assert_close(r[k], single[k], rtol=1e-5, atol=1e-6, msg=k)


def step_by_hand(draws: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The step from the definitions: the buffer of capacity 4 offered 4 samples holds them in offer
    order (rank 0's sample, then rank 1's, per step) with the outputs of the model at their offer;
    the loss is the global batch's mean cross-entropy plus the mean over ranks of rank r's
    α·mean (f(x_a) − z_a)² + β·CE(f(x_b), y_b) on its slots a, b (DDP and FSDP average gradients)."""
    model = worker.Net()
    xs, ys = worker.step_data()
    stored_z = []
    for k in range(2):
        with torch.no_grad():
            stored_z.append(model(xs[k, :2]))
            for p in model.parameters():
                p.add_(0.1)
    x_mem, y_mem, z_mem = xs[:2, :2].reshape(4, 4), ys[:2, :2].reshape(4), torch.cat(stored_z)
    loss = F.cross_entropy(model(xs[2]), ys[2])
    for a, b in draws:
        mse = ((model(x_mem[a]) - z_mem[a]) ** 2).sum() / z_mem[a].numel()
        loss = loss + (0.5 * mse + 0.7 * F.cross_entropy(model(x_mem[b]), y_mem[b])) / len(draws)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.5 * p.grad)
    return dict(model.named_parameters())


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_each_rank_replays_its_own_draws_and_the_gradients_average(runs, kind) -> None:
    """Draws of 2 of the 4 stored: each rank replays its own slots (they differ between ranks), and the
    step equals the hand computation that averages the ranks' replay terms."""
    ranks, _ = runs
    draws = [r[f"step/{kind}/2/draws"] for r in ranks]
    assert all(d.shape == (2, 2) for d in draws) and not torch.equal(draws[0], draws[1])
    expected = step_by_hand(draws)
    for name, value in expected.items():
        for r in ranks:
            torch.testing.assert_close(r[f"step/{kind}/2/param/{name}"], value.detach(), rtol=1e-5, atol=1e-6)
