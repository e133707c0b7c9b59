# syntax=docker/dockerfile:1
# CertAutoPilot Kubernetes distribution worker.
#
#   docker build -t certautopilot-k8s-worker:local .
#   docker run --rm certautopilot-k8s-worker:local --help
#
# Stage 1 builds the project wheel and installs it with its dependencies into a virtualenv;
# stage 2 copies only that virtualenv onto a clean slim base, so no compiler, pip cache,
# source tree or build backend reaches the image that runs.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Every runtime dependency ships manylinux wheels (cryptography, psycopg[binary], ...), so the
# build stage needs no compiler either; if one ever does, install it HERE, never below.
# The runtime never installs anything, so pip and setuptools leave the virtualenv.
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY tasks ./tasks
COPY models ./models
RUN python -m pip wheel --wheel-dir /wheels . \
 && python -m venv /opt/certautopilot \
 && /opt/certautopilot/bin/pip install --no-index --find-links /wheels certautopilot-k8s \
 && /opt/certautopilot/bin/pip uninstall --yes pip setuptools \
 && find /opt/certautopilot -name '__pycache__' -type d -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID=10001
LABEL org.opencontainers.image.title="certautopilot-k8s-worker" \
      org.opencontainers.image.description="CertAutoPilot Kubernetes distribution worker"
# A fixed numeric uid lets Kubernetes' runAsNonRoot verify the user without reading /etc/passwd.
RUN groupadd --system --gid ${APP_UID} certautopilot \
 && useradd --system --uid ${APP_UID} --gid ${APP_UID} --no-create-home \
      --home-dir /var/lib/certautopilot --shell /usr/sbin/nologin certautopilot \
 && install -d -o ${APP_UID} -g ${APP_UID} -m 0700 /var/lib/certautopilot
COPY --from=build /opt/certautopilot /opt/certautopilot
ENV PATH=/opt/certautopilot/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CAP_DATA_DIR=/var/lib/certautopilot
WORKDIR /var/lib/certautopilot
USER 10001:10001
# The data dir holds the embedded default's files and the heartbeat; a volume keeps them
# writable when the root filesystem is read-only.
VOLUME ["/var/lib/certautopilot"]
# The liveness probe reads the worker's heartbeat file; the migrate and flower services
# override this check (see docker-compose.yml), they keep no heartbeat.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["certautopilot", "probe", "liveness"]
ENTRYPOINT ["certautopilot"]
CMD ["worker"]
