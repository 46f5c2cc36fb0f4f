"""Each example runs with --smoke (a few steps) and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(*args: str, timeout: int = 120) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=EXAMPLES.parent)
    assert out.returncode == 0, out.stderr[:3000] + "\n...\n" + out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize(
    ("script", "expect"),
    [
        ("ewc_classification.py", ["naive fine-tuning: task 1", "EWC (lam=", "task 1 kept"]),
        ("si_attached.py", ["naive fine-tuning: task 1", "SI (c="]),
        ("lwf_multi_output.py", ["naive fine-tuning: head a", "LwF (alpha="]),
        ("replay_compose.py", ["last values: {'ewc':", "EWC + LwF + replay:     task 1"]),
        ("checkpoint_resume.py", ["restored exactly: True"]),
        ("custom_regularizer.py", ["L2Anchor passes the clreg.testing contract"]),
        ("custom_scenario.py", ["halfspaces passes the clreg.bench.testing contract", "replay  ACC"]),
    ],
)
def test_example_smoke(script: str, expect: list[str]) -> None:
    out = run(sys.executable, str(EXAMPLES / script), "--smoke")
    for line in expect:
        assert line in out, out


def test_lightning_example() -> None:
    pytest.importorskip("lightning")
    out = run(sys.executable, str(EXAMPLES / "lightning_tasks.py"), "--smoke")
    assert "naive    task 1" in out and "ewc      task 1" in out and "lwf      task 1" in out, out


def test_torchrun_example_with_two_processes() -> None:
    out = run(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port on localhost, never a fixed one
        "--nproc_per_node",
        "2",
        str(EXAMPLES / "torchrun_ddp.py"),
        "--smoke",
        timeout=180,
    )
    assert "world size 2" in out and "importance identical on every rank: True" in out, out


def test_fsdp2_example_with_two_processes() -> None:
    pytest.importorskip("torch.distributed.fsdp")
    out = run(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(EXAMPLES / "fsdp2.py"),
        "--smoke",
        timeout=180,
    )
    assert "world size 2" in out and "EWC state bytes per rank" in out, out
    assert "the full form in one process gives the same penalty: True" in out, out


def test_lora_causal_lm_example() -> None:
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    out = run(sys.executable, str(EXAMPLES / "lora_causal_lm.py"), "--smoke", timeout=300)
    assert "naive    task 1" in out and "ewc      task 1" in out and "lwf      task 1" in out, out
    assert "task 1 kept: naive" in out, out


def test_accelerate_example() -> None:
    pytest.importorskip("accelerate")
    out = run(sys.executable, str(EXAMPLES / "accelerate_loop.py"), "--smoke")
    assert "task 1: 3 optimizer steps, 10 micro-batches" in out and "restored exactly: True" in out, out
