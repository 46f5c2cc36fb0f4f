"""All distributed checks in one spawned two-process gloo group (see dist_worker.py)."""

from __future__ import annotations

import pytest
import torch

import _gloo

_gloo.require()

import dist_worker  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ranks = _gloo.run_ranks(dist_worker.scenario, tmp_path_factory.mktemp("dist"))
    return ranks, dist_worker.scenario(0, 1)


def keys(single, prefix):
    return [k for k in single if k.startswith(prefix)]


@pytest.mark.parametrize(
    "prefix",
    [
        "fisher/exact",
        "fisher/empirical",
        "fisher/mc",
        "fisher/max7",
        "fisher_dense",
        "fisher_loader",
        "fisher_lm/mc",
        "fisher_lm/empirical",
        "curvature/",
    ],
)
def test_split_fisher_equals_single_process(runs, prefix) -> None:
    ranks, single = runs
    assert keys(single, prefix)
    for k in keys(single, prefix):
        for r in ranks:
            torch.testing.assert_close(r[k], single[k], rtol=1e-5, atol=1e-8, msg=k)


def test_si_importance_and_replay_identical_on_ranks(runs) -> None:
    ranks, _ = runs
    assert ranks[0]["si/omega_big"].abs().sum() > 0
    torch.testing.assert_close(ranks[0]["si/omega_big"], ranks[1]["si/omega_big"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["replay/a"], ranks[1]["replay/a"], rtol=0, atol=0)
    offered = {0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0}  # both ranks' samples were offered
    assert ranks[0]["replay/a"].shape == (3, 2) and set(ranks[0]["replay/a"][:, 0].tolist()) <= offered


@pytest.mark.parametrize("kind", ["ewc", "online_ewc", "si", "mas", "lwf"])
def test_ddp_step_equals_single_process_gradient(runs, kind) -> None:
    ranks, single = runs
    ks = keys(single, f"step/{kind}/")
    assert ks
    for k in ks:
        for r in ranks:
            torch.testing.assert_close(r[k], single[k], rtol=1e-5, atol=1e-6, msg=k)
