"""ReplayBuffer: bounds, policies, the even split, variable-length targets, checkpoints."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

import clreg


def samples(n: int, start: int = 0):
    return [(torch.full((2,), float(i)), torch.tensor(i)) for i in range(start, start + n)]


@given(
    cap=st.integers(1, 6),
    n=st.integers(0, 20),
    policy=st.sampled_from(["reservoir", "first"]),
    chunks=st.integers(1, 4),
)
def test_capacity_and_first_policy(cap: int, n: int, policy: str, chunks: int) -> None:
    buf = clreg.ReplayBuffer(cap, policy=policy, seed=1)
    items = samples(n)
    for c in range(chunks):
        part = items[c * n // chunks : (c + 1) * n // chunks]
        if part:
            buf.add("a", part)
    stored = buf.samples("a") if n else []
    assert len(stored) == min(cap, n)
    ids = [int(y) for _, y in stored]
    assert len(set(ids)) == len(ids)
    if policy == "first":
        assert ids == list(range(min(cap, n)))


def test_reservoir_is_uniform_across_calls() -> None:
    counts = Counter()
    for seed in range(400):
        buf = clreg.ReplayBuffer(2, seed=seed)
        for start in range(0, 10, 3):  # offered in chunks of 3, 3, 3, 1
            buf.add("t", samples(min(3, 10 - start), start))
        counts.update(int(y) for _, y in buf.samples("t"))
    # each of 10 samples is kept with probability 2/10: 80 of 400 runs; 4 sigma ≈ 32
    assert all(abs(counts[i] - 80) < 32 for i in range(10)), counts


def test_sample_splits_evenly_and_returns_per_task_batches() -> None:
    buf = clreg.ReplayBuffer(10, seed=0)
    buf.add("seg", TensorDataset(torch.randn(10, 3), torch.randint(0, 4, (10,))))
    buf.add("det", [(torch.randn(3), {"boxes": torch.rand(k, 4), "labels": torch.arange(k)}) for k in (1, 3, 2)])
    buf.add(7, (torch.randn(4, 3), torch.arange(4)))  # one batch (inputs, targets)
    draw = buf.sample(8)
    assert [len(draw[t][0]) for t in ("seg", "det", 7)] == [3, 3, 2]
    x, y = draw["det"]
    assert x.shape == (3, 3) and isinstance(y["boxes"], list) and {b.shape[0] for b in y["boxes"]} <= {1, 2, 3}
    seg_x, seg_y = buf.samples("seg")[0][0], {int(y) for _, y in buf.samples("seg")}
    assert set(draw["seg"][1].tolist()) <= seg_y and draw["seg"][0].shape[1:] == seg_x.shape
    # more than stored: drawn with replacement, k in all
    big = buf.sample(40)
    assert sum(len(v[0]) for v in big.values()) == 40
    # draws differ from call to call, and are repeatable from a fresh buffer with the same seed
    a, b = buf.sample(3), buf.sample(3)
    assert not all(torch.equal(a[t][0], b[t][0]) for t in a)


def test_round_trip_through_weights_only_checkpoint() -> None:
    buf = clreg.ReplayBuffer(3, seed=5)
    buf.add("det", [(torch.randn(3), {"boxes": torch.rand(k, 4)}) for k in (1, 3, 2, 4)])
    buf.add("cls", samples(5))
    bio = io.BytesIO()
    torch.save(buf.state_dict(), bio)
    bio.seek(0)
    fresh = clreg.ReplayBuffer(1)
    fresh.load_state_dict(torch.load(bio, weights_only=True), strict=True)
    assert fresh.tasks == ["det", "cls"] and fresh.capacity_per_task == 3
    for t in buf.tasks:
        for (x1, _y1), (x2, _y2) in zip(buf.samples(t), fresh.samples(t)):
            assert torch.equal(x1, x2)
    a, b = buf.sample(4), fresh.sample(4)  # the same next draw
    for t in a:
        assert torch.equal(a[t][0], b[t][0])
    buf.add("cls", samples(50, 100))
    fresh.add("cls", samples(50, 100))
    assert [int(y) for _, y in buf.samples("cls")] == [int(y) for _, y in fresh.samples("cls")]
    assert buf.state_bytes() > 0


def test_errors() -> None:
    with pytest.raises(ValueError, match="capacity_per_task"):
        clreg.ReplayBuffer(0)
    with pytest.raises(ValueError, match="policy"):
        clreg.ReplayBuffer(2, policy="fifo")
    buf = clreg.ReplayBuffer(2)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(2)
    with pytest.raises(TypeError, match="task must be"):
        buf.add(1.5, samples(2))
    with pytest.raises(TypeError, match="add\\(\\) takes"):
        buf.add("a", 3)
    buf.add("a", samples(2))
    with pytest.raises(ValueError, match="k must be"):
        buf.sample(0)
    with pytest.raises(KeyError, match="no samples stored"):
        buf.samples("b")
    with pytest.raises(ValueError, match="not a ReplayBuffer state"):
        buf.load_state_dict({"_extra_state": {"type": "EWC"}})
