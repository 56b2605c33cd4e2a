# syntax=docker/dockerfile:1
# The Kiln operator images, from one file:
#   docker build --target azure -t kiln:<version>-azure .   the azure provider only: no QEMU
#   docker build -t kiln:<version> .                         the local provider too (QEMU)
# Both run as UID 65532 (the chart's securityContext), from a venv built in its own stage.
# The base is pinned by digest: the multi-platform index of python:3.11-slim-bookworm
# (3.11.16) as Docker Hub published it in September-October 2026. It was NOT resolved
# against a registry when it was written (the machines Kiln is developed on reach no
# container registry); it was cross-checked only against public projects that pin the
# same tag to the same digest. The first `docker build` with registry access verifies it
# (a pull by digest fails unless the content matches). To move it, take the new digest
# from `docker buildx imagetools inspect python:3.11-slim-bookworm` and change PYTHON_BASE.
ARG PYTHON_BASE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

FROM ${PYTHON_BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN python -m venv /opt/kiln && /opt/kiln/bin/pip install . \
    && /opt/kiln/bin/kiln operator --help >/dev/null

FROM ${PYTHON_BASE} AS azure
RUN groupadd --gid 65532 kiln \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /var/lib/kiln kiln \
    && mkdir -p /var/lib/kiln /var/cache/kiln \
    && chown kiln:kiln /var/lib/kiln /var/cache/kiln
COPY --from=build /opt/kiln /opt/kiln
ENV PATH=/opt/kiln/bin:$PATH \
    HOME=/var/lib/kiln \
    KILN_DATA=/var/lib/kiln \
    KILN_CACHE=/var/cache/kiln \
    KILN_DEFAULT_PROVIDER=azure \
    PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["kiln", "operator"]

FROM azure AS local
USER root
# Host tools die with the operator through setpriv (util-linux, already in the base image).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        qemu-system-x86 qemu-utils ovmf mmdebstrap e2fsprogs fdisk dosfstools mtools \
        openssh-client ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV KILN_DEFAULT_PROVIDER=local
USER 65532:65532
