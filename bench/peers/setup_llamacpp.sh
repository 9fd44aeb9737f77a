#!/usr/bin/env bash
# llama.cpp as a benchmark peer, from the PyPI package llama-cpp-python (source-only: it bundles
# llama.cpp/ggml and builds them with cmake). Usage:
#   bench/peers/setup_llamacpp.sh [VENV_DIR]        (default $HOME/.cache/bitsmith/llamacpp-venv)
# Environment: LLAMACPP_PY_VERSION (default 0.3.36), JOBS (parallel compile jobs, default 2),
#              NICE (nice level for the build, default 10), EXTRA_CMAKE_ARGS, FORCE=1 (rebuild even if
#              this version is already installed there).
#
# What it leaves in VENV_DIR:
#   bin/python                       the venv (system site-packages visible, so numpy is shared)
#   src/llama_cpp_python-<ver>/      the unpacked sdist, kept for the ggml/llama headers
#                                    (vendor/llama.cpp/ggml/include) that bench/peers/llamacpp_matvec.c
#                                    is compiled against
#   build/                           the cmake build tree (scikit-build-core build-dir)
#   lib/python3*/site-packages/llama_cpp/lib/  libggml.so libggml-base.so libggml-cpu.so libllama.so
#   llamacpp.env                     LLAMACPP_INCLUDE / LLAMACPP_LIBDIR / LLAMACPP_VERSION for the bench
# Build time on the 2-vCPU AMD EPYC machine: ~10 min with 2 jobs at nice 10 (576 s, 2026-11-26, machine busy).
# ggml is built with OpenMP (GGML_OPENMP, llama.cpp's default): its threads wait at barriers per
# OMP_WAIT_POLICY; the peers measure with it unset and with `passive` (see llamacpp_matvec.py).
set -euo pipefail
VENV=${1:-${BITSMITH_LLAMACPP_VENV:-$HOME/.cache/bitsmith/llamacpp-venv}}
VER=${LLAMACPP_PY_VERSION:-0.3.36}
JOBS=${JOBS:-2}
NICE=${NICE:-10}

if [ -z "${FORCE:-}" ] && [ -f "$VENV/llamacpp.env" ] && grep -qx "LLAMACPP_VERSION=$VER" "$VENV/llamacpp.env" \
        && "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "llama-cpp-python $VER already in $VENV (FORCE=1 rebuilds)"
    echo "$VENV"
    exit 0
fi
python3 -m venv --system-site-packages "$VENV"
VENV=$(cd "$VENV" && pwd)
mkdir -p "$VENV/src"
if [ ! -d "$VENV/src/llama_cpp_python-$VER" ]; then
    "$VENV/bin/pip" download --quiet --no-deps --no-binary :all: -d "$VENV/src" "llama-cpp-python==$VER"
    tar -xzf "$VENV/src/llama_cpp_python-$VER.tar.gz" -C "$VENV/src"
fi
SRC="$VENV/src/llama_cpp_python-$VER"

# GGML_NATIVE=ON: -march=native (AVX-512 + VNNI here). BUILD_SHARED_LIBS=ON keeps libggml*.so
# as separate shared libraries (installed next to libllama.so), which the mat-vec peer links.
# Tools/examples/tests/server/mtmd are not needed by the peers and only cost build time.
CMAKE_ARGS="-DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_TYPE=Release \
 -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
 -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF ${EXTRA_CMAKE_ARGS:-}"
export CMAKE_ARGS
export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
export MAKEFLAGS=-j$JOBS
start=$(date +%s)
nice -n "$NICE" "$VENV/bin/pip" install --no-cache-dir \
    --config-settings=build-dir="$VENV/build" \
    --config-settings=cmake.build-type=Release \
    "$SRC"
echo "llama-cpp-python $VER built in $(( $(date +%s) - start )) s"

LIBDIR=$("$VENV/bin/python" - <<'EOF'
import os, llama_cpp
print(os.path.join(os.path.dirname(llama_cpp.__file__), "lib"))
EOF
)
ls "$LIBDIR"
for lib in libggml-base.so libggml-cpu.so libllama.so; do
    [ -e "$LIBDIR/$lib" ] || { echo "missing $LIBDIR/$lib" >&2; exit 1; }
done
cat > "$VENV/llamacpp.env" <<EOF
LLAMACPP_VERSION=$VER
LLAMACPP_SRC=$SRC
LLAMACPP_INCLUDE=$SRC/vendor/llama.cpp/ggml/include:$SRC/vendor/llama.cpp/include
LLAMACPP_LIBDIR=$LIBDIR
EOF
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
echo "$VENV"
