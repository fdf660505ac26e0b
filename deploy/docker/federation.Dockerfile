# syntax=docker/dockerfile:1
# omega-federation: the federation worker (`omega-federation periodic`; `run-once` for a CronJob).
# Build from the repository root (the context is the project; see /.dockerignore):
#   docker build -f deploy/docker/federation.Dockerfile -t exogenesis-omega/federation:dev .
ARG VERSION=0.1.0

# Base of both stages: the pinned Python image, the OCI labels and the process environment.
FROM python:3.11-slim-bookworm AS base
ARG VERSION
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="omega-federation" \
      org.opencontainers.image.description="Exogenesis Omega federation worker: federated averaging with differential privacy over every shard's internal listener." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Exogenesis Omega" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"
# MALLOC_ARENA_MAX=2: fewer glibc malloc arenas, measured to cut retained memory under
# hostile load.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MALLOC_ARENA_MAX=2

# Build stage: the project wheel (pyproject.toml) and the wheels of its runtime dependencies
# (no dev extras, no compiler: every dependency ships a manylinux wheel).
FROM base AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: only the installed wheels (mounted from the build stage, not copied into a
# layer), run by an unprivileged user with a numeric uid (Kubernetes runAsNonRoot checks it).
FROM base AS runtime
ARG VERSION
ENV OMEGA_FEDERATION_METRICS_PORT=9100 \
    OMEGA_FEDERATION_LOG_JSON=true
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "exogenesis-omega==${VERSION}" \
    && groupadd --system --gid 10001 omega \
    && useradd --system --uid 10001 --gid omega --home-dir /home/omega --create-home \
       --shell /usr/sbin/nologin omega
WORKDIR /home/omega
USER 10001:10001
# 9100: /metrics (served in periodic mode).
EXPOSE 9100
STOPSIGNAL SIGTERM
# The worker serves no gRPC: in periodic mode it is alive while its /metrics endpoint answers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ['OMEGA_FEDERATION_METRICS_PORT'], timeout=3)"]
ENTRYPOINT ["omega-federation"]
CMD ["periodic"]
