# CertAutoPilot Kubernetes distribution worker.
#
#   docker build -t certautopilot-k8s-worker:local \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE="$(git remote get-url origin)" .
#   docker run --rm certautopilot-k8s-worker:local --help
#
# No `# syntax=` line: the classic builder and BuildKit both build this file, and BuildKit
# does not have to pull a frontend image first (offline and air-gapped builds work).
#
# Stage "dependencies" installs the locked runtime dependencies (requirements.lock: exact
# versions with hashes, wheels only) into a virtualenv; stage "build" adds the project's
# wheel; the runtime stage copies that virtualenv and then the project's files onto a clean
# base, so no compiler, pip, source tree, test or build backend reaches the image that runs.
#
# PYTHON_IMAGE: the official image pinned by digest (a tag can move; a digest cannot).
# Any Debian-based image with python3.11 and its venv module works, e.g. one built without a
# registry (docs/deployment.md, "Building without Docker Hub").
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${PYTHON_IMAGE} AS dependencies
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The runtime dependencies alone: this stage changes only with the lock, so its layer is
# cached across source changes and shared by the images of every version that uses it.
# --require-hashes: every file must match the lock; --only-binary: every runtime dependency
# ships manylinux wheels, so the build needs no compiler either. The runtime never installs
# anything, so pip and setuptools leave the virtualenv; the bytecode is compiled here because
# the read-only root cannot cache it at run time.
COPY requirements.lock ./
RUN python3 -m venv /opt/certautopilot \
 && /opt/certautopilot/bin/pip install --require-hashes --no-deps --only-binary=:all: \
      -r requirements.lock \
 && /opt/certautopilot/bin/pip uninstall --yes pip setuptools \
 && /opt/certautopilot/bin/python -m compileall -q --invalidation-mode unchecked-hash \
      /opt/certautopilot/lib

FROM dependencies AS build
# The build backend of the project's wheel, locked too, in a throwaway environment whose pip
# also installs into the runtime virtualenv (`--python`).
COPY requirements-build.lock ./
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --only-binary=:all: -r requirements-build.lock
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY tasks ./tasks
COPY models ./models
# The project: its wheel, installed without dependencies since the lock brought them (`pip
# check` fails the build if the lock lacks one), its bytecode, and its files staged under
# /project for the runtime stage to copy on top of the dependencies' layer.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && pip="/opt/build/bin/pip --python /opt/certautopilot/bin/python" \
 && $pip install --no-deps --no-index /wheels/*.whl \
 && $pip check \
 && site="$(/opt/certautopilot/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
 && /opt/certautopilot/bin/python -m compileall -q --invalidation-mode unchecked-hash \
      "$site/worker" "$site/tasks" "$site/models" \
 && mkdir -p "/project$site" /project/opt/certautopilot/bin \
 && cp -a "$site/worker" "$site/tasks" "$site/models" "$site"/certautopilot_k8s-*.dist-info \
      "/project$site/" \
 && cp -a /opt/certautopilot/bin/certautopilot /project/opt/certautopilot/bin/

FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID=10001
ARG VERSION=0.1.0
# Set by the build: the commit and the URL of the repository it comes from (no remote is
# assumed here; docs/deployment.md shows the build command that fills them in).
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="certautopilot-k8s-worker" \
      org.opencontainers.image.description="CertAutoPilot Kubernetes distribution worker" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# The official image ships pip, setuptools and wheel; Debian's python3-venv ships pip as a
# wheel for ensurepip. Neither belongs where nothing is ever installed.
# A fixed numeric uid lets Kubernetes' runAsNonRoot verify the user without reading /etc/passwd.
RUN if python3 -m pip --version >/dev/null 2>&1; then \
      python3 -m pip uninstall --yes --root-user-action=ignore pip setuptools wheel; \
    fi \
 && rm -rf /usr/share/python-wheels \
 && groupadd --system --gid ${APP_UID} certautopilot \
 && useradd --system --uid ${APP_UID} --gid ${APP_UID} --no-create-home \
      --home-dir /var/lib/certautopilot --shell /usr/sbin/nologin certautopilot \
 && install -d -o ${APP_UID} -g ${APP_UID} -m 0700 /var/lib/certautopilot
COPY --from=dependencies /opt/certautopilot /opt/certautopilot
COPY --from=build /project/ /
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
