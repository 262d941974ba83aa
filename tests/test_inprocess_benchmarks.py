"""The in-process benchmarks (`python -m benchmarks.inprocess`, `benchmarks.inprocess_h2`)
still drive sidelink's protocol objects end to end: each counts every answer it expects
(they assert it), so a change that breaks the path they time fails here, not in a
session's measurements."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("module", "args", "line"),
    [
        ("benchmarks.inprocess", ["--requests", "300"], r"µs per request: request side"),
        ("benchmarks.inprocess_h2", ["--requests", "300", "--batches", "2"], r"100 streams at"),
        ("benchmarks.inprocess_h2", ["--requests", "100", "--streams", "1"], r"1 streams at"),
    ],
)
def test_an_in_process_benchmark_runs_its_requests(module: str, args: list[str], line: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(line, done.stdout), done.stdout
