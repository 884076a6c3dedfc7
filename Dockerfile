# syntax=docker/dockerfile:1
# The leader-sidecar image:  docker build -t leader-sidecar:0.1.0 .
#
# Two stages on the same pinned Python base: `build` makes wheels and installs them into a
# virtualenv with compiled bytecode; the runtime stage copies only that virtualenv and runs as a
# numeric non-root user. Nothing at run time needs a shell: the entrypoint is exec-form and the
# chart's probes exec `python` directly.
#
# The base is pinned by version. Where you build, pin its digest as well
# (python:3.11.14-slim-bookworm@sha256:...): the machines this project is developed on reach no
# image registry, so no digest could be looked up and checked here.
# tests/unit/test_dockerfile.py runs the build stage's RUN steps as written, in a fresh venv.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG VENV=/opt/leader-sidecar
ARG WHEELS=/wheels

FROM ${PYTHON_IMAGE} AS build
ARG VENV
ARG WHEELS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar/ sidecar/
# Wheels of the package and of all its dependencies (all published as binary wheels).
RUN python -m pip wheel --wheel-dir "$WHEELS" .
# A virtualenv without pip, filled from those wheels only; then bytecode for all of it.
# unchecked-hash: the .pyc files are used as they are, whatever the files' times after COPY
# (importing kubernetes-asyncio's modules without bytecode costs seconds at every start).
RUN python -m venv --without-pip "$VENV" \
 && python -m pip --python "$VENV/bin/python" install --no-index --find-links "$WHEELS" \
        --no-compile leader-sidecar \
 && python -m compileall -q -j 0 --invalidation-mode unchecked-hash "$VENV/lib"

FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VENV
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="leader-sidecar" \
      org.opencontainers.image.description="Kubernetes Lease leader election for a workload's replicas, served to the app on loopback (HTTP 4040, gRPC 4041)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
# The official image ships its standard library without bytecode, and a non-root user cannot
# write it: compile it once here, as the build stage did for the virtualenv.
RUN python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
        -x '/(test|tests|idlelib|tkinter|turtledemo|ensurepip|lib2to3)/' \
        "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
COPY --from=build ${VENV} ${VENV}
ENV PATH="${VENV}/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd (65532: "nonroot").
USER 65532:65532
# HTTP and gRPC. The sidecar binds them to 127.0.0.1 (its app, in the same pod, is the only
# client); to reach them through `docker run -p`, pass --http-address/--grpc-address 0.0.0.0:...
EXPOSE 4040 4041
ENTRYPOINT ["leader-sidecar"]
CMD ["run"]
