#!/usr/bin/env bash
# The demo job, from a fresh clone and offline: set-up (scripts/bootstrap.sh), then the text-to-video
# example workflow through the real ComfyUI host on tiny models (a few minutes on a CPU at most).
# Extra arguments go to scripts/run_example.py, e.g. --workflow 10_best_of_n.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
exec .venv/bin/python scripts/run_example.py "$@"
