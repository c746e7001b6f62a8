#!/usr/bin/env bash
# System packages the test suite needs and pip cannot provide, installed with apt-get when
# missing: Chromium for the browser tests (Playwright drives it; Playwright's own browser
# download is not used), redis-server (built with TLS, for the TLS test; without it the
# tests fall back to the Valkey server of the test extra) and the openssl CLI (test
# certificates).
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
  || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "please install: ${missing[*]} (the tests need them)" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != "0" ]; then sudo="sudo"; fi
echo "installing ${missing[*]} for the tests (apt-get)…" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
