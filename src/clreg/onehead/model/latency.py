"""CPU latency of the one-head model: the whole model, the head alone and the head's share."""

from __future__ import annotations

import time

import torch

from .network import UnifiedOneHead

__all__ = ["cpu_latency"]


@torch.no_grad()
def cpu_latency(model: UnifiedOneHead, size: int = 512, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median CPU latency of one ``size``×``size`` image, in ms: whole model, head alone, head share."""
    model = model.eval()
    x = torch.randn(1, 3, size, size)
    neck = model.neck_features(x)

    def median(fn) -> float:
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        ts.sort()
        return ts[len(ts) // 2] * 1e3

    whole = median(lambda: model(x))
    head = median(lambda: model.split(model.head(neck), x.shape[-2:]))
    return {
        "model_ms": whole,
        "head_ms": head,
        "head_share": head / whole,
        "size": size,
        "threads": torch.get_num_threads(),
    }
