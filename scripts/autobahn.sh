#!/usr/bin/env bash
# RFC 6455 conformance: Autobahn|Testsuite's fuzzingclient against an echo server built on
# presence's own WebSocket layer (scripts/autobahn_echo.py). Cases 1-7 and 10 (framing,
# pings, reserved bits, opcodes, fragmentation, UTF-8, closing, limits); 9 (performance)
# and 12-13 (compression, which presence does not negotiate) are left out.
# Prints the count of each outcome and fails on any FAILED, FAILED BY CLIENT, WRONG CODE
# or UNCLEAN.
#
# autobahntestsuite is Python 2.7 code: it is installed once, with the pinned set below,
# into .autobahn/py27 (ignored by git), with $PYTHON27, python2.7 from PATH or pyenv's 2.7.
# That first install builds wsaccel and ujson from source: it needs a C compiler (and
# Python 2.7's headers) besides network access to PyPI.
# The server runs with $PYTHON, else the first Python that has presence's dependencies
# of: this repository's .venv, the .venv of its main checkout (when this is a git
# worktree), the active virtualenv, python3.
# Report: .autobahn/reports/index.html
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dir=.autobahn

# A set that installs on Python 2.7 (autobahntestsuite 25.10.1 pins most of it itself).
pins="autobahntestsuite==25.10.1 autobahn==0.10.9 Twisted==19.10.0 txaio==2.1.0
zope.interface==4.6.0 pyOpenSSL==19.1.0 cryptography==3.3.2 service-identity==18.1.0
cffi==1.15.1 pycparser==2.21 pyasn1==0.5.1 pyasn1-modules==0.3.0 idna==2.10
ipaddress==1.0.23 enum34==1.1.10 attrs==21.4.0 Automat==22.10.0 constantly==15.1.0
hyperlink==21.0.0 incremental==16.10.1 PyHamcrest==1.10.1 typing==3.10.0.0 six==1.16.0
klein==17.10.0 Werkzeug==1.0.1 Jinja2==2.11.3 MarkupSafe==1.1.1 unittest2==1.1.0
traceback2==1.4.0 linecache2==1.0.0 argparse==1.4.0 setuptools==44.0.0 wsaccel==0.6.6
ujson==2.0.3"

python27() {
  local candidate
  for candidate in ${PYTHON27:-} "$(command -v python2.7 || true)" \
    "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7*/bin/python2.7; do
    # pyenv's shim is on PATH even where 2.7 is not the selected version: ask it.
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (2, 7)' \
      >/dev/null 2>&1; then
      echo "$candidate"
      return
    fi
  done
  echo "scripts/autobahn.sh: no Python 2.7 found (set PYTHON27)" >&2
  exit 1
}
py27=$(python27)

if [ "$(cat "$dir/py27/.pins" 2>/dev/null)" != "$pins" ]; then
  echo "installing autobahntestsuite into $dir/py27 with $py27…" >&2
  rm -rf "$dir/py27" "$dir/py27.tmp"
  mkdir -p "$dir"
  # shellcheck disable=SC2086  # one word a pin
  "$py27" -m pip install --disable-pip-version-check --no-warn-script-location \
    --target "$dir/py27.tmp" $pins >"$dir/install.log" 2>&1 || {
    tail -20 "$dir/install.log" >&2
    exit 1
  }
  echo "$pins" >"$dir/py27.tmp/.pins"
  mv "$dir/py27.tmp" "$dir/py27"
fi

server_python() {
  if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
    return
  fi
  local candidate main
  main=$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
  for candidate in "$root/.venv/bin/python" "${main:+$(dirname "$main")/.venv/bin/python}" \
    "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "$(command -v python3 || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] &&
      "$candidate" -c 'import uvicorn, httpx, presence' >/dev/null 2>&1; then
      echo "$candidate"
      return
    fi
  done
  echo "scripts/autobahn.sh: no Python with presence's dependencies found (set PYTHON)" >&2
  exit 1
}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python=$(server_python)
port=$("$python" -c 'from harness.processes import free_port; print(free_port())')
rm -rf "$dir/reports" # no index.json of an earlier run is read as this one's
mkdir -p "$dir/reports"
"$python" scripts/autobahn_echo.py "$port" >"$dir/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
"$python" - "$port" <<'EOF'
import sys, time, httpx
deadline = time.monotonic() + 30
while True:
    try:
        if httpx.get(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=1).status_code == 200:
            break
    except httpx.HTTPError:
        if time.monotonic() > deadline:
            sys.exit("scripts/autobahn.sh: the echo server did not start; see .autobahn/server.log")
    time.sleep(0.1)
EOF

cat >"$dir/fuzzingclient.json" <<EOF
{
  "outdir": "$root/$dir/reports",
  "servers": [{"agent": "presence", "url": "ws://127.0.0.1:$port/echo/autobahn"}],
  "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*"],
  "exclude-cases": ["9.*", "12.*", "13.*"],
  "exclude-agent-cases": {}
}
EOF
started=$(date +%s)
# Without `site`, the zope namespace package's .pth file in the --target folder is not read.
(cd "$dir" && PYTHONPATH= "$py27" -c "import site, sys; site.addsitedir('py27'); \
sys.argv[0] = 'wstest'; from autobahntestsuite.wstest import run; run()" \
  --mode fuzzingclient --spec fuzzingclient.json >wstest.log 2>&1) || {
  tail -20 "$dir/wstest.log" >&2
  exit 1
}
seconds=$(($(date +%s) - started))

"$python" - "$dir/reports/index.json" "$seconds" <<'EOF'
import collections, json, sys
results = json.load(open(sys.argv[1]))["presence"]
bad = {"FAILED", "FAILED BY CLIENT", "WRONG CODE", "UNCLEAN"}
counts = collections.Counter(r["behavior"] for r in results.values())
failures = []
for case, r in sorted(results.items(), key=lambda c: [int(p) for p in c[0].split(".")]):
    if r["behavior"] != "OK" or r["behaviorClose"] != "OK":
        print(f"  {case}: {r['behavior']} (close: {r['behaviorClose']})")
    if r["behavior"] in bad or r["behaviorClose"] in bad:
        failures.append(case)
summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.most_common())
print(f"autobahn: {len(results)} cases in {sys.argv[2]}s: {summary}")
if failures or not results:
    sys.exit(f"autobahn: failed: {', '.join(failures) or 'no case ran'}")
EOF
