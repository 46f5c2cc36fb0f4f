"""An image classifier over two tasks in Lightning, one ``fit`` each, with EWC attached by clreg's
callback and LwF added in ``training_step`` (one line). The tasks (``toy_tasks.make_image_task``):
noisy 16×16 images whose class is the quadrant of a bright square, then of a dark square one quadrant
on. EWC uses each task's Fisher normalised by its mean (``normalize="mean"``): the classifier is so
confident on task 1 that its raw Fisher is tiny, and λ then keeps a scale-free meaning. Needs
``pip install "clreg[lightning]"``.

python examples/lightning_tasks.py          # about a minute on a CPU
python examples/lightning_tasks.py --smoke  # a few steps
"""

from __future__ import annotations

import argparse
import logging

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from toy_tasks import accuracy, cnn, make_image_task

import clreg
from clreg.integrations.lightning import ContinualLearning


class Classifier(L.LightningModule):
    def __init__(self, lwf: bool) -> None:
        super().__init__()
        self.net = cnn()
        self.lwf = lwf
        self.continual: ContinualLearning | None = None  # set below, once the callback exists

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        loss = F.cross_entropy(out, y)
        if self.lwf:  # the one line for a term without a closed form
            loss = loss + self.continual.penalty(self, x, out)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def run(method: str, tasks: list, epochs: int) -> list[float]:
    torch.manual_seed(0)
    model = Classifier(lwf="lwf" in method)
    members = []
    if "ewc" in method:
        members.append(clreg.EWC(model, lam=0.2, normalize="mean"))
    if "lwf" in method:
        members.append(clreg.LwF(model, temperature=2.0))
    # at the end of each fit the regularizer consolidates on that fit's training loader
    callbacks = [ContinualLearning(clreg.Compose(*members))] if members else []
    model.continual = callbacks[0] if callbacks else None
    for train, _ in tasks:
        trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True))
    return [accuracy(model, test) for _, test in tasks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    n = 200 if args.smoke else 1000
    tasks = [make_image_task(0, n), make_image_task(1, n)]
    epochs = 1 if args.smoke else 5
    for method in ("naive", "ewc", "lwf"):
        first, second = run(method, tasks, epochs)
        print(f"{method:<8} task 1 {first:.3f}  task 2 {second:.3f}")


if __name__ == "__main__":
    main()
