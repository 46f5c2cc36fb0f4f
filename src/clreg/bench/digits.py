r"""Split Digits: five two-digit tasks in the three settings of van de Ven, Tuytelaars & Tolias
(*Three types of incremental learning*, Nature Machine Intelligence 2022).

The data are scikit-learn's :func:`sklearn.datasets.load_digits`: 1,797 real 8×8 handwritten digits
(pixel values 0–16) shipped inside scikit-learn, so nothing is downloaded. They are split into five
tasks of two digits, task *t* holding the digits :math:`(2t, 2t+1)`: {0, 1}, {2, 3}, {4, 5}, {6, 7},
{8, 9}. The three settings (:data:`SETTINGS`) differ in what the model is told and what it answers:

* ``"task"`` (task-incremental): the task is known at training and test time; the model has one
  2-unit output head per task (:class:`DigitsMLP` with ``tasks`` heads on a shared trunk) and answers
  among the task's two digits. The label is the digit's index within its pair, :math:`y - 2t`;
* ``"domain"`` (domain-incremental): the task is not known at test time; two output units are reused
  by every task and the label is again the index within the pair, :math:`y - 2t` (even or odd);
* ``"class"`` (class-incremental): the task is not known at test time; one ten-way output and the
  label is the digit itself, :math:`y`.

:func:`targets` gives each setting's label, :func:`accuracy` each setting's accuracy (task-IL: the
argmax over the task's two units; domain-IL: the argmax over the two shared units against the index
within the pair; class-IL: the argmax over all ten units against the digit).

**The split** (:func:`split_digits`): for each digit separately, its samples are shuffled by a
generator seeded with ``split_seed`` alone (never by a training seed) and cut into
``n // 5`` validation samples, ``n // 5`` test samples and the rest (about 60 %) for training; the
three parts are disjoint and each keeps the digit's share (stratified). Within a part, samples are
in the dataset's original order. Pixels are scaled to [0, 1] (divided by 16) as float32 tensors of
shape (N, 64); labels are the digits as int64. The counts, the same for every ``split_seed``:

=====  =====  ======  ====  =====
digit  total  train   val   test
=====  =====  ======  ====  =====
0      178    108     35    35
1      182    110     36    36
2      177    107     35    35
3      183    111     36    36
4      181    109     36    36
5      182    110     36    36
6      181    109     36    36
7      179    109     35    35
8      174    106     34    34
9      180    108     36    36
all    1797   1087    355   355
=====  =====  ======  ====  =====

per task (train / val / test): {0, 1} 218 / 71 / 71, {2, 3} 218 / 71 / 71, {4, 5} 219 / 72 / 72,
{6, 7} 218 / 71 / 71, {8, 9} 214 / 70 / 70.

:func:`permuted` gives Permuted Digits, the harder domain-incremental variant: a fixed random pixel
permutation per task (the identity for task 0).

Example:
    >>> import torch, torch.nn.functional as F
    >>> from clreg.bench.digits import DigitsMLP, accuracy, split_digits, targets
    >>> tasks = split_digits()
    >>> [t.digits for t in tasks]
    [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    >>> x, y = tasks[1].train
    >>> x.shape, x.dtype, y.dtype
    (torch.Size([218, 64]), torch.float32, torch.int64)
    >>> digits = torch.tensor([3, 2, 3])
    >>> targets(1, digits, "domain").tolist(), targets(1, digits, "class").tolist()
    ([1, 0, 1], [3, 2, 3])
    >>> _ = torch.manual_seed(0)
    >>> model = DigitsMLP("task")
    >>> model(x, task=1).shape
    torch.Size([218, 2])
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    >>> for _ in range(30):
    ...     opt.zero_grad(); F.cross_entropy(model(x, task=1), targets(1, y, "task")).backward(); opt.step()
    >>> accuracy(model, *tasks[1].test, task_index=1, setting="task") > 0.9
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["SETTINGS", "DigitsMLP", "DigitsTask", "accuracy", "correct", "permuted", "split_digits", "targets"]

SETTINGS = ("task", "domain", "class")
"""The three settings: task-, domain- and class-incremental."""

NUM_TASKS = 5
"""Five tasks of two digits each."""

INPUT_SIZE = 64
"""8×8 pixels, flattened."""


@dataclass(frozen=True, eq=False)
class DigitsTask:
    """One task of Split Digits.

    Attributes:
        index: the task's index t, 0 to 4.
        digits: its two digits, ``(2t, 2t + 1)``.
        train, val, test: ``(x, y)`` with x float32 of shape (N, 64) in [0, 1] and y the digits, int64
            of shape (N,) (the raw digits: map them with :func:`targets` for a setting).
    """

    index: int
    digits: tuple[int, int]
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")


def _check_task(task_index: int, tasks: int = NUM_TASKS) -> None:
    if isinstance(task_index, bool) or not isinstance(task_index, int) or not 0 <= task_index < tasks:
        raise ValueError(f"task index must be an int in [0, {tasks}), got {task_index!r}")


def split_digits(split_seed: int = 0) -> list[DigitsTask]:
    """The five tasks of Split Digits, split per digit into train / val / test (see the module).

    Args:
        split_seed: seeds the shuffle of each digit's samples before the cut; the split depends on it
            alone, so it stays fixed across training seeds.

    Returns:
        Five :class:`DigitsTask`, task t holding the digits (2t, 2t + 1).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Split Digits needs scikit-learn: pip install 'clreg[benchmark]'") from e
    data = load_digits()
    x_all = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y_all = torch.tensor(data.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(split_seed)
    parts: dict[str, list[Tensor]] = {"train": [], "val": [], "test": []}
    for digit in range(10):
        indices = torch.nonzero(y_all == digit).flatten()
        indices = indices[torch.randperm(len(indices), generator=generator)]
        n_eval = len(indices) // 5
        parts["val"].append(indices[:n_eval])
        parts["test"].append(indices[n_eval : 2 * n_eval])
        parts["train"].append(indices[2 * n_eval :])
    split = {name: torch.cat(chunks).sort().values for name, chunks in parts.items()}
    tasks = []
    for t in range(NUM_TASKS):
        pair = (2 * t, 2 * t + 1)
        subsets = {}
        for name, indices in split.items():
            keep = indices[(y_all[indices] == pair[0]) | (y_all[indices] == pair[1])]
            subsets[name] = (x_all[keep].clone(), y_all[keep].clone())
        tasks.append(DigitsTask(index=t, digits=pair, **subsets))
    return tasks


def targets(task_index: int, digits_y: Tensor, setting: str) -> Tensor:
    """The label a setting trains on: the index within the pair, ``y - 2t`` (``"task"``, ``"domain"``)
    or the digit ``y`` (``"class"``).

    Raises:
        ValueError: an unknown setting or task index, or a digit that is not in task t's pair.
    """
    _check_setting(setting)
    _check_task(task_index)
    digits_y = torch.as_tensor(digits_y)
    if digits_y.dtype.is_floating_point or digits_y.dtype == torch.bool:
        raise ValueError(f"digits must be integers, got dtype {digits_y.dtype}")
    first = 2 * task_index
    outside = (digits_y < first) | (digits_y > first + 1)
    if bool(outside.any()):
        raise ValueError(
            f"task {task_index} holds the digits ({first}, {first + 1}); got {sorted(set(digits_y[outside].tolist()))}"
        )
    if setting == "class":
        return digits_y.to(torch.int64)
    return (digits_y - first).to(torch.int64)


class DigitsMLP(nn.Module):
    """The scenario's model: an MLP 64 → 100 → 100 (ReLU after each hidden layer) and a setting's output.

    Outputs: ``"task"``, one ``nn.Linear(hidden[-1], 2)`` head per task (``tasks`` heads, in
    ``heads``); ``"domain"``, one 2-unit head shared by every task; ``"class"``, one 10-unit head. The
    trunk (``trunk``) is shared by all tasks in every setting.

    ``forward(x, task=None)``: x of shape (N, 64) or (N, 8, 8). In the task setting ``task`` picks the
    head, shape (N, 2), and without it every head's outputs come side by side, shape (N, 2·tasks), task t
    in columns (2t, 2t+1) (what a regularizer that reads every head, such as LwF, sees); the other
    settings have one head and ignore ``task`` (so a loop may pass it in every setting).
    """

    def __init__(self, setting: str, hidden: tuple[int, ...] = (100, 100), tasks: int = NUM_TASKS):
        super().__init__()
        _check_setting(setting)
        hidden = tuple(hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be positive ints, got {hidden!r}")
        if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
            raise ValueError(f"tasks must be a positive int, got {tasks!r}")
        self.setting = setting
        self.tasks = tasks
        layers: list[nn.Module] = []
        width = INPUT_SIZE
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.trunk = nn.Sequential(*layers)
        if setting == "task":
            self.heads = nn.ModuleList(nn.Linear(width, 2) for _ in range(tasks))
        else:
            self.heads = nn.ModuleList([nn.Linear(width, 2 if setting == "domain" else 10)])

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        if x.dim() < 2 or x[0].numel() != INPUT_SIZE:
            raise ValueError(f"x must have shape (N, 64) or (N, 8, 8), got {tuple(x.shape)}")
        features = self.trunk(x.flatten(1))
        if self.setting != "task":
            return self.heads[0](features)
        if task is None:
            return torch.cat([head(features) for head in self.heads], dim=1)
        _check_task(task, self.tasks)
        return self.heads[task](features)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y_digits: Tensor, task_index: int, setting: str) -> float:
    """The fraction of samples right, as the setting defines it.

    The model is called as ``model(x, task=task_index)`` in the task setting and ``model(x)`` in the
    others, in eval mode (its mode is restored after). Task-IL: the argmax over the task's two outputs
    (a 2-unit head, or columns ``(2t, 2t+1)`` of a 10-unit output) against the index within the pair;
    domain-IL: the argmax over two outputs against the index within the pair; class-IL: the argmax over
    ten outputs against the digit.

    Raises:
        ValueError: an unknown setting or task, no samples, a digit outside the task's pair, or
            outputs of the wrong width for the setting.
    """
    _check_setting(setting)
    _check_task(task_index)
    if len(x) == 0 or len(x) != len(y_digits):
        raise ValueError(
            f"x and y_digits must hold the same, positive number of samples; got {len(x)} and {len(y_digits)}"
        )
    was_training = model.training
    model.eval()
    try:
        outputs = model(x, task=task_index) if setting == "task" else model(x)
    finally:
        model.train(was_training)
    return correct(outputs, y_digits, task_index, setting).float().mean().item()


def correct(outputs: Tensor, y_digits: Tensor, task_index: int, setting: str) -> Tensor:
    """Which samples ``outputs`` gets right, as :func:`accuracy` counts them (a bool tensor of shape (N,)).

    ``outputs``: (N, 2) or, in the task setting, every head side by side (N, 2·tasks: task t's columns
    (2t, 2t+1) are read); (N, 10) in the class setting.
    """
    labels = targets(task_index, y_digits, setting)
    width = outputs.shape[-1]
    if setting == "task" and width != 2 and width >= 2 * task_index + 2 and width % 2 == 0:
        outputs = outputs[:, 2 * task_index : 2 * task_index + 2]
    elif width != (10 if setting == "class" else 2):
        raise ValueError(f"the {setting} setting needs {10 if setting == 'class' else 2} outputs, got {width}")
    return outputs.argmax(dim=1) == labels.to(outputs.device)


def permuted(task_index: int, x: Tensor, seed: int = 0) -> Tensor:
    """Permuted Digits: x's 64 pixels in task t's fixed order (the identity for task 0).

    Task t's permutation is the t-th draw of ``torch.randperm(64)`` from a generator seeded with
    ``seed``, so it depends only on (seed, t). x: shape (N, 64) or (N, 8, 8); the result is (N, 64).
    """
    if isinstance(task_index, bool) or not isinstance(task_index, int) or task_index < 0:
        raise ValueError(f"task index must be a non-negative int, got {task_index!r}")
    if x.dim() < 2 or x[0].numel() != INPUT_SIZE:
        raise ValueError(f"x must have shape (N, 64) or (N, 8, 8), got {tuple(x.shape)}")
    x = x.flatten(1)
    if task_index == 0:
        return x.clone()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(task_index):
        order = torch.randperm(INPUT_SIZE, generator=generator)
    return x[:, order.to(x.device)]
