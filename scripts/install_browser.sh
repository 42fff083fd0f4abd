#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium (and its driver) for tests/test_frontend.py.
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs root (or sudo).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "[install_browser] chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo present)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "[install_browser] need root or sudo to apt-get install chromium" >&2; exit 1; }
  SUDO="sudo"
fi
echo "[install_browser] apt-get update + install chromium chromium-driver"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-liberation
/usr/bin/chromium --version
