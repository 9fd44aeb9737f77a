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
#   llamacpp.env also records LLAMACPP_GGML_FLAGS (the -DGGML_* instruction-set options it was built
#   with), LLAMACPP_CPU_FLAGS (the /proc/cpuinfo flags those options require), LLAMACPP_BUILD_CPU and
#   LLAMACPP_CONVERT (the converter's path), so benches can print them and refuse a build that needs
#   flags the current host lacks.
#
# Instruction sets: GGML_NATIVE=OFF and explicit options chosen from this host's /proc/cpuinfo, AMX
# always off. Why: with GGML_NATIVE=ON (-march=native) on an Intel Xeon with AMX, ggml compiles its AMX
# mat-mul path and it died with SIGILL (`tilezero` in ggml_backend_amx_mul_mat's worker threads),
# presumably because the process was never granted the AMX tile state; and the machine behind this
# workplace changes CPU vendor over time, so a build must also be redone when the host lacks a flag it
# was built for (checked below, and by bench/hostinfo.py before a bench loads the peer).
#
# llama.cpp's converter (needed by bench/scale.py): SRC/vendor/llama.cpp/convert_hf_to_gguf.py, with
# its own gguf-py next to it (it prefers that copy unless NO_LOCAL_GGUF is set). It imports torch,
# numpy and transformers at top level (all in the system site-packages this venv sees) and yaml via
# gguf-py; and sentencepiece, which its Llama converter imports whatever the tokenizer (without it,
# converting even a tokenizer.json-only Llama dies with ModuleNotFoundError), so this script installs it
# into the venv (a ~1 MB wheel). Its requirements file pins torch/transformers/numpy versions; the
# installed ones are used as they are (converting TinyStories-656K worked with torch 2.13, transformers 5.25).
#
# Build time on the 2-vCPU AMD EPYC machine: ~7-10 min with 2 jobs at nice 10 (576 s, 2026-11-26, machine busy;
# 396 s with explicit flags, 2026-12-06).
# ggml is built with OpenMP (GGML_OPENMP, llama.cpp's default): its threads wait at barriers per
# OMP_WAIT_POLICY; the peers measure with it unset and with `passive` (see llamacpp_matvec.py).
set -euo pipefail
VENV=${1:-${BITSMITH_LLAMACPP_VENV:-$HOME/.cache/bitsmith/llamacpp-venv}}
VER=${LLAMACPP_PY_VERSION:-0.3.36}
JOBS=${JOBS:-2}
NICE=${NICE:-10}

HOST_FLAGS=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() { case "$HOST_FLAGS" in *" $1 "*) return 0;; esac; return 1; }

# The explicit ggml instruction-set options for this host. GGML_AVX512 makes ggml pass
# -mavx512{f,cd,vl,dq,bw}, so all five must be present. AMX stays off whatever the host says.
GGML_FLAGS="-DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF"
CPU_FLAGS=""
opt() {  # opt OPTION cpuinfo-flag...: ON when the host has every flag
    local f
    for f in "${@:2}"; do has "$f" || { GGML_FLAGS="$GGML_FLAGS -D$1=OFF"; return; }; done
    GGML_FLAGS="$GGML_FLAGS -D$1=ON"
    CPU_FLAGS="$CPU_FLAGS ${*:2}"
}
opt GGML_SSE42 sse4_2
opt GGML_AVX avx
opt GGML_AVX2 avx2
opt GGML_FMA fma
opt GGML_F16C f16c
opt GGML_BMI2 bmi2
opt GGML_AVX_VNNI avx_vnni
opt GGML_AVX512 avx512f avx512cd avx512vl avx512dq avx512bw
opt GGML_AVX512_VBMI avx512vbmi
opt GGML_AVX512_VNNI avx512_vnni
opt GGML_AVX512_BF16 avx512_bf16
GGML_FLAGS="$GGML_FLAGS -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
CPU_FLAGS=$(echo $CPU_FLAGS | tr ' ' '\n' | sort -u | tr '\n' ' ' | sed 's/ $//')
BUILD_CPU=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
echo "ggml options for this host ($BUILD_CPU): $GGML_FLAGS"

# An existing build is reused only if it is this version, was built with explicit options (not
# GGML_NATIVE), and every CPU flag it was built for is present on this host.
reusable() {
    [ -f "$VENV/llamacpp.env" ] || return 1
    grep -qx "LLAMACPP_VERSION=$VER" "$VENV/llamacpp.env" || return 1
    grep -q '^LLAMACPP_GGML_FLAGS=.*GGML_NATIVE=OFF' "$VENV/llamacpp.env" || return 1
    local need f
    need=$(grep '^LLAMACPP_CPU_FLAGS=' "$VENV/llamacpp.env" | cut -d= -f2-)
    for f in $need; do has "$f" || { echo "existing build needs '$f', which this host lacks: rebuilding"; return 1; }; done
    "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null
}
converter_deps() {  # small packages convert_hf_to_gguf.py needs beyond what the system site-packages have
    "$VENV/bin/python" -c "import sentencepiece" 2>/dev/null || "$VENV/bin/pip" install --quiet sentencepiece
}
if [ -z "${FORCE:-}" ] && reusable; then
    converter_deps
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

# BUILD_SHARED_LIBS=ON keeps libggml*.so as separate shared libraries (installed next to
# libllama.so), which the mat-vec peer links. Tools/examples/tests/server/mtmd are not needed by the
# peers and only cost build time.
CMAKE_ARGS="$GGML_FLAGS -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_TYPE=Release \
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
LLAMACPP_GGML_FLAGS=$GGML_FLAGS
LLAMACPP_CPU_FLAGS=$CPU_FLAGS
LLAMACPP_BUILD_CPU=$BUILD_CPU
LLAMACPP_CONVERT=$SRC/vendor/llama.cpp/convert_hf_to_gguf.py
EOF
[ -f "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ] || echo "warning: no convert_hf_to_gguf.py in the sdist" >&2
converter_deps
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
echo "$VENV"
