"""A backbone pretrained on a synthetic pretext: the quick profile's stand-in for ImageNet weights.

clreg cannot download ImageNet weights, which the challenge allows. Instead the package ships a
MobileNetV3-small backbone trained on a dense pretext made by the same drawing code as the synthetic
tasks, but from a disjoint seed space (no pretext image is a task image):

* input: a 160 px scene of 1–4 shapes on a textured background, in random colours and with the
  solid or striped fills of :data:`~clreg.onehead.synthetic.STRIPED_WORLD` (the default world's
  patterns are new to it);
* target: which of the 10 shape kinds covers each pixel (11 classes with background), read at the
  model's stride-8 resolution: "what shape is where", with neither the fill (half of the
  segmentation task's classes) nor the scene labels (classification) nor boxes (detection).

The shape kinds overlap the tasks' vocabulary, as ImageNet's classes overlap VOC's and COCO's; the
benchmark report says so. Only the backbone is kept (the neck and head are retrained by every task).
``python -m clreg.onehead.pretext --out FILE`` re-creates the shipped file (see :func:`pretrain`).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from torch import Tensor

from .data import normalize
from .losses import segmentation_loss
from .model import UnifiedOneHead
from .synthetic import SHAPES, render
from .training import cosine_schedule

__all__ = ["PRETEXT_SEED_OFFSET", "SHIPPED_BACKBONE", "pretext_batch", "pretrain", "shipped_backbone"]

PRETEXT_SEED_OFFSET = 7_000_000  # task sets use seeds below 100 000
SHIPPED_BACKBONE = Path(__file__).parent / "weights" / "mobilenetv3_small_synthetic_pretext.pt"


def shipped_backbone() -> Path:
    """The path of the shipped pretext backbone (a ``mobilenetv3_small_100`` features-only state dict)."""
    if not SHIPPED_BACKBONE.is_file():
        raise FileNotFoundError(
            f"the shipped pretext backbone {SHIPPED_BACKBONE} is missing; re-create it with "
            "`python -m clreg.onehead.pretext --out` that path, or pass --backbone-weights / --random-init"
        )
    return SHIPPED_BACKBONE


def pretext_batch(index: int, n: int, size: int = 160) -> tuple[Tensor, Tensor]:
    """Images ``index … index + n − 1`` of the pretext: (n, 3, S, S) uint8 and (n, S, S) uint8 kind
    maps (0 background, 1 + kind, 255 on object borders)."""
    images, maps = [], []
    for i in range(index, index + n):
        rng = random.Random(PRETEXT_SEED_OFFSET + i)
        kinds = [rng.randrange(len(SHAPES)) for _ in range(rng.randint(1, 4))]
        img, mask, _ = render(rng, size, kinds, (0.2, 0.55))
        m = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).reshape(size, size).long()
        kind = torch.where((m > 0) & (m < 255), (m - 1) // 2 + 1, m).to(torch.uint8)
        images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(size, size, 3))
        maps.append(kind)
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.stack(maps)


def pretrain(
    out: str | Path,
    images: int = 15_000,
    steps: int = 3_000,
    batch_size: int = 32,
    lr: float = 3e-3,
    size: int = 160,
    seed: int = 0,
    log=print,
) -> dict[str, float]:
    """Train ``UnifiedOneHead(seg_classes=11)`` on the pretext and save its backbone's state dict."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    xs, ys = [], []
    for start in range(0, images, 500):
        x, y = pretext_batch(start, min(500, images - start), size)
        xs.append(x)
        ys.append(y)
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    log(f"pretext: {images} images rendered in {time.perf_counter() - t0:.0f} s")
    model = UnifiedOneHead(det_classes=1, seg_classes=len(SHAPES) + 1, cls_classes=1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps))
    g = torch.Generator().manual_seed(seed)
    running = 0.0
    for step in range(steps):
        idx = torch.randint(0, images, (batch_size,), generator=g)
        x, y = x_all[idx].float() / 255.0, y_all[idx].long()
        flip = torch.rand(batch_size, generator=g) < 0.5
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        loss = segmentation_loss(model(normalize(x)), y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 100 == 0:
            log(f"pretext step {step + 1}/{steps} loss {running:.4f} ({time.perf_counter() - t0:.0f} s)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    tmp = out.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    return {"loss": running, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m clreg.onehead.pretext", description=pretrain.__doc__)
    p.add_argument("--out", default=str(SHIPPED_BACKBONE))
    p.add_argument("--images", type=int, default=15_000)
    p.add_argument("--steps", type=int, default=3_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    r = pretrain(a.out, a.images, a.steps, a.batch_size, a.lr, seed=a.seed)
    print(f"saved {a.out}: final loss {r['loss']:.4f} in {r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
