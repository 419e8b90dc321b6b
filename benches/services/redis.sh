#!/usr/bin/env bash
# Redis (Debian's redis-server) with a large dataset it loads at every start:
# 12M keys, an RDB of about 0.5 GB in /var/lib/warmer-bench/redis. Ready is
# PING -> PONG (Redis answers LOADING until the dataset is in memory).
set -euo pipefail
KEYS=${REDIS_KEYS:-12000000}
DIR=/var/lib/warmer-bench/redis
export DEBIAN_FRONTEND=noninteractive
command -v redis-server >/dev/null || { apt-get update -qq; apt-get install -y -qq redis-server >/dev/null; }
# Debian starts its own instance on 6379 when a service manager runs; ours uses 6390.
mkdir -p "$DIR"
if [ ! -s "$DIR/dump.rdb" ] || [ "$(cat "$DIR/.keys" 2>/dev/null)" != "$KEYS" ]; then
  echo "redis: generating $KEYS keys in $DIR/dump.rdb" >&2
  redis-server --port 6391 --dir "$DIR" --dbfilename dump.rdb --save "" --daemonize yes --enable-debug-command local \
    --pidfile "$DIR/gen.pid" --logfile "$DIR/gen.log"
  for _ in $(seq 1 50); do redis-cli -p 6391 ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p 6391 debug populate "$KEYS" key 16 >/dev/null
  got=$(redis-cli -p 6391 dbsize)
  redis-cli -p 6391 save >/dev/null
  redis-cli -p 6391 shutdown nosave >/dev/null 2>&1 || true
  if [ "$got" != "$KEYS" ]; then
    echo "redis: expected $KEYS keys, got $got (see $DIR/gen.log)" >&2
    exit 1
  fi
  echo "$KEYS" >"$DIR/.keys"
fi
ls -la "$DIR/dump.rdb" >&2
