"""The real-data chain end to end: fit the one-head model on 32 real training images and score it
on those same images through the real loader, target encoder, decoder and COCOeval / mIoU.

    python benchmarks/onehead_realfit.py --data-root ../shared/data/real [--task det|seg] [--steps 600]

This proves the encoding and the metric, not generalisation; the val figures are printed too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from clreg.onehead.data import DetectionData, SegmentationData
from clreg.onehead.metrics import bootstrap
from clreg.onehead.model import UnifiedOneHead
from clreg.onehead.tasks import DetectionTask, SegmentationTask
from clreg.onehead.training import RunSettings, train_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--task", choices=["det", "seg"], default="det")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    first = list(range(args.images))
    if args.task == "det":
        train = DetectionData(args.data_root / "mini_coco_det", "train", args.size).subset(first)
        val = DetectionData(args.data_root / "mini_coco_det", "val", args.size)
        task = DetectionTask(train, train, None, train.categories)
        val_task = DetectionTask(val, val, None, val.categories)
    else:
        train = SegmentationData(args.data_root / "mini_voc_seg", "train", args.size).subset(first)
        val = SegmentationData(args.data_root / "mini_voc_seg", "val", args.size)
        task = SegmentationTask(train, train, None, [str(i) for i in range(21)])
        val_task = SegmentationTask(val, val, None, [str(i) for i in range(21)])
    model = UnifiedOneHead(det_classes=10, seg_classes=21, cls_classes=10)
    t = time.perf_counter()
    run = RunSettings(batch_size=args.batch_size)
    stats = train_task(model, task, args.steps, lr=args.lr, run=run, log=print)
    fit = task.evaluate(model)
    held = val_task.evaluate(model)
    name = "mAP@0.5" if args.task == "det" else "mIoU"
    print(f"trained {stats['steps']} steps in {time.perf_counter() - t:.0f} s")
    ci = bootstrap(fit, 500)
    print(f"{name} on the {args.images} training images: {ci['value']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]")
    if args.task == "det":
        print(f"mAP@[.5:.95] on them: {fit.map_50_95():.3f}")
    ci = bootstrap(held, 500)
    print(f"{name} on val ({len(val)} images): {ci['value']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]")


if __name__ == "__main__":
    main()
