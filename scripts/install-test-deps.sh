#!/usr/bin/env bash
# System packages the test suite needs and pip cannot provide: Chromium for the browser
# tests (Playwright drives it; its own browser download is not used). Redis needs nothing
# here: the tests use redis-server from PATH or the one the test extra installs.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install Chromium with your package manager (the browser tests need it)" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != "0" ]; then sudo="sudo"; fi
echo "installing Chromium for the browser tests (apt-get)…" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
