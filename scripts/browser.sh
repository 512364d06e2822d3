#!/usr/bin/env bash
# Debian's Chromium for the browser tests (Playwright drives it via executable_path; never
# `playwright install`, which downloads a browser of its own).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "browser: /usr/bin/chromium is missing; install Debian's chromium package" >&2; exit 1
fi
echo "browser: installing Debian's chromium"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
