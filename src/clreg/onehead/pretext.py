"""A backbone pretrained on a synthetic pretext: the quick profile's stand-in for ImageNet weights.

clreg cannot download ImageNet weights, which the challenge allows. Instead the package ships a
MobileNetV3-small backbone trained on a dense pretext made by the same drawing code as the synthetic
tasks, but from a disjoint seed space (no pretext image is a task image):

* input: a 160 px scene of 1–4 shapes on a textured background, in random colours, each shape kind
  with its own pattern, fine or coarse: the fills of the default world (``fill="pattern"``);
* target: which of the 10 shape kinds covers each pixel (11 classes with background), read at the
  model's stride-8 resolution: "what shape is where", with neither the fill's period (half of the
  segmentation task's classes) nor the scene labels (classification) nor boxes (detection).

The shape kinds overlap the tasks' vocabulary, as ImageNet's classes overlap VOC's and COCO's; the
benchmark report says so. Only the backbone is kept (the neck and head are retrained by every task).
``python -m clreg.onehead.pretext`` re-creates the shipped file with the recipe recorded beside it
(:data:`SHIPPED_RECIPE`, ``…_pretext.json``: the arguments, the state's SHA-256 and a fingerprint of the
backbone after the first steps, which the tests recompute). ``--world striped`` gives the earlier
world's solid or striped fills.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from .data import normalize
from .losses import segmentation_loss
from .model import UnifiedOneHead
from .synthetic import SHAPES, render
from .training import cosine_schedule

__all__ = [
    "PRETEXT_SEED_OFFSET",
    "SHIPPED_BACKBONE",
    "SHIPPED_BACKBONE_IN_PACKAGE",
    "SHIPPED_RECIPE",
    "Recipe",
    "early_fingerprint",
    "fingerprint",
    "pretext_batch",
    "pretrain",
    "shipped_backbone",
    "state_digest",
]

PRETEXT_SEED_OFFSET = 7_000_000  # task sets use seeds below 100 000
SHIPPED_BACKBONE = Path(__file__).parent / "weights" / "mobilenetv3_small_synthetic_pretext.pt"
SHIPPED_RECIPE = SHIPPED_BACKBONE.with_suffix(".json")
# its place in the package (a run's record names it so, the same in every checkout)
SHIPPED_BACKBONE_IN_PACKAGE = SHIPPED_BACKBONE.relative_to(Path(__file__).parents[2]).as_posix()
WORLD_FILLS = {"pattern": "pattern", "striped": "random"}  # --world -> the renderer's fill


@dataclass(frozen=True)
class Recipe:
    """What the pretext trains: ``images`` scenes, ``steps`` AdamW steps of ``batch_size`` (cosine
    schedule from ``lr``), at ``size`` px, in ``world``'s fills, from ``seed``."""

    images: int = 15_000
    steps: int = 2_400
    batch_size: int = 32
    lr: float = 3e-3
    size: int = 160
    seed: int = 0
    world: str = "pattern"

    def __post_init__(self) -> None:
        if self.world not in WORLD_FILLS:
            raise ValueError(f"world must be one of {sorted(WORLD_FILLS)}, got {self.world!r}")


def shipped_backbone() -> Path:
    """The path of the shipped pretext backbone (a ``mobilenetv3_small_100`` features-only state dict)."""
    if not SHIPPED_BACKBONE.is_file():
        raise FileNotFoundError(
            f"the shipped pretext backbone {SHIPPED_BACKBONE} is missing; re-create it with "
            "`python -m clreg.onehead.pretext`, or pass --backbone-weights / --random-init"
        )
    return SHIPPED_BACKBONE


def _scene(i: int, size: int, world: str) -> tuple[Tensor, Tensor]:
    """Pretext image ``i``: (3, S, S) uint8 and its (S, S) kind map (0 background, 1 + kind, 255 border)."""
    rng = random.Random(PRETEXT_SEED_OFFSET + i)
    kinds = [rng.randrange(len(SHAPES)) for _ in range(rng.randint(1, 4))]
    img, mask, _ = render(rng, size, kinds, (0.2, 0.55), fill=WORLD_FILLS[world])
    m = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).reshape(size, size).long()
    kind = torch.where((m > 0) & (m < 255), (m - 1) // 2 + 1, m).to(torch.uint8)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return pixels.permute(2, 0, 1).contiguous(), kind


def pretext_batch(index: int, n: int, size: int = 160, world: str = "pattern") -> tuple[Tensor, Tensor]:
    """Images ``index … index + n − 1`` of the pretext: (n, 3, S, S) uint8 and (n, S, S) uint8 kind
    maps (0 background, 1 + kind, 255 on object borders)."""
    scenes = [_scene(i, size, world) for i in range(index, index + n)]
    return torch.stack([x for x, _ in scenes]), torch.stack([y for _, y in scenes])


class _Scenes:
    """The pretext's images, each rendered once, when first drawn."""

    def __init__(self, size: int, world: str) -> None:
        self.size, self.world, self.cache = size, world, {}

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        for i in idx.tolist():
            if i not in self.cache:
                self.cache[i] = _scene(i, self.size, self.world)
        items = [self.cache[i] for i in idx.tolist()]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def state_digest(state: dict[str, Tensor]) -> str:
    """A SHA-256 of a state dict's names, dtypes, shapes and values (not of the file, whose bytes
    carry its name)."""
    h = hashlib.sha256()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(state: dict[str, Tensor]) -> dict[str, list[float]]:
    """Per floating tensor of a state dict, its mean and mean absolute value (a summary that survives
    the last-bit differences between CPUs, unlike a hash)."""
    return {
        k: [float(v.double().mean()), float(v.double().abs().mean())] for k, v in state.items() if v.is_floating_point()
    }


def _train(recipe: Recipe, steps: int, log: Callable[[str], None]) -> tuple[UnifiedOneHead, float]:
    """``steps`` of the recipe's schedule (the schedule always spans ``recipe.steps``)."""
    torch.manual_seed(recipe.seed)
    scenes = _Scenes(recipe.size, recipe.world)
    model = UnifiedOneHead(det_classes=1, seg_classes=len(SHAPES) + 1, cls_classes=1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(recipe.steps))
    g = torch.Generator().manual_seed(recipe.seed)
    running, t0 = 0.0, time.perf_counter()
    for step in range(steps):
        x, y = scenes.batch(torch.randint(0, recipe.images, (recipe.batch_size,), generator=g))
        x, y = x.float() / 255.0, y.long()
        flip = torch.rand(recipe.batch_size, generator=g) < 0.5
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        loss = segmentation_loss(model(normalize(x)), y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 100 == 0:
            log(f"pretext step {step + 1}/{recipe.steps} loss {running:.4f} ({time.perf_counter() - t0:.0f} s)")
    return model, running


def _backbone_state(model: UnifiedOneHead) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}


def pretrain(out: str | Path, recipe: Recipe | None = None, log: Callable[[str], None] = print) -> dict:
    """Train ``UnifiedOneHead(seg_classes=11)`` on the pretext, save its backbone's state dict to
    ``out`` and the recipe beside it (``out`` with ``.json``): the arguments, the state's SHA-256
    (:func:`state_digest`), the loss, and the fingerprint of the backbone after the first 4 steps.
    Returns that record."""
    recipe = recipe or Recipe()
    t0 = time.perf_counter()
    early = early_fingerprint(recipe)
    model, loss = _train(recipe, recipe.steps, log)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    state = _backbone_state(model)
    torch.save(state, tmp)
    tmp.replace(out)
    record = {
        "recipe": asdict(recipe),
        "state_sha256": state_digest(state),
        "loss": loss,
        "seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
        "fingerprint_after_4_steps": early,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    return record


def early_fingerprint(recipe: Recipe) -> dict[str, list[float]]:
    """The fingerprint of the recipe's backbone after its first 4 steps (recomputed by the tests)."""
    return fingerprint(_backbone_state(_train(recipe, min(4, recipe.steps), lambda s: None)[0]))


def main(argv: list[str] | None = None) -> None:
    d = Recipe()
    p = argparse.ArgumentParser(prog="python -m clreg.onehead.pretext", description=pretrain.__doc__)
    p.add_argument("--out", default=str(SHIPPED_BACKBONE))
    p.add_argument("--images", type=int, default=d.images)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--world", choices=sorted(WORLD_FILLS), default=d.world)
    a = p.parse_args(argv)
    recipe = Recipe(a.images, a.steps, a.batch_size, a.lr, seed=a.seed, world=a.world)
    r = pretrain(a.out, recipe)
    print(f"saved {a.out}: final loss {r['loss']:.4f} in {r['seconds']:.0f} s, state sha256 {r['state_sha256'][:16]}")


if __name__ == "__main__":
    main()
