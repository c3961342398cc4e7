#!/usr/bin/env bash
# The web UI tests drive Debian's Chromium (no browser download): install it when it is missing.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "chromium is missing: install Debian's chromium package (needs root)" >&2; exit 1; }
  SUDO=sudo
fi
echo "installing chromium for the web UI tests..." >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
