#!/bin/sh
# Stand-ins for the registry images tests/deploy/test_docker.py needs, on a machine that reaches
# Debian and PyPI but no container registry (run as root, with a Docker daemon running):
#   - specd-local/debian-python:bookworm  Debian + python3 (the Dockerfile's BASE: python:3.11-slim);
#   - specd-local/prometheus:debian        Debian's prometheus package (compose's prom/prometheus).
# The host's extra CA certificates go in too, for egress through a TLS-inspecting proxy. A local
# index serves the CPU torch wheel when download.pytorch.org is out of reach (TORCH_WHEEL=path).
# Prints the variables to export.
set -eu
ROOTFS=${ROOTFS:-/tmp/specd-rootfs}
PORT=${PORT:-8765}
command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null
[ -x "$ROOTFS/usr/bin/python3" ] || debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOTFS" >/dev/null
mkdir -p "$ROOTFS/usr/local/share/ca-certificates"
cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/" 2>/dev/null || true
chroot "$ROOTFS" update-ca-certificates >/dev/null
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb
tar -C "$ROOTFS" -c . | docker import --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' - \
    specd-local/debian-python:bookworm >/dev/null
docker build -q --network host -t specd-local/prometheus:debian - >/dev/null <<'DOCKERFILE'
FROM specd-local/debian-python:bookworm
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      prometheus ca-certificates && rm -rf /var/lib/apt/lists/* && mkdir /prometheus && chown nobody /prometheus
USER nobody
ENTRYPOINT ["/usr/bin/prometheus"]
DOCKERFILE
TORCH_INDEX=https://download.pytorch.org/whl/cpu
if [ -n "${TORCH_WHEEL:-}" ]; then
    mkdir -p /tmp/specd-torch-index/torch
    ln -sf "$TORCH_WHEEL" /tmp/specd-torch-index/torch/
    (cd /tmp/specd-torch-index && nohup python3 -m http.server "$PORT" --bind 127.0.0.1 >/dev/null 2>&1 &)
    TORCH_INDEX=http://127.0.0.1:$PORT/
fi
echo "export SPECD_DOCKER_BUILD_FLAGS='--network host --build-arg BASE=specd-local/debian-python:bookworm" \
     "--build-arg TORCH_INDEX=$TORCH_INDEX'"
echo "export SPECD_DOCKER_PROMETHEUS_IMAGE=specd-local/prometheus:debian"
