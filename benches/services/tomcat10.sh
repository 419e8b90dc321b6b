#!/usr/bin/env bash
# Debian's tomcat10 and jetty9, installed as a user would (apt-get install),
# without starting them (the manifests start them under warmer).
set -euo pipefail
need=()
for pkg in tomcat10 jetty9; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
[ ${#need[@]} -eq 0 ] && exit 0
export DEBIAN_FRONTEND=noninteractive
# No daemon starts during the install (policy-rc.d: "not allowed").
policy=/usr/sbin/policy-rc.d
created=
if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created=1; fi
trap '[ -n "$created" ] && rm -f "$policy"' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
