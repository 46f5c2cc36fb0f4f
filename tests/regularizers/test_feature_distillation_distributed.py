"""FeatureDistillation in a two-process gloo group, under DDP and under FSDP2 (see
feature_distillation_worker.py): a rank's step on half the batch equals the single process's step on
the whole batch. No reduction of its own is needed: the loss is per batch, and DDP's and FSDP's
gradient averaging is all the distributed work.

Tolerances: float32; the ranks' partial sums add in another order than the single process's."""

from __future__ import annotations

import pytest
import torch

import _gloo

_gloo.require(fsdp2=True)

import feature_distillation_worker as worker  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-6}
CASES = [(w, k, "watched") for w in worker.WRAPS for k in worker.KINDS] + [("ddp", "pod", "second")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ranks = _gloo.run_ranks(worker.scenario, tmp_path_factory.mktemp("fd_dist"))
    return ranks, worker.scenario(0, 1)["results"]


@pytest.mark.parametrize(("wrap", "kind", "how"), CASES)
def test_a_step_on_ranks_equals_the_single_process(runs, wrap, kind, how) -> None:
    ranks, single = runs
    ranks = [r["results"] for r in ranks]
    key = f"{wrap}/{kind}/{how}"
    assert float(single[f"{key}/value"]) > 1e-4
    params = [k for k in single if k.startswith(f"{key}/param/")]
    teacher = [k for k in single if k.startswith(f"{key}/teacher/")]
    assert len(params) == len(teacher) == 8
    for r in ranks:
        torch.testing.assert_close(r[f"{key}/value"], single[f"{key}/value"], **TOL)
        for k in params + teacher:
            torch.testing.assert_close(r[k], single[k], **TOL, msg=k)
        assert bool(r[f"{key}/teacher_sharded"]) == (wrap == "fsdp")  # the teacher sharded like the parameters


def test_fsdp2_refuses_a_second_forward(runs) -> None:
    """FSDP2 cannot run the model's forward twice before the backward: without a watched forward the
    call is a ValueError that points to reg.watch, on every rank."""
    ranks, _ = runs
    for r in ranks:
        assert "run it inside reg.watch(model)" in r["refusal"]
