# pathwatch container image.
#
#   docker build -t pathwatch:0.1.0 .
#   docker run --read-only -p 4317:4317 -p 4318:4318 -p 8080:8080 \
#       -v pathwatch-data:/var/lib/pathwatch pathwatch:0.1.0
#
# Two stages: the builder turns the source tree into a wheel and installs it, with its
# dependencies, into a self-contained venv; the final stage copies only that venv, so no build
# tools, pip caches or sources ship. Both stages use the same base image, so the venv's
# interpreter symlinks (/opt/venv/bin/python -> /usr/local/bin/python3.11) stay valid.
#
# The base is pinned by tag to a patch release. For byte-for-byte reproducible builds, pass the
# digest too: --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# A C compiler for pathwatch's optional accelerator of the receiver (setup.py): in this stage
# only, so it does not ship. Unpinned on purpose: any Debian gcc builds it, and the final image
# holds none of it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Only what the wheel is built from (see .dockerignore): pyproject.toml names README.md as the
# long description, setup.py declares the C extension, and the package lives under service/.
COPY pyproject.toml setup.py README.md ./
COPY service/ service/

# Every dependency (grpcio, rocksdict, protobuf, ...) ships manylinux wheels for CPython 3.11;
# the only thing compiled is pathwatch's own accelerator (check-config prints "receiver fast
# path: C accelerator"). The wheel is built without its dependencies, then installed with them
# into the venv that the final stage copies. check-config imports the CLI, the config loader,
# the rules and the sinks: a broken install fails the build here, not in the cluster.
RUN python -m venv /opt/venv \
    && python -m pip wheel --no-deps --wheel-dir /dist . \
    && /opt/venv/bin/pip install --no-cache-dir /dist/pathwatch-*.whl \
    && /opt/venv/bin/pathwatch check-config


FROM ${PYTHON_IMAGE}

ARG UID=10001
ARG GID=10001

LABEL org.opencontainers.image.title="pathwatch" \
      org.opencontainers.image.description="Alerts when a Kubernetes process runs from a never-seen executable path, from OpenTelemetry process metrics." \
      org.opencontainers.image.licenses="Apache-2.0"

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only at run time and the venv's bytecode
# was compiled by pip at install time, so Python must not try to write .pyc files.
# PATHWATCH_DATA_DIR: RocksDB's directory, the only place the service writes (plus /tmp).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATHWATCH_DATA_DIR=/var/lib/pathwatch

# A fixed, non-root uid/gid (matching the Helm chart's runAsUser/fsGroup) with no login shell
# and no home directory to write to. The data dir is created owned by it, so an empty named
# volume mounted there inherits the ownership on first use.
RUN groupadd --system --gid "${GID}" pathwatch \
    && useradd --system --uid "${UID}" --gid "${GID}" --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin pathwatch \
    && install -d -o "${UID}" -g "${GID}" -m 0750 /var/lib/pathwatch

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /var/lib/pathwatch
# Declared so that `docker run --read-only` still gets a writable data dir (an anonymous volume
# when none is mounted). Kubernetes ignores it and mounts the PersistentVolumeClaim instead.
VOLUME ["/var/lib/pathwatch"]

# 4317: OTLP/gRPC receiver (receiver.grpc.listen). 4318: OTLP/HTTP receiver (receiver.http.listen,
# POST /v1/metrics; an empty listen turns it off). 8080: admin HTTP (/healthz, /readyz, /metrics,
# /api/v1/...).
EXPOSE 4317 4318 8080

# For plain Docker only (Kubernetes uses the chart's probes). The slim image has no curl: the
# venv's Python does the request. Assumes the default http.listen port without http.tls;
# override it (docker run --health-cmd ...) otherwise.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

# pathwatch installs its own SIGTERM/SIGINT handlers and reaps the only children it starts
# (receiver worker processes, receiver.grpc.processes > 1), so it can run as PID 1 without an
# init. Without --config it runs on the embedded defaults plus PATHWATCH_*
# overrides; the chart appends `--config /etc/pathwatch/config.yaml`.
ENTRYPOINT ["pathwatch"]
CMD ["serve"]
