#!/usr/bin/env bash
# The test suite, from a fresh clone: set-up (venv, real ComfyUI host, browser) then pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
bash scripts/install_browser.sh
mkdir -p test-artifacts
exec .venv/bin/python -m pytest tests -q --durations=15 "$@"
