# The Kiln operator image. The local provider needs QEMU and mmdebstrap; the azure
# provider needs neither, but one image serves both.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        qemu-system-x86 qemu-utils ovmf mmdebstrap e2fsprogs fdisk dosfstools mtools \
        openssh-client ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kiln
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip install --no-cache-dir .

ENV KILN_DATA=/var/lib/kiln KILN_CACHE=/var/cache/kiln
EXPOSE 8080
ENTRYPOINT ["kiln", "operator"]
