#!/usr/bin/env bash
# What the test suite needs besides pip: system packages installed with apt-get when
# missing, Chromium for the browser tests (Playwright drives it; Playwright's own browser
# download is not used), redis-server (built with TLS, for the TLS test; without it the
# tests fall back to the Valkey server of the test extra), the openssl CLI (test
# certificates), nginx (deploy/'s configurations run in front of replicas), kubectl
# (renders the Kubernetes manifests), promtool (checks the alert rules) and Node.js with
# npm (the stock JavaScript Yjs clients and the JupyterLab extension); then those
# clients' npm packages, from tests/js/package-lock.json, and the JupyterLab extension,
# built (the editable install that follows installs it; hatch_build.py).
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
  || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
# kubectl renders deploy/kubernetes (`kubectl kustomize`); Debian's is old (kustomize
# v2.0.3), which the kustomization is kept simple enough for.
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)

# promtool comes in Debian's prometheus package, whose install would also start a
# Prometheus server where systemd runs: only the promtool binary is taken out of it.
promtool=""
command -v promtool >/dev/null 2>&1 || promtool="promtool"

if [ ${#missing[@]} -gt 0 ] || [ -n "$promtool" ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "please install: ${missing[*]} $promtool (the tests need them)" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" != "0" ]; then sudo="sudo"; fi
  echo "installing ${missing[*]} $promtool for the tests (apt-get)…" >&2
  $sudo apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  fi
  if [ -n "$promtool" ]; then
    work="$(mktemp -d)"
    (cd "$work" && apt-get download -qq prometheus)
    dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
    $sudo install -m 0755 "$work/root/usr/bin/promtool" /usr/local/bin/promtool
    rm -rf "$work"
  fi
fi

# tests/js/.npmrc leaves out y-websocket 1.x's optional server dependencies (LevelDB).
npm ci --prefix "$(dirname "$0")/../tests/js" --no-audit --no-fund --loglevel=error
# The stock Yjs clients and the peers of the load generator (load/peers.py).
npm ci --prefix "$(dirname "$0")/../load/node" --no-audit --no-fund --loglevel=error
# The JupyterLab extension's toolchain, and the extension built into
# presence/jupyter/labextension.
npm ci --prefix "$(dirname "$0")/../labextension" --no-audit --no-fund --loglevel=error
npm run build --prefix "$(dirname "$0")/../labextension" --silent >/dev/null
