#!/usr/bin/env bash
# Installs and prepares the real third-party services (Redis with a 12M-key
# dataset, a Python numpy/scipy/pandas/scikit-learn service, Node-RED, ActiveMQ), then
# runs `warmer bench` on each and on the shipped slowweb example, with the page
# cache warm and dropped. Results (Markdown, SVG, JSON) go to bench-out/.
#
#   scripts/bench-real.sh [RUNS]        (default 5; Redis uses 3)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
OUT=${OUT:-$PWD/bench-out}
scripts/deps.sh
# The CRIU deps.sh settled on (it may not be the first on PATH: see
# scripts/install-criu.sh); an explicit WARMER_CRIU wins.
WARMER_CRIU=${WARMER_CRIU:-$(scripts/install-criu.sh)}
export WARMER_CRIU
cargo build --release --locked -q
for s in redis pyml nodered activemq tomcat10; do benches/services/$s.sh; done
install -D -m 0755 examples/slowweb/server.py /opt/warmer/examples/slowweb/server.py
export WARMER_MANIFEST_DIR=$PWD/manifests WARMER_CACHE_DIR=${WARMER_CACHE_DIR:-/var/cache/warmer-bench}
export WARMER_RUN_DIR=${WARMER_RUN_DIR:-/run/warmer-bench}
W=target/release/warmer
mkdir -p "$OUT/warm" "$OUT/dropped"
for svc in slowweb pyml nodered activemq tomcat10 jetty9 redis redis-lazy; do
  n=$RUNS
  case $svc in redis*) n=$(( RUNS < 3 ? RUNS : 3 )) ;; esac
  "$W" bench "$svc" --runs "$n" --out "$OUT/warm" >/dev/null
  "$W" bench "$svc" --runs "$n" --drop-caches --out "$OUT/dropped" >/dev/null
done
cat "$OUT"/warm/*.md "$OUT"/dropped/*.md
