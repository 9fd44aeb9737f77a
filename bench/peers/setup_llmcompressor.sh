#!/usr/bin/env bash
# The llm-compressor peer lives in its own venv: it pins transformers <= 5.17, bitsmith uses newer.
# torch comes from the system site-packages (torch==2.13.0 CPU), so nothing multi-GB is downloaded.
set -euo pipefail
VENV=${1:-${BITSMITH_PEER_VENV:-$HOME/.cache/bitsmith/peer-venv}}
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install --quiet "llmcompressor==0.14.0.1" "torch==2.13.0"
echo "$VENV"
