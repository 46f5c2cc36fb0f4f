"""Training-step overhead of each regularizer, state memory, and Fisher throughput, in one run.

    python benchmarks/step_overhead.py [--steps 60] [--fisher-samples 16] [--variants a,b] [--device cuda] [--json out.json]

With avalanche-lib installed (``pip install clreg[avalanche]``) the same step with Avalanche's
``EWCPlugin`` and ``SynapticIntelligencePlugin`` is timed in the same rounds (``avalanche-ewc``,
``avalanche-si``).

Protocol (fixed in benchmarks/protocol.py): MobileNetV3-small + small conv head (~2 M parameters),
batch 16 at 128×128, SGD with momentum, 2 threads, CPU. After a warm-up, the variants are run
interleaved (a random order each round); a variant's ratio is the median over rounds of its step time
over the plain step's in the same round, with a 95 % bootstrap interval (resampling rounds). The
Fisher cases (each estimator by the vectorised, looped and per-layer paths; ``batched`` at B = 1, 8,
16) are timed once cold, then ``--fisher-rounds`` times warm in a random order each round: the median,
and the median over rounds of each case's rate over ``batched`` B = 16's in the same round.
``--device cuda`` runs the same on the GPU (the models and the batch there, each timing synchronised);
``benchmarks/gpu_checks.py`` uses it.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import clreg
import protocol
from clreg.functional import fisher_diagonal


def paired_ratio(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The median over rounds of a[r] / b[r] (same round, so slow drifts of the machine cancel) and
    its 95 % bootstrap interval (resampling rounds)."""
    ratios = [x / y for x, y in zip(a, b)]
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n))
    return statistics.median(ratios), meds[int(0.025 * n)], meds[int(0.975 * n)]


def step_overhead(steps: int, warmup: int, names: list[str] | None = None, device: str = "cpu") -> dict:
    variants = protocol.build_all(names, device)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(warmup):
        for v in variants:
            v.step()
    rng = random.Random(0)
    for r in range(steps):
        order = list(variants)
        rng.shuffle(order)
        for v in order:
            times[v.name].append(protocol.timed(v.step))
        print(f"\rround {r + 1}/{steps}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    plain = times["plain"]
    n_params = sum(p.numel() for p in variants[0].model.parameters())
    rows = {}
    for v in variants:
        med = statistics.median(times[v.name])
        ratio, lo, hi = paired_ratio(times[v.name], plain)
        held = v.held()
        rows[v.name] = {
            "median_ms": med * 1e3,
            "ratio": ratio,
            "ratio_ci95": [lo, hi],
            "state_bytes_per_param": held / n_params,
        }
        if hasattr(v.reg, "factor_bytes"):  # K-FAC EWC: the factors' bytes per factored layer
            rows[v.name]["factor_bytes"] = v.reg.factor_bytes()
    return {"n_params": n_params, "steps": steps, "variants": rows}


def fisher_throughput(samples: int, rounds: int = 3, device: str = "cpu") -> dict:
    torch.set_num_threads(protocol.THREADS)
    torch.manual_seed(0)
    model = protocol.Net().to(device)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(samples, 3, protocol.SIZE, protocol.SIZE, generator=g),
        torch.randint(0, protocol.CLASSES, (samples,), generator=g),
    )
    paths = {"vmap": {"vectorize": True}, "loop": {"vectorize": False}, "layers": {"engine": "layers"}}
    cases = {f"{e}/{p}": dict(estimator=e, **kw) for e in ("empirical", "mc", "exact") for p, kw in paths.items()}
    cases |= {f"batched/B={b}": dict(estimator="batched", batch_size=b) for b in (1, 8, 16)}
    out = {}
    for name, kw in cases.items():  # the first call of each: cold (compilation of the vmapped functions …)
        cold = protocol.timed(lambda kw=kw: fisher_diagonal(model, data, **kw))
        out[name] = {"cold_samples_per_s": samples / cold, "warm": []}
    rng = random.Random(0)
    for _ in range(rounds):  # then warm, interleaved in a random order each round: the median of the rounds
        for name in rng.sample(list(cases), len(cases)):
            kw = cases[name]
            out[name]["warm"].append(samples / protocol.timed(lambda kw=kw: fisher_diagonal(model, data, **kw)))
    ref = out["batched/B=16"]["warm"]
    for r in out.values():  # the same round's batched B = 16 as the reference: slow drifts cancel
        r["ratio_to_batched16"] = statistics.median(w / b for w, b in zip(r["warm"], ref))
    for r in out.values():
        r["warm_samples_per_s"] = statistics.median(r.pop("warm"))
    return out


def _variant_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = ["plain"] + [n for n in (t.strip() for t in text.split(",")) if n and n != "plain"]
    known = protocol.VARIANTS + protocol.AVALANCHE_VARIANTS
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(known)}")
    return names


def machine(device: str = "cpu") -> dict:
    """The CPU, the threads, torch's version and the device timed (with the GPU's name on CUDA)."""
    out = {
        "cpu": platform.processor() or platform.machine(),
        "threads": protocol.THREADS,
        "torch": torch.__version__,
        "device": device,
    }
    if torch.device(device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="timed rounds (>= 30 for the reported figures)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--fisher-samples", type=int, default=16)
    p.add_argument("--fisher-rounds", type=int, default=3, help="warm rounds of every Fisher case (the median)")
    p.add_argument("--skip-fisher", action="store_true")
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset (always with plain), e.g. plain,ewc-attached,avalanche-ewc; "
        "default: all, Avalanche's plugins included when avalanche-lib is installed",
    )
    p.add_argument("--device", default="cpu", help="where the models run (default cpu; e.g. cuda)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    res = {
        "machine": machine(args.device),
        "clreg": clreg.__version__,
        "step": step_overhead(args.steps, args.warmup, _variant_names(args.variants), args.device),
    }
    print(
        f"\nTraining step, {res['step']['n_params'] / 1e6:.2f} M parameters, median of {args.steps} interleaved rounds"
    )
    print(f"{'variant':22s} {'ms':>8s} {'ratio':>7s} {'95% interval':>16s} {'state B/param':>14s}")
    for name, r in res["step"]["variants"].items():
        lo, hi = r["ratio_ci95"]
        print(
            f"{name:22s} {r['median_ms']:8.1f} {r['ratio']:7.3f} {f'[{lo:.3f}, {hi:.3f}]':>16s} {r['state_bytes_per_param']:14.1f}"
        )
    if not args.skip_fisher:
        res["fisher"] = fisher_throughput(args.fisher_samples, args.fisher_rounds, args.device)
        print(f"\nFisher throughput ({args.fisher_samples} samples), samples/s")
        for name, r in res["fisher"].items():
            cold = r.get("cold_samples_per_s")
            print(
                f"{name:20s} warm {r['warm_samples_per_s']:8.1f}   cold {cold:8.1f}   "
                f"× batched B=16 (paired) {r['ratio_to_batched16']:.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
