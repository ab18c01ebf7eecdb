#!/usr/bin/env bash
# Install Debian's chromium and chromium-driver for the gallery test (tests/test_browse.py drives the page
# with selenium, which tools/setup.sh installs through the [dev] extra). Idempotent.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "chromium already installed: $(chromium --version 2>/dev/null || echo '?')"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
echo "installed: $(chromium --version 2>/dev/null || echo chromium)"
