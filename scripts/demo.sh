#!/usr/bin/env bash
# The demo: a slow service (examples/slowweb: ~2 s of warm-up work before it
# listens), cold-started once and checkpointed by warmer, then restored from
# the cache a few times. Prints both side by side.
#
#   scripts/demo.sh [RESTORES]      (default 3)
#
# Uses a private cache and run directory under /tmp, so it never touches an
# installed warmer's state.
set -euo pipefail
cd "$(dirname "$0")/.."
RESTORES=${1:-3}

scripts/deps.sh
# The CRIU deps.sh settled on (it may not be the first on PATH: see
# scripts/install-criu.sh); an explicit WARMER_CRIU wins.
WARMER_CRIU=${WARMER_CRIU:-$(scripts/install-criu.sh)}
export WARMER_CRIU
cargo build --release --locked -q
W=$PWD/target/release/warmer

# The example service, where manifests/slowweb.yaml expects it.
install -D -m 0755 examples/slowweb/server.py /opt/warmer/examples/slowweb/server.py

DEMO=$(mktemp -d /tmp/warmer-demo.XXXXXX)
export WARMER_MANIFEST_DIR=$PWD/manifests WARMER_CACHE_DIR=$DEMO/cache WARMER_RUN_DIR=$DEMO/run
PORT=8080
if curl -s -o /dev/null "http://127.0.0.1:$PORT/"; then
  echo "demo: port $PORT is busy; stop what listens there first" >&2
  exit 1
fi

field() { "$W" status slowweb --json | python3 -c "import json,sys; v=json.load(sys.stdin)[0]; print(eval('v'+sys.argv[1]))" "$1"; }

# start_and_wait LOG: runs warmer in the background until the service is ready.
start_and_wait() {
  "$W" run slowweb >"$1" 2>&1 &
  WPID=$!
  for _ in $(seq 1 600); do
    state=$(field "['state']" 2>/dev/null || true)
    [ "$state" = ready ] && return 0
    kill -0 "$WPID" 2>/dev/null || { cat "$1"; echo "demo: warmer exited" >&2; exit 1; }
    sleep 0.1
  done
  echo "demo: not ready after 60 s" >&2; cat "$1"; exit 1
}
stop() { kill -TERM "$WPID"; wait "$WPID" 2>/dev/null || true; }

echo "== cold start (first run: no image yet)"
start_and_wait "$DEMO/cold.log"
cold_ms=$(field "['ready_ms']")
nonce=$(curl -s "http://127.0.0.1:$PORT/state" | python3 -c "import json,sys; print(json.load(sys.stdin)['nonce'])")
echo "   ready in $cold_ms ms; in-memory nonce $nonce; waiting for the checkpoint..."
for _ in $(seq 1 600); do
  [ "$(field "['image'] is not None")" = True ] && break
  sleep 0.1
done
bytes=$(field "['image']['bytes']")
stop
# Let the freshly written image reach the disk before timing restores.
sync

restores=()
for i in $(seq 1 "$RESTORES"); do
  echo "== restore $i"
  start_and_wait "$DEMO/restore-$i.log"
  ms=$(field "['ready_ms']")
  kind=$(field "['last_start']")
  got=$(curl -s "http://127.0.0.1:$PORT/state" | python3 -c "import json,sys; print(json.load(sys.stdin)['nonce'])")
  [ "$kind" = restored ] || { echo "demo: expected a restore, got $kind" >&2; cat "$DEMO/restore-$i.log"; exit 1; }
  [ "$got" = "$nonce" ] || { echo "demo: memory state lost (nonce $got, want $nonce)" >&2; exit 1; }
  echo "   ready in $ms ms, same in-memory nonce $got"
  restores+=("$ms")
  stop
done

best=$(printf '%s\n' "${restores[@]}" | sort -n | head -n1)
median=$(printf '%s\n' "${restores[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo
echo "slowweb (examples/slowweb, image $((bytes / 1000000)) MB) on $(uname -r), $(nproc) cores:"
printf '  %-28s %8s\n' "start" "ready ms"
printf '  %-28s %8s\n' "cold start" "$cold_ms"
printf '  %-28s %8s\n' "warmer restore (median)" "$median"
printf '  %-28s %8s\n' "warmer restore (best)" "$best"
python3 -c "print('  speed-up: %.1fx (cold / median restore)' % ($cold_ms / $median))"
echo "logs and CRIU logs: $DEMO"
