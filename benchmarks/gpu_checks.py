"""The GPU checks in one run: the CUDA test suite and the training-step overhead on the GPU.

    python benchmarks/gpu_checks.py --out DIR [--steps 60] [--skip-tests] [--skip-timing] [--skip-fisher]

1. ``python -m pytest -m gpu tests/gpu`` in a subprocess (each regularizer on CUDA against the CPU,
   the Fisher estimators, fp16 autocast with a GradScaler through a skipped step, bf16 autocast,
   ``torch.compile``, the one-head model's latency at 512 × 512; see ``tests/gpu/test_cuda.py``);
2. the training-step ratios of ``benchmarks/step_overhead.py`` on the GPU (``--device cuda``, the
   protocol of ``benchmarks/protocol.py``: MobileNetV3-small with a small conv head, batch 16 at
   128 × 128) for a subset of its variants, and its Fisher throughput (``--skip-fisher`` leaves it out).

It writes to ``DIR``: ``gpu_checks.json`` (everything), ``gpu_checks.md`` (short tables),
``pytest.xml`` (JUnit, with the latency figures as properties) and ``pytest.log``. Sized to finish in
under five minutes on one GPU: the suite's models are tiny but for the one-head model's latency, and
it is stopped after 240 s; the step timing is 14 variants × (5 + 60) steps of a 2 M-parameter model,
and the Fisher cases 16 samples each. (Not yet run on a GPU: the sizing is an estimate.) The exit code
is pytest's when a test failed (1 when the suite timed out), else 0.

Without CUDA (``torch.cuda.is_available()`` False) it prints why, runs and writes nothing, and exits
with code 0, so a CPU-only CI job can call it harmlessly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

VARIANTS = [  # the protocol's variants timed on the GPU (plain first: the ratios' reference)
    "plain",
    "ewc-autograd",
    "ewc-attached",
    "online_ewc-attached",
    "mas-attached",
    "si-autograd",
    "si-attached",
    "lwf-autograd",
    "kfac_ewc-attached",
    "rwalk-attached",
    "l2sp-attached",
    "agem-attached",
    "der-autograd",
    "er_ace-autograd",
]
LATENCY_LIMIT_MS = 150.0  # the challenge's limit, per 512 × 512 image on a T4
TEST_TIMEOUT_S = 240


def run_tests(out: Path, device: str) -> dict:
    """The suite in a subprocess; its outcomes and recorded properties from the JUnit file."""
    xml, log = out / "pytest.xml", out / "pytest.log"
    cmd = [
        sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rsx", "-p", "no:cacheprovider",
        f"--junitxml={xml}", "-o", "junit_family=xunit1",
    ]  # fmt: skip
    env = {**os.environ, "CLREG_GPU_TEST_DEVICE": device}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        log.write_text(f"{err.stdout or ''}\n{err.stderr or ''}\ntimed out after {TEST_TIMEOUT_S} s\n")
        return {"returncode": None, "error": f"timed out after {TEST_TIMEOUT_S} s", "cases": [], "counts": {}}
    log.write_text(proc.stdout + proc.stderr)
    cases = parse_junit(xml) if xml.exists() else []
    counts: dict[str, int] = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    return {"returncode": proc.returncode, "counts": counts, "cases": cases}


def parse_junit(path: Path) -> list[dict]:
    """Each test case: its name, outcome (passed, failed, error, skipped, xfailed), seconds, message and
    recorded properties."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = "xfailed" if tag == "skipped" and el.get("type") == "pytest.xfail" else tag
                outcome = {"failure": "failed"}.get(outcome, outcome)
                message = (el.get("message") or "").strip()
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append(
            {
                "name": case.get("name"),
                "outcome": outcome,
                "seconds": float(case.get("time") or 0.0),
                "message": message[:500],
                "properties": props,
            }
        )
    return cases


def latency_of(tests: dict) -> dict | None:
    """The one-head latency the suite recorded (``model_ms``, ``head_ms``, ``head_share``, ``size``)."""
    for c in tests.get("cases", []):
        if c["name"].startswith("test_onehead_latency") and "model_ms" in c["properties"]:
            p = c["properties"]
            return {
                "model_ms": float(p["model_ms"]),
                "head_ms": float(p["head_ms"]),
                "head_share": float(p["head_share"]),
                "size": int(p["size"]),
                "limit_ms": LATENCY_LIMIT_MS,
                "outcome": c["outcome"],
            }
    return None


def run_timing(args: argparse.Namespace) -> dict:
    import step_overhead

    res = {"step": step_overhead.step_overhead(args.steps, args.warmup, VARIANTS, args.device)}
    if not args.skip_fisher:
        res["fisher"] = step_overhead.fisher_throughput(args.fisher_samples, args.fisher_rounds, args.device)
    return res


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# GPU checks",
        "",
        f"{m.get('gpu', '?')}, torch {m['torch']} (CUDA {res['cuda']}), clreg {res['clreg']}, {res['date']}",
        "",
    ]
    tests = res.get("tests")
    if tests is not None:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(tests.get("counts", {}).items())) or tests.get("error", "")
        lines += ["## Tests (`pytest -m gpu tests/gpu`)", "", counts, ""]
        listed = [c for c in tests.get("cases", []) if c["outcome"] in ("failed", "error", "xfailed")]
        if listed:  # the failures, and the known bugs (xfail) with their reasons
            lines += ["| test | outcome | message |", "|---|---|---|"]
            for c in listed:
                first = c["message"].splitlines()[0] if c["message"] else ""
                lines.append(f"| {c['name']} | {c['outcome']} | {first.replace('|', '/')} |")
            lines.append("")
        lat = res.get("latency")
        if lat is not None:
            lines += [
                f"## One-head model at {lat['size']} × {lat['size']}",
                "",
                "| whole model (ms) | head (ms) | head share | limit (ms, on a T4) |",
                "|---|---|---|---|",
                f"| {lat['model_ms']:.2f} | {lat['head_ms']:.2f} | {lat['head_share']:.3f} | {lat['limit_ms']:.0f} |",
                "",
            ]
    step = res.get("step")
    if step is not None:
        lines += [
            f"## Training step on the GPU ({step['n_params'] / 1e6:.2f} M parameters, {step['steps']} rounds)",
            "",
            "| variant | ms | ratio | 95 % interval |",
            "|---|---|---|---|",
        ]
        for name, r in step["variants"].items():
            lo, hi = r["ratio_ci95"]
            lines.append(f"| {name} | {r['median_ms']:.2f} | {r['ratio']:.3f} | [{lo:.3f}, {hi:.3f}] |")
        lines.append("")
    fisher = res.get("fisher")
    if fisher is not None:
        lines += ["## Fisher throughput on the GPU (samples/s)", "", "| case | warm | cold |", "|---|---|---|"]
        for name, r in fisher.items():
            lines.append(f"| {name} | {r['warm_samples_per_s']:.1f} | {r['cold_samples_per_s']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the folder the results are written to")
    p.add_argument("--device", default="cuda", help="the CUDA device (default cuda)")
    p.add_argument("--steps", type=int, default=60, help="timed rounds of the training step")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--fisher-samples", type=int, default=16)
    p.add_argument("--fisher-rounds", type=int, default=3)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-fisher", action="store_true")
    args = p.parse_args()
    if torch.device(args.device).type != "cuda":
        p.error(f"--device must be a CUDA device, got {args.device!r}")
    if not torch.cuda.is_available():
        print(
            "gpu_checks: CUDA is not available (torch.cuda.is_available() is False): nothing was run and "
            "nothing written. Run it on a machine with an NVIDIA GPU and a CUDA build of torch.",
            file=sys.stderr,
        )
        return 0
    import clreg
    import step_overhead

    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "machine": step_overhead.machine(args.device),
        "cuda": torch.version.cuda,
        "clreg": clreg.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    code = 0
    if not args.skip_tests:
        res["tests"] = run_tests(args.out, args.device)
        res["latency"] = latency_of(res["tests"])
        rc = res["tests"]["returncode"]
        code = 1 if rc is None else rc
        print(f"tests: {res['tests'].get('counts') or res['tests'].get('error')}", file=sys.stderr)
    if not args.skip_timing:
        res |= run_timing(args)
    (args.out / "gpu_checks.json").write_text(json.dumps(res, indent=2))
    text = markdown(res)
    (args.out / "gpu_checks.md").write_text(text)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
