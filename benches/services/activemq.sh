#!/usr/bin/env bash
# Apache ActiveMQ (Debian's package, a JVM broker). Ready = a STOMP CONNECT
# answered with CONNECTED (benches/services/stomp-ready.py).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive
dpkg -s activemq >/dev/null 2>&1 || { apt-get update -qq; apt-get install -y -qq --no-install-recommends activemq >/dev/null; }
install -D -m 0755 "$HERE/stomp-ready.py" /opt/warmer/bench/activemq/stomp-ready.py
mkdir -p /var/lib/warmer-bench/activemq
