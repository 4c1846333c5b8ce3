#!/usr/bin/env bash
# Install a headless Chromium (Debian package) for the viewer's browser test.
# Idempotent: returns at once when a Chromium is already on PATH.
# Usage: scripts/install_browser.sh   (as root, or with sudo available)
set -euo pipefail
for exe in chromium-headless-shell chromium chromium-browser google-chrome; do
    if command -v "$exe" >/dev/null 2>&1; then
        echo "install_browser: found $(command -v "$exe")"
        exit 0
    fi
done
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_browser: not root and no sudo; install chromium-headless-shell (or chromium) yourself" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# Update the package lists only when they are missing or older than a day.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then
    $SUDO apt-get update -qq
fi
# The headless shell is the smaller package; fall back to the full browser.
$SUDO apt-get install -y -qq --no-install-recommends chromium-headless-shell \
    || $SUDO apt-get install -y -qq --no-install-recommends chromium
for exe in chromium-headless-shell chromium; do
    command -v "$exe" >/dev/null 2>&1 && { echo "install_browser: installed $(command -v "$exe")"; exit 0; }
done
echo "install_browser: no chromium after installation" >&2
exit 1
