"""clreg in a plain Accelerate loop with gradient accumulation: EWC and SI attached to the torch
optimizer under Accelerate's wrapper (their gradient added once per optimizer step, SI's path one
step per optimizer step), LwF through the loss, consolidation on the unwrapped model, and the
regularizer's state saved and loaded.

python examples/accelerate_loop.py          # a few seconds on a CPU
python examples/accelerate_loop.py --smoke  # a few steps
torchrun --nproc_per_node 2 examples/accelerate_loop.py --smoke    # DDP (gloo), two processes
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from torch.utils.data import DataLoader
from toy_tasks import make_task, mlp

import clreg


def regularizer(model: torch.nn.Module) -> clreg.Compose:
    return clreg.Compose(
        clreg.EWC(model, lam=10.0), clreg.SI(model, c=1.0, xi=0.1), clreg.LwF(model, temperature=2.0, alpha=0.3)
    )


def run(use: bool, tasks: list, epochs: int, k: int, ckpt: Path) -> list[float]:
    torch.manual_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=k, cpu=True)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loaders = [DataLoader(train, batch_size=16, shuffle=True) for train, _ in tasks]
    model, opt, *loaders = accelerator.prepare(model, opt, *loaders)  # opt: an AcceleratedOptimizer
    reg = regularizer(model)
    if use:  # the torch optimizer inside: Accelerate calls its step() on every k-th micro-batch only
        reg.attach(opt.optimizer, scaler=accelerator.scaler)
    for t, ((train, _), loader) in enumerate(zip(tasks, loaders)):
        for _ in range(epochs):
            for x, y in loader:
                with accelerator.accumulate(model):
                    out = model(x)
                    loss = F.cross_entropy(out, y)
                    if use:  # LwF's term; EWC's and SI's values come detached (their gradient is the hooks')
                        loss = loss + reg(model, inputs=x, outputs=out)
                    accelerator.backward(loss)  # loss / k
                    opt.step()  # a real step, with clreg's hooks, once per k micro-batches
                    opt.zero_grad()
        if use:  # SI counted the optimizer's steps: one per k micro-batches (and one at the end of the data)
            accelerator.print(
                f"task {t + 1}: {int(reg['si'].steps)} optimizer steps, {len(loader) * epochs} micro-batches"
            )
            reg.consolidate(accelerator.unwrap_model(model), train, clreg.TaskSpec())  # Fisher, path, teacher
    if use:  # the regularizer's state in a checkpoint, loaded into a fresh one as a restarted process would
        accelerator.save({"model": accelerator.unwrap_model(model).state_dict(), "reg": reg.state_dict()}, ckpt)
        accelerator.wait_for_everyone()
        fresh = regularizer(accelerator.unwrap_model(model))
        fresh.load_state_dict(torch.load(ckpt, weights_only=True)["reg"], strict=True)
        saved, loaded = reg.state_dict(), fresh.state_dict()  # Fisher, anchors, SI's path, LwF's teacher
        same = all(torch.equal(v, loaded[k]) for k, v in saved.items() if isinstance(v, torch.Tensor))
        accelerator.print(
            f"saved {len(saved)} entries to {ckpt.name}; restored exactly: {same and saved.keys() == loaded.keys()}"
        )
    with torch.no_grad():
        return [
            (model(x.to(accelerator.device)).argmax(1).cpu() == y).float().mean().item()
            for x, y in (test.tensors for _, test in tasks)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--path", type=Path, default=Path(tempfile.gettempdir()) / "clreg_accelerate_loop.pt")
    args = parser.parse_args()
    torch.set_num_threads(2)
    n = 200 if args.smoke else 1000
    tasks = [make_task(1, n), make_task(2, n)]
    epochs = 1 if args.smoke else 3
    naive = run(False, tasks, epochs, args.accumulate, args.path)
    both = run(True, tasks, epochs, args.accumulate, args.path)
    PartialState().print(f"naive fine-tuning: task 1 {naive[0]:.3f}  task 2 {naive[1]:.3f}")  # the main process
    PartialState().print(f"EWC + SI + LwF:    task 1 {both[0]:.3f}  task 2 {both[1]:.3f}")


if __name__ == "__main__":
    main()
