"""Fisher throughput on a small causal language model: samples (sequences) per second of each
estimator and path, in one run.

    python benchmarks/causal_lm_fisher.py [--rounds 3] [--samples 16] [--length 64] [--json out.json]

Needs ``transformers`` (``pip install "clreg[transformers]"``). The model is a Llama built from a
config (no download): vocabulary 1024, width 128, 2 layers, 4 heads (2 key-value heads), about
0.6 M parameters, eager attention (scaled-dot-product attention has no vmap batching rule, so under
vmap it runs a slow per-sample fallback); sequences of ``--length`` tokens, unpadded; 2 threads, CPU. Paths: ``vmap``
(without the attention mask, which Hugging Face models check in code vmap cannot trace),
``loop`` (one sequence at a time, with the mask) and ``layers`` (the curvature engine; the RMSNorm
weights take the per-sample path). After a warm-up of each, the cases run interleaved in a random
order each round; the table gives the median samples per second over rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import warnings

import torch

from clreg.functional import fisher_diagonal
from clreg.integrations.causal_lm import CausalLMDataset, causal_lm_spec

PATHS = {
    "vmap": ({"vectorize": True}, ("input_ids",)),
    "loop": ({"vectorize": False}, ("input_ids", "attention_mask")),
    "layers": ({"engine": "layers"}, ("input_ids",)),
}


def small_llama() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


def sequences(n: int, length: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (n, length), generator=g)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]


def one_case(model: torch.nn.Module, items: list, estimator: str, path: str) -> float:
    kw, keys = PATHS[path]
    data = CausalLMDataset(items, input_keys=keys)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fisher_diagonal(model, data, spec=causal_lm_spec(), estimator=estimator, **kw)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, items = small_llama(), sequences(args.samples, args.length)
    cases = [(e, p) for e in ("mc", "empirical") for p in PATHS] + [("batched", "loop")]
    for e, p in cases:  # warm-up
        one_case(model, items[:2], e, p)
    rates: dict[str, list[float]] = {f"{e}/{p}": [] for e, p in cases}
    rng = random.Random(0)
    for _ in range(args.rounds):
        for e, p in rng.sample(cases, len(cases)):
            rates[f"{e}/{p}"].append(one_case(model, items, e, p))
    n_params = sum(p.numel() for p in model.parameters())
    out = {"params": n_params, "length": args.length, "samples": args.samples, "rounds": args.rounds,
           "samples_per_s": {k: statistics.median(v) for k, v in rates.items()}}  # fmt: skip
    print(f"Llama from a config, {n_params / 1e6:.2f} M parameters, {args.length} tokens per sequence")
    for k, v in out["samples_per_s"].items():
        print(f"  {k:<18} {v:8.1f} sequences/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
