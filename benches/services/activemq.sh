#!/usr/bin/env bash
# Apache ActiveMQ 5.17 (Debian's package, a JVM broker) with KahaDB
# persistence and a STOMP connector. Ready = a STOMP CONNECT answered with
# CONNECTED (stomp-ready.py).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive
dpkg -s activemq >/dev/null 2>&1 || { apt-get update -qq; apt-get install -y -qq --no-install-recommends activemq >/dev/null; }
CONF=/opt/warmer/bench/activemq/conf
install -D -m 0755 "$HERE/stomp-ready.py" /opt/warmer/bench/activemq/stomp-ready.py
install -D -m 0644 "$HERE/activemq.xml" "$CONF/activemq.xml"
install -m 0644 /etc/activemq/instances-available/main/log4j2.properties "$CONF/log4j2.properties"
mkdir -p /var/lib/warmer-bench/activemq/data
