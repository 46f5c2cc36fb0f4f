"""Where a result came from: package versions, the commit, the CPU, the date; and a data root's hash."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .. import __version__

__all__ = ["data_hash", "provenance"]

PACKAGES = ("torch", "torchvision", "timm", "torchmetrics", "pycocotools", "numpy", "pillow")


def data_hash(root: Path, folders: Iterable[str]) -> str:
    """A digest of every file's path and size under ``root / folder`` for each folder."""
    h = hashlib.sha256()
    for folder in sorted(folders):
        for dirpath, dirs, files in sorted(os.walk(root / folder)):
            dirs.sort()
            for f in sorted(files):
                p = Path(dirpath) / f
                h.update(f"{p.relative_to(root)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict[str, Any]:
    """Versions, Python, commit, CPU, threads, platform and the date (UTC)."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    versions["clreg"] = __version__
    return {
        "versions": versions,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "cpu": _cpu(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
