#!/bin/sh
# Build llama.cpp's `llama-server` (CPU only) for benchmarks/peers.py and install it as
# $VENV/bin/llama-server. The sources are the llama.cpp vendored in the llama-cpp-python sdist of the
# pinned version below (the same llama.cpp the in-process peer runs), downloaded with pip and checked
# against its sha256. Idempotent: does nothing when that version is already installed (FORCE=1
# rebuilds); an interrupted build resumes in $BUILD_DIR.
#
#   make llama-server            # or: sh benchmarks/build_llama_server.sh
#   JOBS=2 make llama-server     # parallel compile jobs (default 1: the build runs niced, ~25 min)
set -eu

VERSION=0.3.36  # the `peers` extra in pyproject.toml pins the same
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
case $VENV in /*) ;; *) VENV=$ROOT/$VENV ;; esac
BUILD_DIR=${BUILD_DIR:-$ROOT/build/llama-server}
JOBS=${JOBS:-1}
DEST=$VENV/bin/llama-server
STAMP=$VENV/.llama-server-$VERSION

if [ -x "$DEST" ] && [ -f "$STAMP" ] && [ "${FORCE:-0}" != 1 ]; then
    echo "llama-server (llama.cpp from llama-cpp-python $VERSION) already built: $DEST"
    exit 0
fi

if [ -x "$VENV/bin/python" ]; then PY=$VENV/bin/python; else PY=python3; fi
mkdir -p "$BUILD_DIR" "$VENV/bin"
SDIST=$BUILD_DIR/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$SDIST" ]; then
    echo "downloading the llama-cpp-python $VERSION sdist (pip prepares its metadata: ~2 min)"
    "$PY" -m pip download -q "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d "$BUILD_DIR"
fi
echo "$SHA256  $SDIST" | sha256sum -c --quiet -
SRC=$BUILD_DIR/llama_cpp_python-$VERSION/vendor/llama.cpp
[ -f "$SRC/CMakeLists.txt" ] || tar xzf "$SDIST" -C "$BUILD_DIR" "llama_cpp_python-$VERSION/vendor/llama.cpp"

# cmake and ninja from the system, else from PyPI into the venv
if ! command -v cmake >/dev/null && [ ! -x "$VENV/bin/cmake" ]; then "$PY" -m pip install -q cmake; fi
CMAKE=$(command -v cmake || echo "$VENV/bin/cmake")
if ! command -v ninja >/dev/null && [ ! -x "$VENV/bin/ninja" ]; then "$PY" -m pip install -q ninja; fi
NINJA=$(command -v ninja || echo "$VENV/bin/ninja")

# Static libraries: one self-contained binary. No web UI (the prebuilt one is a download from the
# Hugging Face hub at build time), no model downloads (this llama.cpp ignores LLAMA_CURL, kept OFF for
# older ones, and fetches over cpp-httplib + OpenSSL: OFF; the model is a local file), no tests.
"$CMAKE" -S "$SRC" -B "$BUILD_DIR/cmake" -G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_APP=OFF
echo "building llama-server with $JOBS job(s), niced"
nice -n 19 "$CMAKE" --build "$BUILD_DIR/cmake" --target llama-server -j "$JOBS"
install -m 755 "$BUILD_DIR/cmake/bin/llama-server" "$DEST"
rm -f "$VENV"/.llama-server-*
touch "$STAMP"
echo "installed $DEST ($("$DEST" --version 2>&1 | grep -m1 version))"
