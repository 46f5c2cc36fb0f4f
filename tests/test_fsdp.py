"""FSDP2: every check in one spawned two-process gloo group with the model ``fully_shard``ed (see
fsdp_worker.py), each against the unsharded model run in this process on the same data.

Tolerances: float32 throughout; a sharded sum adds the ranks' partial sums in another order than the
single process, so values agree to rtol 1e-5 (atol 1e-6 for parameters and penalties near zero,
1e-8 for importances, whose entries are small).
"""

from __future__ import annotations

import os

import pytest
import torch

import _gloo

_gloo.require(fsdp2=True)

import clreg  # noqa: E402
import fsdp_worker  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-6}
PARAM_SHAPED = ("importance.", "anchor.", "omega.", "previous.", "teacher_params.")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    ranks = _gloo.run_ranks(fsdp_worker.scenario, tmp, out_dir=str(tmp))
    single = fsdp_worker.scenario(0, 1)["results"]
    return [r["results"] for r in ranks], single, ranks[0]["errors"], tmp


def keys(single, prefix):
    found = [k for k in single if k.startswith(prefix)]
    assert found, prefix
    return found


@pytest.mark.parametrize("name", ["exact", "mc", "empirical", "batched", "max7", "loader", "mas", "mas_normalized"])
def test_sharded_fisher_and_mas_equal_single_process(runs, name) -> None:
    ranks, single, _, _ = runs
    for r in ranks:
        assert bool(r[f"sharded/fisher/{name}"]), "the result is sharded like the parameters"
        for k in keys(single, f"fisher/{name}/"):
            assert single[k].abs().sum() > 0, k
            torch.testing.assert_close(r[k], single[k], rtol=1e-5, atol=1e-8, msg=k)


CASES = [(k, m) for k in fsdp_worker.KINDS for m in ("autograd", "attached") if (k, m) != ("lwf", "attached")]


@pytest.mark.parametrize(("kind", "mode"), CASES)
def test_sharded_step_equals_single_process(runs, kind, mode) -> None:
    """A step of the sharded model with the regularizer: the same value, the same parameters after it,
    and the same state after the first task (SI's path integral included)."""
    ranks, single, _, _ = runs
    key = f"step/{kind}/{mode}"
    assert float(single[f"{key}/value"]) > 0
    for r in ranks:
        torch.testing.assert_close(r[f"{key}/value"], single[f"{key}/value"], **TOL)
        for k in keys(single, f"{key}/param/") + keys(single, f"{key}/state/"):
            torch.testing.assert_close(r[k].to(single[k].dtype), single[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("how", ["plain", "accumulate", "clip"])
@pytest.mark.parametrize("mode", ["autograd", "attached"])
def test_penalty_step_equals_single_process(runs, how, mode) -> None:
    """EWC's penalty from a given state on a step of the sharded model: a plain step, two micro-batches
    (FSDP's gradient sync off for the first), and clip_grad_norm_ on DTensor gradients."""
    ranks, single, _, _ = runs
    key = f"how/{how}/{mode}"
    for r in ranks:
        torch.testing.assert_close(r[f"{key}/value"], single[f"{key}/value"], **TOL)
        for k in keys(single, f"{key}/param/"):
            torch.testing.assert_close(r[k], single[k], **TOL, msg=k)


def shard_numel(shape: torch.Size, rank: int, world: int = 2) -> int:
    """The rows FSDP2 gives ``rank`` (torch.chunk on dim 0)."""
    parts = torch.empty(shape).chunk(world, 0)
    return parts[rank].numel() if rank < len(parts) else 0


STATES = [f"state/{k}" for k in fsdp_worker.KINDS] + [f"step/{k}/{m}" for k, m in CASES]


@pytest.mark.parametrize("key", STATES)
def test_state_sharded_like_the_parameters(runs, key) -> None:
    """Parameter-shaped state is a DTensor laid out as its parameter, each rank holding its rows (about
    half: 7 and 3 rows split 4 + 3 and 2 + 1); the rest (counters, EWC's offset, BatchNorm statistics,
    K-FAC factors) is replicated. As built (``state/``) and after the first task (``step/``), gathered
    equal to the single process's."""
    ranks, single, _, _ = runs
    for r in ranks:
        for k in keys(single, f"{key}/state/"):
            torch.testing.assert_close(r[k].to(single[k].dtype), single[k], rtol=1e-5, atol=1e-7, msg=k)
    names = [k.split("/state/", 1)[1] for k in keys(single, f"{key}/state/")]
    shaped = [n for n in names if n.startswith(PARAM_SHAPED)]
    assert shaped
    for rank, r in enumerate(ranks):
        held = 0
        for name in names:
            whole = int(single[f"bytes/{key}/{name}"])
            mine = int(r[f"bytes/{key}/{name}"])
            if name in shaped:
                assert bool(r[f"sharded/{key}/{name}"]) and bool(r[f"laid_out/{key}/{name}"]), name
                size = single[f"{key}/state/{name}"].element_size()
                assert mine == shard_numel(single[f"{key}/state/{name}"].shape, rank) * size, name
                held += mine
            else:
                assert not bool(r[f"sharded/{key}/{name}"]) and mine == whole, name
    total = sum(int(single[f"bytes/{key}/{n}"]) for n in shaped)
    per_rank = [sum(int(r[f"bytes/{key}/{n}"]) for n in shaped) for r in ranks]
    assert sum(per_rank) == total and max(per_rank) <= total // 2 + total // 6, (per_rank, total)
    rest = int(single[f"bytes/{key}/state_bytes"]) - total
    for r, mine in zip(ranks, per_rank):
        # state_bytes counts this rank's shards plus the replicated rest (and caches of the shards)
        assert mine + rest <= int(r[f"bytes/{key}/state_bytes"]) < int(single[f"bytes/{key}/state_bytes"])


def test_mixed_precision_penalty_gradient(runs) -> None:
    """bf16 parameters and collectives (MixedPrecisionPolicy, reduce in float32): the penalty is taken
    on the float32 shards, so its gradient and value are the closed form of the sharded state exactly;
    the bf16 forward's data gradient is close to the float32 one."""
    ranks, single, _, _ = runs
    for mode in ("autograd", "attached"):
        for r in ranks:
            value = torch.zeros((), dtype=torch.float64)
            for k in keys(single, f"mp/{mode}/param/"):
                n = k.split("/param/", 1)[1]
                theta, a, m = (r[f"mp/{mode}/{what}/{n}"] for what in ("param", "importance", "anchor"))
                grad = 2 * 1.5 * a * (theta - m)  # EWC: s = λ/2 = 1.5
                torch.testing.assert_close(r[f"mp/{mode}/penalty_grad/{n}"], grad, rtol=1e-5, atol=1e-7, msg=n)
                value += (a.double() * (theta.double() - m.double()) ** 2).sum()
                torch.testing.assert_close(r[f"mp/{mode}/data_grad/{n}"], single[f"mp/{mode}/data_grad/{n}"],
                                           rtol=0.05, atol=0.01, msg=n)  # fmt: skip
            expected = 1.5 * (value + r[f"mp/{mode}/offset"])
            torch.testing.assert_close(r[f"mp/{mode}/value"].double(), expected, rtol=1e-5, atol=1e-7)


def _single_reg(seed: int = 7):
    model = fsdp_worker.Net(seed)
    return model, clreg.Compose(fsdp_worker.make("ewc", model), fsdp_worker.make("si", model))


def test_checkpoints_round_trip(runs) -> None:
    """DCP on two ranks, loaded back sharded and, converted, into one process; the full form (gathered,
    CPU, read with weights_only=True) into two ranks and into one process: the same penalty."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ranks, _, _, tmp = runs
    value = ranks[0]["ckpt/value"]
    assert float(value) > 0
    for r in ranks:
        torch.testing.assert_close(r["ckpt/value"], value, rtol=0, atol=0)
        for form in ("dcp", "full"):
            assert bool(r[f"ckpt/{form}/sharded"])
            torch.testing.assert_close(r[f"ckpt/{form}/value"], value, **TOL)
    dcp_to_torch_save(os.path.join(tmp, "dcp"), os.path.join(tmp, "dcp.pt"))
    saved = torch.load(os.path.join(tmp, "dcp.pt"), weights_only=True)
    for state in (saved["reg"], torch.load(os.path.join(tmp, "full.pt"), weights_only=True)):
        model, reg = _single_reg()
        model.load_state_dict(saved["model"])
        reg.load_state_dict(state)
        for k in keys(ranks[0], "ckpt/param/"):
            torch.testing.assert_close(dict(model.named_parameters())[k.split("/param/")[1]], ranks[0][k])
        torch.testing.assert_close(reg(model), value, **TOL)


def test_refusals_name_the_problem(runs) -> None:
    _, _, errors, _ = runs
    expected = [
        "ValueError: parameter 'norm.weight' is not sharded but 'fc1.weight' is",
        "ValueError: parameter 'fc1.weight' is sharded over the cpu mesh of ranks [0, 1] as [Shard(dim=1)], but this "
        "state is sharded over the cpu mesh of ranks [0, 1] as [Shard(dim=0)]",
        "ValueError: state 'importance.fc1/weight' (parameter 'fc1.weight') was saved sharded over the cpu mesh of "
        "ranks [0, 1] as [Shard(dim=0)], but this regularizer's state is not sharded",
        "ValueError: state 'importance.fc1/weight' (parameter 'fc1.weight') was saved sharded over the cpu mesh of "
        "ranks [0, 1] as [Shard(dim=0)], but this regularizer's state is sharded over the cpu mesh of ranks [0, 1] "
        "as [Shard(dim=1)]",
        "ValueError: parameter 'fc1.weight' is sharded over the cpu mesh of ranks [0, 1] as [Shard(dim=0)], but this "
        "state is not sharded: build the regularizer on the model as it is trained (after fully_shard)",
        "ValueError: under FSDP2 importances are formed layer by layer, and parameter 'scale'",
        "ValueError: a rank has no samples of its own: under FSDP every rank takes part in each forward",
        "ValueError: a rank has no samples of its own: under FSDP every rank takes part in each forward",
    ]
    assert len(errors) == len(expected), errors
    for got, want in zip(errors, expected):
        assert got.startswith(want), (got, want)


def test_replay_buffer_unchanged_under_fsdp(runs) -> None:
    ranks, _, _, _ = runs
    torch.testing.assert_close(ranks[0]["replay/a"], ranks[1]["replay/a"], rtol=0, atol=0)
    assert ranks[0]["replay/a"].shape == (3, 2)
