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


@pytest.mark.parametrize(
    ("targets", "named"),
    [
        (torch.zeros(2).long(), r"3 inputs but 2 targets \(the target tensor has 2 rows\)"),
        ({"boxes": torch.zeros(3, 4), "y": torch.zeros(2)}, r"3 inputs but 2 targets \(target\['y'\] has 2 rows\)"),
        ((torch.zeros(3), {"m": torch.zeros(5, 2)}), r"3 inputs but 5 targets \(target\[1\]\['m'\] has 5 rows\)"),
        ({"y": torch.tensor(1)}, r"3 inputs but target\['y'\] is 0-d"),
    ],
    ids=["tensor", "dict-leaf", "nested-leaf", "0-d-leaf"],
)
def test_add_refuses_a_batch_whose_targets_differ_in_length(targets, named: str) -> None:
    buf = clreg.ReplayBuffer(4)
    with pytest.raises(ValueError, match=named):
        buf.add(0, (torch.randn(3, 4), targets))
    assert buf.tasks == [] and len(buf) == 0


def test_add_names_what_a_sample_that_is_not_a_pair_is() -> None:
    buf = clreg.ReplayBuffer(4)
    x, y, t = torch.randn(3, 2), torch.zeros(3).long(), torch.ones(3).long()
    with pytest.raises(TypeError, match=r"pair \(input, target\).*sample 0 is a tuple of 3 items"):
        buf.add(0, TensorDataset(x, y, t))
    with pytest.raises(TypeError, match=r"sample 1 is a list of 1 item$"):
        buf.add(0, [(x[0], y[0]), [x[1]]])
    with pytest.raises(TypeError, match=r"sample 0 is a dict$"):
        buf.add(0, [{"x": x[0]}])
    assert buf.tasks == []


def task_buffer(sizes: list[int], cap: int, seed: int) -> tuple[clreg.ReplayBuffer, list]:
    """Task i (keys alternate str and int) stores inputs 100 * i + j and targets j."""
    buf, keys = clreg.ReplayBuffer(cap, seed=seed), []
    for i, n in enumerate(sizes):
        key = f"t{i}" if i % 2 == 0 else i
        keys.append(key)
        buf.add(key, [(torch.full((2,), 100.0 * i + j), torch.tensor(j)) for j in range(n)])
    return buf, keys


def assert_batch_is_sample_concatenated(buf: clreg.ReplayBuffer, keys: list, k: int, seed: int) -> None:
    per_task = buf.sample(k, generator=torch.Generator().manual_seed(seed))
    x, y, tasks = buf.sample_batch(k, generator=torch.Generator().manual_seed(seed))
    base, extra = divmod(k, len(keys))
    counts = [base + (1 if i < extra else 0) for i in range(len(keys))]
    assert list(per_task) == [t for t, c in zip(keys, counts) if c]
    assert tasks == [t for t, c in zip(keys, counts) for _ in range(c)]
    assert torch.equal(x, torch.cat([per_task[t][0] for t in per_task]))
    assert torch.equal(y, torch.cat([per_task[t][1] for t in per_task]))
    assert x.shape == (k, 2) and y.shape == (k,)
    assert [keys[int(row[0]) // 100] for row in x] == tasks  # each row from its own task's memory


def test_sample_batch_is_the_draw_of_sample_concatenated() -> None:
    buf, keys = task_buffer([5, 3, 4], cap=4, seed=3)
    for k in (1, 2, 3, 7, 12, 30):  # fewer than the tasks, an uneven split, more than stored
        assert_batch_is_sample_concatenated(buf, keys, k, seed=k)
    # without a generator: the same per-draw seeds, so a twin buffer's sample() gives the same rows
    twin, _ = task_buffer([5, 3, 4], cap=4, seed=3)
    for _ in range(3):
        x, y, tasks = buf.sample_batch(5)
        per_task = twin.sample(5)
        assert torch.equal(x, torch.cat([v[0] for v in per_task.values()]))
        assert torch.equal(y, torch.cat([v[1] for v in per_task.values()]))
        assert tasks == ["t0", "t0", 1, 1, "t2"]


@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    cap=st.integers(1, 5),
    k=st.integers(1, 15),
    seed=st.integers(0, 2**16),
)
def test_sample_batch_matches_sample_property(sizes: list[int], cap: int, k: int, seed: int) -> None:
    buf, keys = task_buffer(sizes, cap, seed)
    assert_batch_is_sample_concatenated(buf, keys, k, seed)


def test_sample_batch_targets_of_different_shapes_or_structures() -> None:
    buf = clreg.ReplayBuffer(3, seed=0)
    buf.add("seg", (torch.zeros(3, 2), torch.arange(6).view(3, 2)))
    buf.add("cls", (torch.ones(3, 2), torch.tensor([7, 8, 9])))
    x, y, tasks = buf.sample_batch(4, generator=torch.Generator().manual_seed(0))
    assert tasks == ["seg", "seg", "cls", "cls"] and x.shape == (4, 2)
    assert isinstance(y, list) and [t.shape for t in y] == [(2,), (2,), (), ()]
    assert {tuple(t.tolist()) for t in y[:2]} <= {(0, 1), (2, 3), (4, 5)} and {int(t) for t in y[2:]} <= {7, 8, 9}
    # a dict here, a tensor there, no targets for a third task: one target per row
    buf.add("det", [(torch.full((2,), 2.0), {"boxes": torch.rand(n, 4)}) for n in (1, 3)])
    buf.add("unlabelled", [torch.full((2,), 3.0)])
    x, y, tasks = buf.sample_batch(8, generator=torch.Generator().manual_seed(1))
    assert tasks == ["seg", "seg", "cls", "cls", "det", "det", "unlabelled", "unlabelled"]
    assert x[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert [type(t).__name__ for t in y] == ["Tensor"] * 4 + ["dict"] * 2 + ["NoneType"] * 2
    assert sorted(t["boxes"].shape[0] for t in y[4:6]) == [1, 3]
    # only input tensors stored: no targets
    only = clreg.ReplayBuffer(2)
    only.add("a", [torch.zeros(2)])
    only.add("b", [torch.ones(2)])
    x, y, tasks = only.sample_batch(2)
    assert y is None and tasks == ["a", "b"] and x.tolist() == [[0.0, 0.0], [1.0, 1.0]]


def test_sample_batch_refuses_inputs_of_different_shapes_across_tasks() -> None:
    buf = clreg.ReplayBuffer(2)
    buf.add("a", (torch.zeros(2, 3), torch.zeros(2)))
    buf.add(5, (torch.zeros(2, 5), torch.zeros(2)))
    with pytest.raises(ValueError, match=r"task 'a' \(3,\); task 5 \(5,\)"):
        buf.sample_batch(2)
    assert [v[0].shape[1] for v in buf.sample(2).values()] == [3, 5]  # per task still works
    buf.add("dict", [({"image": torch.zeros(3)}, torch.tensor(0))])
    with pytest.raises(ValueError, match=r"task 'dict' \['image'\] \(3,\)"):
        buf.sample_batch(3)
    # shapes that vary within a task already come as a list; mixing them keeps the list
    var = clreg.ReplayBuffer(2)
    var.add("a", [(torch.zeros(n), torch.tensor(n)) for n in (2, 3)])
    var.add("b", [(torch.zeros(4), torch.tensor(4))])
    x, y, tasks = var.sample_batch(3, generator=torch.Generator().manual_seed(0))
    assert isinstance(x, list) and [len(r) for r in x] == y.tolist() and tasks == ["a", "a", "b"]
