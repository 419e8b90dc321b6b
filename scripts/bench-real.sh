#!/usr/bin/env bash
# Installs and prepares the real third-party services (Redis with a 12M-key
# dataset, a Python numpy/scipy/pandas/scikit-learn service, Node-RED, ActiveMQ), then
# runs `warmer bench` on each and on the shipped slowweb example, with the page
# cache warm and dropped. Results (Markdown, SVG, JSON) go to bench-out/.
#
#   scripts/bench-real.sh [RUNS]        (default 5: the JVMs 9, Redis 3; 3/5 of
#                                        that with the page cache dropped)
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
# Its own system user, for manifests/slowweb-sandboxed.yaml.
id -u slowweb >/dev/null 2>&1 || adduser --system --group --no-create-home --home /nonexistent --quiet slowweb
export WARMER_MANIFEST_DIR=$PWD/manifests WARMER_CACHE_DIR=${WARMER_CACHE_DIR:-/var/cache/warmer-bench}
export WARMER_RUN_DIR=${WARMER_RUN_DIR:-/run/warmer-bench}
W=$PWD/target/release/warmer
# jetty9 as its unit runs it: its manifest made by `warmer adopt`.
ADOPTED=$(mktemp -d /tmp/warmer-adopted.XXXXXX)
trap 'rm -rf "$ADOPTED"' EXIT
"$W" adopt jetty9 --manifest-dir "$ADOPTED" --ready http://127.0.0.1:8080/ >/dev/null
# bench DIR SVC ARGS...: `warmer bench` with /run a tmpfs, as under systemd
# (CRIU then keeps its kernel facts in /run/criu.kdat), where it is not one.
bench() {
  local dir=$1; shift
  if [ "$(findmnt -n -o FSTYPE /run 2>/dev/null)" = tmpfs ]; then
    WARMER_MANIFEST_DIR=$dir "$W" bench "$@" >/dev/null
  else
    WARMER_MANIFEST_DIR=$dir unshare -m --propagation private sh -c \
      'mount -t tmpfs tmpfs /run && mkdir -p "$WARMER_RUN_DIR" && exec "$0" bench "$@" >/dev/null' "$W" "$@"
  fi
}
mkdir -p "$OUT/warm" "$OUT/dropped" "$OUT/warm/adopted" "$OUT/dropped/adopted"
for svc in slowweb slowweb-sandboxed pyml pyml-sandboxed nodered activemq tomcat10 jetty9 adopted:jetty9 redis redis-lazy; do
  n=$RUNS dir=$WARMER_MANIFEST_DIR sub=
  case $svc in
    redis*) n=$(( RUNS < 3 ? RUNS : 3 )) ;;
    jetty9 | tomcat10) n=$(( RUNS * 9 / 5 )) ;;
    adopted:*) svc=${svc#adopted:} dir=$ADOPTED sub=/adopted n=$(( RUNS * 9 / 5 )) ;;
  esac
  d=$(( n * 3 / 5 > 0 ? n * 3 / 5 : 1 ))
  case $svc in redis*) d=$n ;; esac
  bench "$dir" "$svc" --runs "$n" --breakdown --out "$OUT/warm$sub"
  bench "$dir" "$svc" --runs "$d" --breakdown --drop-caches --out "$OUT/dropped$sub"
done
cat "$OUT"/warm/*.md "$OUT"/warm/adopted/*.md "$OUT"/dropped/*.md "$OUT"/dropped/adopted/*.md
