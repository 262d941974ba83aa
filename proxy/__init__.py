"""sidelink: a sidecar proxy for stable pod-to-service calls."""

from importlib.util import find_spec

__version__ = "0.1.0"


def build() -> str:
    """How the forwarding hot path runs: "compiled" (with mypyc, see setup.py) or not."""
    spec = find_spec("proxy.http.h1")  # (finds the module without running it)
    origin = spec.origin if spec is not None else None
    return "pure Python" if origin is None or origin.endswith(".py") else "compiled"
