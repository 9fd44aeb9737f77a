#!/usr/bin/env bash
# lm-evaluation-harness (PyPI lm_eval) in its own venv, for bench/lmeval.py and tests/bench/test_lmeval.py. Usage:
#   bench/peers/setup_lmeval.sh [VENV_DIR]        (default $BITSMITH_LMEVAL_VENV or $HOME/.cache/bitsmith/lmeval-venv)
# Why a separate venv: lm_eval pulls datasets, evaluate, scikit-learn, sacrebleu, ... that bitsmith does not
# need. torch is pinned to the CPU build first (an unpinned torch from PyPI brings GBs of CUDA libraries);
# lm_eval[api] adds aiohttp/tenacity for local-completions; gguf + accelerate let transformers load the
# SmolLM2 GGUF (gguf_file=) as the fp32 reference. Measured with lm_eval 0.4.13, transformers 5.25, torch 2.13.
set -euo pipefail
VENV="${1:-${BITSMITH_LMEVAL_VENV:-$HOME/.cache/bitsmith/lmeval-venv}}"
LMEVAL_VERSION="${LMEVAL_VERSION:-0.4.13}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q "torch==2.13.0"  # pip's find-links here hold the +cpu wheel; installed first so lm_eval keeps it
"$VENV/bin/pip" install -q "lm_eval[api]==$LMEVAL_VERSION" "transformers==5.25.0" gguf accelerate
"$VENV/bin/lm_eval" --help > /dev/null
echo "lm_eval $LMEVAL_VERSION ready in $VENV"
