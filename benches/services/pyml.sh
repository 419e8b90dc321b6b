#!/usr/bin/env bash
# A Python HTTP service that imports numpy, scipy, pandas and scikit-learn and
# trains a model before it serves (benches/services/pyml.py), in its own venv.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=/opt/warmer/bench/pyml
export DEBIAN_FRONTEND=noninteractive
dpkg -s python3-venv >/dev/null 2>&1 || { apt-get update -qq; apt-get install -y -qq python3-venv >/dev/null; }
if [ ! -x "$DIR/venv/bin/python" ]; then
  /usr/bin/python3 -m venv "$DIR/venv"
fi
"$DIR/venv/bin/pip" install -q numpy scipy pandas scikit-learn
install -D -m 0644 "$HERE/pyml.py" "$DIR/app.py"
# Its own system user, for manifests/pyml-sandboxed.yaml.
id -u pyml >/dev/null 2>&1 || adduser --system --group --no-create-home --home /nonexistent --quiet pyml
