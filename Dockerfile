# sidelink as a sidecar image: small, non-root, read-only root filesystem friendly.
FROM python:3.12-slim AS build
WORKDIR /src
# A C compiler for the compiled hot path (setup.py); the image that runs has none.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
    && python -m zipfile -l /wheels/sidelink-*.whl | grep -q '__mypyc'  # compiled, or fail

FROM python:3.12-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels sidelink && rm -rf /wheels
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 9901
ENTRYPOINT ["sidelink"]
CMD ["run"]
