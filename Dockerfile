# specd: CPU image by default, the default model baked in, running as a non-root user.
#
#   docker build -t specd:0.1.0 .
#   docker run -p 8000:8000 specd:0.1.0
#
# CUDA (Triton kernels, bf16 weights): a CUDA runtime base and the CUDA build of torch:
#
#   docker build -t specd:0.1.0-cuda \
#     --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#   docker run --gpus all -p 8000:8000 specd:0.1.0-cuda
#
# The build runs `make install`, the same install the README's `make serve` and `make test` use:
# there is no second install path to drift.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# A PyTorch wheel index searched besides PyPI. Default: the CPU build (PyPI's Linux torch wheel
# pulls gigabytes of CUDA libraries a CPU image does not need).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPECD_CACHE=/opt/specd/cache

# make, a C compiler (specd builds its CPU kernels, specd_kernels/cbuild.py, for the CPU it runs on), and
# python3 + venv where the base has none (the CUDA images); then the unprivileged user.
RUN set -eux; \
    apt-get update; \
    pkgs="make ca-certificates gcc libc6-dev"; \
    if ! command -v python3 >/dev/null; then pkgs="$pkgs python3 python3-venv"; fi; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    useradd --uid 10001 --user-group --create-home --home-dir /home/specd --shell /usr/sbin/nologin specd; \
    mkdir -p /app "$SPECD_CACHE"; \
    chown specd:specd /app "$SPECD_CACHE"

USER specd
WORKDIR /app
COPY --chown=specd:specd . .

# Install exactly as the README does, then dequantize the default model once into $SPECD_CACHE
# so a container serves within seconds of starting.
RUN PIP_EXTRA_INDEX_URL="$TORCH_INDEX" make install \
 && .venv/bin/specd download-default

EXPOSE 8000
STOPSIGNAL SIGTERM
# /health: 200 when ready; 503 while loading or draining (urlopen raises, the check fails).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["/app/.venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["/app/.venv/bin/specd"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--log-format", "json"]
