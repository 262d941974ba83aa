# sidelink as a sidecar image: small, non-root (65532), read-only root filesystem friendly.
#
#   docker build -t ghcr.io/sidelink/sidelink:0.1.0 .
#   docker build --build-arg BASE=sidelink-base:bookworm -t sidelink .   # another base
#
# BASE is any Debian bookworm image with python3 (3.11+): the official python slim image
# by default, or one made from Debian packages with debootstrap when no registry can be
# reached (see README, "Image"). Both stages start from it, so the interpreter the
# virtual environment points at is the one the final image has.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# Build-time settings for pip, when a mirror or a CA bundle is needed (unset: PyPI).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# A C compiler for the compiled hot path (setup.py); the image that runs has none. A
# Debian python3 also needs its headers and venv; the official image has both already.
RUN set -eu; \
    packages="gcc libc6-dev"; \
    python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
      || packages="$packages python3-dev"; \
    python3 -c 'import ensurepip' 2>/dev/null || packages="$packages python3-venv"; \
    apt-get update -qq; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >/dev/null; \
    rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/sidelink
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
# Install (compiling the hot path), then keep only what runs: no pip or setuptools, no
# sources of the extensions, their debug symbols stripped (a wheel's vendored libraries,
# with a RUNPATH set by auditwheel, are left as they are).
RUN set -eu; \
    /opt/sidelink/bin/pip install -q . ; \
    /opt/sidelink/bin/sidelink --version | grep -q compiled; \
    /opt/sidelink/bin/pip uninstall -q -y pip setuptools; \
    site=$(/opt/sidelink/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
    find "$site" \( -name '*.pyx' -o -name '*.pxd' -o -name '*.c' -o -name '*.h' \) -type f -delete; \
    find "$site" -name '*.so' -not -path '*.libs/*' -type f | while read -r so; do \
      readelf -d "$so" | grep -q -E 'R(UN)?PATH' || strip --strip-unneeded "$so"; \
    done; \
    rm -rf /opt/sidelink/bin/pip* /opt/sidelink/bin/activate* /opt/sidelink/bin/Activate.ps1; \
    /opt/sidelink/bin/python -c 'import aiohttp, dns.resolver, httptools, ngh2, prometheus_client, uvloop, yaml'; \
    /opt/sidelink/bin/sidelink --version

FROM ${BASE}
COPY --from=build /opt/sidelink /opt/sidelink
ENV PATH=/opt/sidelink/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# 65532: "nonroot" in distroless images; no home, no shell needed, nothing written.
USER 65532:65532
WORKDIR /
EXPOSE 9901
ENTRYPOINT ["sidelink"]
CMD ["run"]
