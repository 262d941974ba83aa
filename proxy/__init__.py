"""sidelink: a sidecar proxy for stable pod-to-service calls."""

__version__ = "0.1.0"
