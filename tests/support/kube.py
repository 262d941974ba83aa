"""Kubernetes' own schemas (kubernetes-validate, strict): what the API server would accept."""

from __future__ import annotations

from typing import Any

import kubernetes_validate

# The oldest release sidelink supports (native sidecars) and the newest the package knows.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def kube_errors(obj: dict[str, Any], version: str) -> str | None:
    """None when ``obj`` is valid for that Kubernetes version, else what is wrong with it.

    Strict: a field the schema does not have (a typo, a field of a later release) is an error.
    """
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return f"{obj.get('kind')} {path or '(top)'}: {e.message}"
    return None
