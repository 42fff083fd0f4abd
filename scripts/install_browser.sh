#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium (and its driver) for tests/test_frontend.py.
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs root (or sudo).
set -euo pipefail
for candidate in "${CHROMIUM:-}" /usr/bin/chromium chromium chromium-browser; do
  if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1; then
    echo "[install_browser] chromium already installed: $("$candidate" --version 2>/dev/null || echo "$candidate")"
    exit 0
  fi
done
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  # Never prompt: CI has no terminal. Without root or password-less sudo, say what to install.
  if ! sudo -n true 2>/dev/null; then
    echo "[install_browser] need root or password-less sudo to 'apt-get install chromium chromium-driver';" \
         "install a Chromium yourself and point CHROMIUM at it" >&2
    exit 1
  fi
  SUDO="sudo -n"
fi
echo "[install_browser] apt-get update + install chromium chromium-driver"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-liberation
/usr/bin/chromium --version
