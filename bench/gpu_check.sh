#!/usr/bin/env bash
# The GPU device check (bench/gpu.md).
#   here:  bench/gpu_check.sh build            -> .gpu/ (runtime-only bundle; SmolLM2 in pieces)
#   there: bench/gpu_check.sh run [.gpu]       -> $OUT/gpu_check.json (needs an NVIDIA GPU, torch)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  build)
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    python3 bench/gpu_bundle.py --out .gpu "${@:2}"
    du -sh .gpu/* | sort -h ;;
  run)
    bundle="${2:-.gpu}"
    site=/tmp/bitsmith-gpu-site
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$bundle"/wheels/*.whl
    export PYTHONPATH="$site:$bundle/site:$PWD" TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 bench/gpu_check.py --bundle "$bundle" --out "${OUT:-$bundle/out}" ;;
  *)
    echo "usage: bench/gpu_check.sh build [--arch sm_90a] [--no-smollm2] | run [bundle]" >&2; exit 2 ;;
esac
