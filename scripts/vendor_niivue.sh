#!/usr/bin/env bash
# Vendor niivue's browser script (npm @niivue/niivue, pinned in src/spinemets/report/viewer.py) into a
# static folder, for a book build that does not load the spinemets.report.viewer Sphinx extension.
# Usage: scripts/vendor_niivue.sh [STATIC_DIR]   (default build/vendor/static)
# The npm tarball is cached in $SPINEMETS_VENDOR_DIR (default build/vendor); a second run is offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" -c 'import sys; from spinemets.report.viewer import vendor_niivue; print(vendor_niivue(sys.argv[1]))' "${1:-build/vendor/static}"
