"""The Lightning callback under ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` in ``configure_model``)
on two CPU processes: the regularizer built by a factory on the sharded module trains and consolidates
two tasks with EWC and SI attached and LwF in the loss, and its state and the weights equal one
process's on the same global batches (rtol 1e-5), also when task 2 resumes from a distributed
checkpoint made after task 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

L = pytest.importorskip("lightning")
pytest.importorskip("torch.distributed.fsdp")

_SCRIPT = r"""
import os, sys, torch, lightning as L
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset
import clreg
from clreg.integrations.lightning import ContinualLearning

def task_data(t, n=32):
    g = torch.Generator().manual_seed(100 + t)
    x = torch.randn(n, 4, generator=g)
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(t))
    return TensorDataset(x, (x @ w).argmax(1))

class Net(L.LightningModule):
    def __init__(self, shard):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        self.shard, self.continual = shard, None
    def configure_model(self):
        if self.shard and not getattr(self, "sharded", False):
            from torch.distributed.fsdp import fully_shard
            fully_shard(self.body, mesh=self.device_mesh["data_parallel"])
            self.sharded = True
    def forward(self, x):
        return self.body(x)
    def training_step(self, batch, i):
        x, y = batch
        out = self(x)
        return F.cross_entropy(out, y) + self.continual.penalty(self, x, out)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

shard, resume = sys.argv[1] in ("sharded", "resumed"), sys.argv[1] == "resumed"
make = lambda m: clreg.Compose(clreg.EWC(m, lam=1.0, estimator="exact"), clreg.SI(m, c=0.5), clreg.LwF(m, alpha=1.0))
spec = clreg.TaskSpec(outputs=[clreg.OutputSpec(None, "softmax")])

def fresh():
    net = Net(shard)
    net.continual = ContinualLearning(make, data=task_data(0), spec=spec, log_every_n_steps=None)
    return net, net.continual

net, continual = fresh()
for t in range(2):
    continual.data = task_data(t)
    if shard:
        from lightning.pytorch.strategies import ModelParallelStrategy
        strategy, devices = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 2
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        loader = DataLoader(Subset(task_data(t), list(range(rank, 32, 2))), batch_size=8)  # half of each global batch
    else:
        strategy, devices = "auto", 1
        loader = DataLoader(task_data(t), batch_size=16)
    epochs = 2 if resume and t == 1 else 1  # an epoch is 2 steps; a resumed fit counts the checkpoint's epoch
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs, callbacks=[continual],
                        use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(net, loader, ckpt_path=sys.argv[3] if resume and t == 1 else None)
    if resume and t == 0:  # a distributed checkpoint after task 1, then new objects that resume from it
        trainer.save_checkpoint(sys.argv[3])
        net, continual = fresh()
full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v
state = {k: full(v) for k, v in continual.regularizer.state_dict().items() if isinstance(v, torch.Tensor)}
params = {k: full(v).detach() for k, v in net.state_dict().items()}
kinds = sorted({type(p).__name__ for p in net.parameters()})
if trainer.global_rank == 0:
    torch.save({"state": state, "params": params, "kinds": kinds, "tasks": continual.tasks}, sys.argv[2])
"""


@pytest.mark.slow
def test_model_parallel_fsdp2_gives_the_single_process_state_and_weights(tmp_path) -> None:
    """Sharded, and sharded with a distributed checkpoint after task 1 from which new objects resume
    task 2 (``fit(ckpt_path=...)``): both end with one process's state and weights."""
    script = tmp_path / "sharded.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for kind in ("sharded", "resumed", "one"):
        out = tmp_path / f"{kind}.pt"
        r = subprocess.run([sys.executable, str(script), kind, str(out), str(tmp_path / "ckpt")], env=env,
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        runs[kind] = torch.load(out, weights_only=True)
    assert (tmp_path / "ckpt").is_dir()  # the model's and optimizer's state through torch.distributed.checkpoint
    for kind in ("sharded", "resumed"):
        assert runs[kind]["kinds"] == ["DTensor"] and runs["one"]["kinds"] == ["Parameter"]
        assert runs[kind]["tasks"] == runs["one"]["tasks"] == 2
        assert sorted(runs[kind]["state"]) == sorted(runs["one"]["state"])
        for part in ("state", "params"):
            for k, v in runs["one"][part].items():
                got = runs[kind][part][k]
                if v.is_floating_point():
                    torch.testing.assert_close(got, v, rtol=1e-5, atol=1e-7, msg=f"{kind} {part} {k}")
                else:
                    assert torch.equal(got, v), k
