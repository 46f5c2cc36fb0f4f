"""Split Digits: the split (disjoint, stratified, deterministic, counts written here), each setting's
labels against a hand-written table, the model's outputs per setting, accuracy on fixed outputs, Permuted
Digits, and one short training run that shows the data are real digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clreg.bench.digits import SETTINGS, DigitsMLP, accuracy, permuted, split_digits, targets

pytest.importorskip("sklearn")

# (train, val, test) per digit: n // 5 for val and test, the rest for train, of load_digits' per-digit totals
COUNTS = {
    0: (108, 35, 35),  # 178
    1: (110, 36, 36),  # 182
    2: (107, 35, 35),  # 177
    3: (111, 36, 36),  # 183
    4: (109, 36, 36),  # 181
    5: (110, 36, 36),  # 182
    6: (109, 36, 36),  # 181
    7: (109, 35, 35),  # 179
    8: (106, 34, 34),  # 174
    9: (108, 36, 36),  # 180
}
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def tasks():
    return split_digits()


# -- the split ----------------------------------------------------------------------------------------


def test_tasks_and_pairs(tasks):
    assert [t.index for t in tasks] == [0, 1, 2, 3, 4]
    assert [t.digits for t in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def test_counts_per_digit_per_split(tasks):
    for digit, expected in COUNTS.items():
        task = tasks[digit // 2]
        got = tuple(int((getattr(task, split)[1] == digit).sum()) for split in SPLITS)
        assert got == expected, digit
    for task in tasks:
        for split in SPLITS:
            assert set(getattr(task, split)[1].tolist()) == set(task.digits)
    assert sum(len(getattr(t, s)[1]) for t in tasks for s in SPLITS) == 1797
    assert [len(t.train[1]) for t in tasks] == [218, 218, 219, 218, 214]
    assert [len(t.test[1]) for t in tasks] == [71, 71, 72, 71, 70]


def test_dtypes_shapes_and_scaling(tasks):
    for task in tasks:
        for split in SPLITS:
            x, y = getattr(task, split)
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape == (len(y), 64)
            assert x.min() >= 0 and x.max() <= 1
    x = torch.cat([t.train[0] for t in tasks])
    assert x.max() == 1.0  # a 16 in the raw data
    assert torch.allclose(x * 16, (x * 16).round())  # the raw values were integers 0..16


def test_split_is_a_partition_of_the_dataset(tasks):
    """Every sample of load_digits appears exactly once over the 15 parts (as a multiset of (pixels, digit))."""
    from sklearn.datasets import load_digits

    data = load_digits()
    original = torch.cat(
        [torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target, dtype=torch.float32)[:, None]], 1
    )
    parts = torch.cat(
        [torch.cat([getattr(t, s)[0] * 16, getattr(t, s)[1].float()[:, None]], 1) for t in tasks for s in SPLITS]
    )
    assert parts.shape == original.shape
    rows_a, counts_a = torch.unique(original, dim=0, return_counts=True)
    rows_b, counts_b = torch.unique(parts.round(), dim=0, return_counts=True)
    assert torch.equal(rows_a, rows_b) and torch.equal(counts_a, counts_b)


def test_split_depends_only_on_split_seed(tasks):
    torch.manual_seed(123)  # a training seed must not change the split
    again = split_digits(0)
    for a, b in zip(tasks, again):
        for s in SPLITS:
            assert torch.equal(getattr(a, s)[0], getattr(b, s)[0]) and torch.equal(getattr(a, s)[1], getattr(b, s)[1])
    other = split_digits(1)
    assert not torch.equal(tasks[0].test[0], other[0].test[0])
    for digit, expected in COUNTS.items():  # another split seed: other samples, the same counts
        task = other[digit // 2]
        assert tuple(int((getattr(task, s)[1] == digit).sum()) for s in SPLITS) == expected


# -- labels per setting -------------------------------------------------------------------------------

WITHIN_PAIR = {0: 0, 1: 1, 2: 0, 3: 1, 4: 0, 5: 1, 6: 0, 7: 1, 8: 0, 9: 1}


@pytest.mark.parametrize("setting", SETTINGS)
def test_targets_against_hand_table(setting):
    for t in range(5):
        digits = torch.tensor([2 * t + 1, 2 * t, 2 * t, 2 * t + 1])
        expected = [digit if setting == "class" else WITHIN_PAIR[digit] for digit in digits.tolist()]
        got = targets(t, digits, setting)
        assert got.dtype == torch.int64 and got.tolist() == expected
    assert targets(3, torch.tensor([7, 6]), "class").tolist() == [7, 6]
    assert targets(3, torch.tensor([7, 6]), "domain").tolist() == [1, 0]


def test_targets_bad_inputs():
    with pytest.raises(ValueError, match="holds the digits"):
        targets(1, torch.tensor([2, 4]), "task")
    with pytest.raises(ValueError, match="setting"):
        targets(0, torch.tensor([0]), "instance")
    with pytest.raises(ValueError, match="task index"):
        targets(5, torch.tensor([0]), "class")
    with pytest.raises(ValueError, match="integers"):
        targets(0, torch.tensor([0.0]), "class")


# -- the model ----------------------------------------------------------------------------------------


def test_model_shapes_per_setting():
    torch.manual_seed(0)
    x = torch.rand(7, 64)
    task_model = DigitsMLP("task")
    outs = [task_model(x, task=t) for t in range(5)]
    assert all(o.shape == (7, 2) for o in outs)
    assert not torch.allclose(outs[0], outs[1])  # separate heads
    assert len(task_model.heads) == 5
    assert DigitsMLP("domain")(x).shape == (7, 2)
    assert DigitsMLP("domain")(x, task=3).shape == (7, 2)  # one shared head: the task is ignored
    assert DigitsMLP("class")(x).shape == (7, 10)
    assert DigitsMLP("class")(x.view(7, 8, 8)).shape == (7, 10)
    linears = [m for m in DigitsMLP("class").trunk if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 100), (100, 100)]
    assert sum(isinstance(m, nn.ReLU) for m in DigitsMLP("class").trunk) == 2
    assert DigitsMLP("task", hidden=(16,), tasks=3)(x, task=2).shape == (7, 2)
    every_head = task_model(x)  # without the task: the heads side by side, task t in columns (2t, 2t+1)
    assert every_head.shape == (7, 10)
    for t in range(5):
        torch.testing.assert_close(every_head[:, 2 * t : 2 * t + 2], outs[t])


def test_model_bad_inputs():
    x = torch.rand(3, 64)
    with pytest.raises(ValueError, match="task index"):
        DigitsMLP("task")(x, task=5)
    with pytest.raises(ValueError, match="setting"):
        DigitsMLP("multi")
    with pytest.raises(ValueError, match="hidden"):
        DigitsMLP("class", hidden=(0,))
    with pytest.raises(ValueError, match="shape"):
        DigitsMLP("class")(torch.rand(3, 63))


# -- accuracy -----------------------------------------------------------------------------------------


class Fixed(nn.Module):
    """Returns fixed outputs; records the task it was called with."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs
        self.calls = []

    def forward(self, x, task=None):
        self.calls.append((task, self.training))
        return self.outputs


def test_accuracy_class_setting():
    out = torch.full((4, 10), -1.0)
    out[0, 2] = out[1, 3] = out[2, 9] = out[3, 2] = 1.0  # argmax 2, 3, 9, 2
    model = Fixed(out)
    assert accuracy(model, torch.zeros(4, 64), torch.tensor([2, 3, 3, 3]), 1, "class") == pytest.approx(0.5)
    assert model.calls == [(None, False)] and model.training  # called without a task, in eval mode, restored


def test_accuracy_task_setting_two_and_ten_units():
    two = Fixed(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    y = torch.tensor([6, 7, 6, 6])  # within-pair 0, 1, 0, 0; predicted 0, 1, 1, 0
    assert accuracy(two, torch.zeros(4, 64), y, 3, "task") == pytest.approx(0.75)
    assert two.calls == [(3, False)]
    # ten units: only the task's columns (6, 7) count, though column 9 is the largest everywhere
    ten = torch.zeros(4, 10)
    ten[:, 9] = 5.0
    ten[:, 6] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    ten[:, 7] = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert accuracy(Fixed(ten), torch.zeros(4, 64), y, 3, "task") == pytest.approx(0.75)


def test_accuracy_domain_setting():
    out = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 1.0]])
    y = torch.tensor([9, 8, 8])  # within-pair 1, 0, 0; predicted 1, 1, 0
    assert accuracy(Fixed(out), torch.zeros(3, 64), y, 4, "domain") == pytest.approx(2 / 3)


def test_accuracy_bad_inputs():
    x, y = torch.zeros(2, 64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="outputs"):
        accuracy(Fixed(torch.zeros(2, 10)), x, y, 0, "domain")
    with pytest.raises(ValueError, match="outputs"):
        accuracy(Fixed(torch.zeros(2, 2)), x, y, 0, "class")
    with pytest.raises(ValueError, match="number of samples"):
        accuracy(Fixed(torch.zeros(0, 2)), x[:0], y[:0], 0, "domain")
    with pytest.raises(ValueError, match="holds the digits"):
        accuracy(Fixed(torch.zeros(2, 2)), x, torch.tensor([0, 2]), 0, "domain")


# -- Permuted Digits ----------------------------------------------------------------------------------


def test_permuted():
    x = torch.arange(2 * 64, dtype=torch.float32).view(2, 64)
    assert torch.equal(permuted(0, x, seed=3), x)
    p1, p2 = permuted(1, x, seed=3), permuted(2, x, seed=3)
    assert torch.equal(p1.sort(dim=1).values, x) and not torch.equal(p1, x)
    assert not torch.equal(p1, p2)
    assert torch.equal(p1, permuted(1, x.view(2, 8, 8), seed=3))  # fixed per (seed, task)
    assert not torch.equal(p1, permuted(1, x, seed=4))
    assert torch.equal(p1[1] - 64, p1[0])  # the same order for every sample
    with pytest.raises(ValueError, match="task index"):
        permuted(-1, x)


# -- the data are real digits -------------------------------------------------------------------------


def test_short_training_learns_task_zero(tasks):
    torch.manual_seed(0)
    model = DigitsMLP("class")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = tasks[0].train
    labels = targets(0, y, "class")
    for _ in range(5):  # five epochs of minibatches of 32
        for batch in torch.randperm(len(y)).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), labels[batch]).backward()
            opt.step()
    assert accuracy(model, *tasks[0].test, task_index=0, setting="class") > 0.95
