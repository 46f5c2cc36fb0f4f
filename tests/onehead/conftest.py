"""Shared fixtures of the benchmark's tests: an isolated data cache and one finished tiny run."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory):
    """``XDG_CACHE_HOME`` in a temporary folder (the synthetic data is generated there once)."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield cache
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_run(cache_env, tmp_path_factory):
    """The tiny profile run once through the command line (naive and EWC, one seed)."""
    pytest.importorskip("timm")
    pytest.importorskip("pycocotools")
    from clreg.onehead.cli import main

    out = tmp_path_factory.mktemp("tiny")
    assert main(["--profile", "tiny", "--out", str(out), "--quiet"]) == 0
    return out
