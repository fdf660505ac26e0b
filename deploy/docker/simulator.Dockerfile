# syntax=docker/dockerfile:1
# omega-simulator: replays MovieLens users as devices (`run`: its own local stack with an
# embedded Postgres; `replay`: against running shards named by OMEGA_SIMULATOR_SHARDS).
# Build from the repository root (the context is the project; see /.dockerignore):
#   docker build -f deploy/docker/simulator.Dockerfile -t exogenesis-omega/simulator:dev .
ARG VERSION=0.1.0

# Base of both stages: the pinned Python image, the OCI labels and the process environment.
FROM python:3.11-slim-bookworm AS base
ARG VERSION
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="omega-simulator" \
      org.opencontainers.image.description="Exogenesis Omega simulator: replays MovieLens 100K users as TV devices and reports sync cost, privacy and recommendation quality." \
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
ENV OMEGA_CACHE_DIR=/home/omega/.cache/exogenesis-omega \
    OMEGA_SIMULATOR_OUTPUT_DIR=/home/omega/reports
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "exogenesis-omega==${VERSION}" \
    && groupadd --system --gid 10001 omega \
    && useradd --system --uid 10001 --gid omega --home-dir /home/omega --create-home \
       --shell /usr/sbin/nologin omega
WORKDIR /home/omega
USER 10001:10001
# A batch job that exits with its report: no port and nothing to health-check. The data
# cache (MovieLens, the embedding model, about 90 MB) is OMEGA_CACHE_DIR: mount a volume there.
HEALTHCHECK NONE
ENTRYPOINT ["omega-simulator"]
CMD ["run"]
