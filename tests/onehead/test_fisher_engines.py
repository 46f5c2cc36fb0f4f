"""The one-head model's Fisher by the curvature engine equals the per-sample path, for each task's
output kind (dense softmax with an ignore index, detection's per-sample loss, classification) and
each estimator the kind allows; every parameter of the model has a layer rule."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset

from clreg.functional import fisher_diagonal
from clreg.functional.curvature import CurvatureEngine
from clreg.onehead.config import RunRequest, resolve
from clreg.onehead.experiments import open_workspace

CASES = [
    ("seg", "mc"),
    ("seg", "empirical"),
    ("det", "empirical"),
    ("cls", "exact"),
    ("cls", "mc"),
    ("cls", "empirical"),
]


@pytest.fixture(scope="module")
def workspace(cache_env, tmp_path_factory):
    pytest.importorskip("timm")
    return open_workspace(resolve(RunRequest(profile="tiny", out=str(tmp_path_factory.mktemp("engines")))))


@pytest.mark.parametrize(("task", "estimator"), CASES)
def test_the_engine_equals_the_per_sample_path_on_the_one_head_model(workspace, task, estimator) -> None:
    torch.manual_seed(0)
    model = workspace.make_model().eval()
    t = workspace.tasks[task]
    data = Subset(t.fit_data if t.fit_data is not None else t.train_data, range(5))
    kw = dict(spec=t.spec, estimator=estimator, seed=2, chunk_size=2)
    want = fisher_diagonal(model, data, engine="per_sample", **kw)
    got = fisher_diagonal(model, data, engine="layers", **kw)
    assert set(got) == set(want) and any(float(v.abs().max()) > 0 for v in want.values())
    for name in want:
        scale = float(want[name].abs().max()) + 1e-12
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale)


def test_every_parameter_of_the_one_head_model_has_a_layer_rule(workspace) -> None:
    model = workspace.make_model()
    engine = CurvatureEngine(model)
    assert engine.fallback == []
    assert len(engine.layers) > 0
