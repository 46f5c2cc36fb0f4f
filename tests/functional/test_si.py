"""SI's importance update and its clamps."""

from __future__ import annotations

import torch

from clreg.functional import si_importance_


def test_si_functional_importance() -> None:
    big = [torch.tensor([1.0, 1.0, 1.0])]
    si_importance_(big, [torch.tensor([-4.0, 2.0, -0.5])], [torch.tensor([1.0, 1.0, 0.0])], xi=1.0, clamp="cumulative")
    torch.testing.assert_close(big[0], torch.tensor([0.0, 2.0, 0.5]))
    big = [torch.tensor([1.0, 1.0])]
    si_importance_(big, [torch.tensor([-4.0, 2.0])], [torch.tensor([1.0, 1.0])], xi=1.0, clamp="per_task")
    torch.testing.assert_close(big[0], torch.tensor([1.0, 2.0]))
