"""Build sidelink; where a C compiler is at hand, the forwarding hot path is compiled.

The modules below are plain, type-checked Python; mypyc (part of mypy) turns them
into C extensions, which halves the interpreter's share of each proxied request.
Without a compiler (or with SIDELINK_COMPILE=0) the build falls back to the same
modules as pure Python: same behaviour, less speed. Other metadata: pyproject.toml.
"""

import os
import sys

from setuptools import setup

HOT_PATH = [
    "proxy/endpoints.py",
    "proxy/fds.py",
    "proxy/flow.py",
    "proxy/http/exchange.py",
    "proxy/http/h1.py",
    "proxy/http/h2.py",
    "proxy/http/heads.py",
    "proxy/metrics.py",
    "proxy/pool.py",
    "proxy/tcp.py",
]


def compiled_modules() -> list[object]:
    if os.environ.get("SIDELINK_COMPILE", "1") == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("sidelink: mypyc is not installed: the hot path stays pure Python", file=sys.stderr)
        return []
    # Third-party types are Any in the compiled code, whatever the build environment
    # holds (a stub that is wrong would otherwise become a runtime check that fails);
    # strict mode, for `mypy --strict proxy` in CI, would reject them as Any.
    options = [
        "--no-site-packages",
        "--ignore-missing-imports",
        "--no-warn-unused-ignores",
        "--no-warn-return-any",
    ]
    extensions = mypycify([*options, *HOT_PATH], opt_level="3")
    for extension in extensions:
        extension.optional = True  # no compiler: pure Python rather than no install
    return extensions


setup(ext_modules=compiled_modules())
