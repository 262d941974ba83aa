"""Kubernetes manifests the injection tests (library and command line) start from."""

from __future__ import annotations

import textwrap

DEPLOYMENT = textwrap.dedent(
    """\
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: web
    spec:
      replicas: 2
      selector:
        matchLabels: {app: web}
      template:
        metadata:
          labels: {app: web}
        spec:
          containers:
          - name: app
            image: example/web:1
            ports:
            - containerPort: 8080
    """
)
