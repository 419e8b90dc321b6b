#!/usr/bin/env bash
# Node-RED (from npm) serving an HTTP flow: GET /hello -> "hello".
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=/opt/warmer/bench/nodered
command -v node >/dev/null || { echo "nodered: node is not installed" >&2; exit 1; }
mkdir -p "$DIR/data"
[ -x "$DIR/node_modules/.bin/node-red" ] || (cd "$DIR" && npm install --silent --no-audit --no-fund node-red@4 >/dev/null)
install -m 0644 "$HERE/nodered-flows.json" "$DIR/data/flows.json"
