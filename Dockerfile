# syntax=docker/dockerfile:1
#
# One image for every jobstream service; the command picks the service:
#   python -m services.gateway     gRPC API on JOBSTREAM_GATEWAY_LISTEN (default here 0.0.0.0:50051)
#   python -m services.scheduler   job state machine
#   python -m services.worker      runs chunks
# Each one serves /metrics, /livez and /readyz on JOBSTREAM_METRICS_PORT (9100 here).
#
#   docker build -t jobstream:0.1.0 .
#   docker run --rm -e JOBSTREAM_DATABASE_URL=... -e JOBSTREAM_KAFKA_BOOTSTRAP=... jobstream:0.1.0 python -m services.worker

# ---- build: a virtualenv with the runtime dependencies and the package, nothing else ----
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/jobstream
ENV PATH=/opt/jobstream/bin:$PATH
WORKDIR /src

# Dependencies first, in their own layer, so a code change does not reinstall them. The versions
# come from requirements.lock (as constraints); only the runtime subset is installed: the lock
# also holds the test, lint and embedded-server packages, which an image does not need.
COPY requirements.lock ./
RUN pip install --constraint requirements.lock \
        aiokafka \
        grpcio \
        grpcio-health-checking \
        grpcio-reflection \
        prometheus-client \
        protobuf \
        psycopg \
        psycopg-binary \
        psycopg-pool \
        setuptools

# Generated protobuf code is committed, so installing the package needs no build step of its own.
COPY pyproject.toml ./
COPY jobstream ./jobstream
COPY services ./services
RUN pip install --no-deps --no-build-isolation . \
    && pip uninstall --yes setuptools pip \
    && find /opt/jobstream -name '__pycache__' -prune -exec rm -rf {} +

# ---- runtime: the interpreter, the virtualenv and an unprivileged user ----
FROM python:3.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="jobstream" \
      org.opencontainers.image.description="jobstream services: python -m services.gateway | services.scheduler | services.worker"

# A fixed numeric UID/GID (> 10000) so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 jobstream \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin jobstream

COPY --from=build /opt/jobstream /opt/jobstream

# No bytecode writes: the root filesystem is read-only in Kubernetes.
ENV PATH=/opt/jobstream/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    JOBSTREAM_GATEWAY_LISTEN=0.0.0.0:50051 \
    JOBSTREAM_METRICS_PORT=9100 \
    JOBSTREAM_LOG_JSON=true

USER 10001:10001
# A root-owned, read-only directory: `python -m` puts the working directory first on sys.path.
WORKDIR /opt/jobstream
EXPOSE 50051 9100

# For `docker run`; Kubernetes ignores it and uses the probes in deploy/k8s instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['JOBSTREAM_METRICS_PORT'] + '/livez', timeout=4)"]

CMD ["python", "-m", "services.gateway"]
