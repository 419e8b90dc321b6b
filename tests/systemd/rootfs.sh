#!/usr/bin/env bash
# Builds (once) a minimal Debian bookworm root filesystem that boots systemd
# in systemd-nspawn, with python3 for the example service, man-db and
# bash-completion (warmer's man pages and completions are checked there),
# and Debian's tomcat10, prometheus and postgresql-15 as their packages
# install them (adopted under their own names by the test; tomcat listens on
# 8095, the example service has 8080). warmer and CRIU are not in it: the
# test installs their packages with apt, which brings their dependencies.
# Usage: rootfs.sh DIR. A finished tree is marked DIR/.warmer-rootfs-3.
set -euo pipefail
ROOT=$1
HERE=$(cd "$(dirname "$0")" && pwd)
MARK=$ROOT/.warmer-rootfs-3
[ -e "$MARK" ] && exit 0
rm -rf "$ROOT" "$ROOT.tmp"
mkdir -p "$(dirname "$ROOT")"
URI=$("$HERE/../../scripts/debian-uri.sh")
PKGS=systemd,systemd-sysv,dbus,python3,procps,iproute2,curl,man-db,bash-completion
echo "rootfs: debootstrap bookworm into $ROOT (a minute or two)" >&2
debootstrap --variant=minbase --include="$PKGS" bookworm "$ROOT.tmp" "$URI" >"$ROOT.log" 2>&1 || {
  tail -n 30 "$ROOT.log" >&2
  exit 1
}
echo "rootfs: apt install tomcat10 prometheus postgresql-15 (a minute or two)" >&2
SYSTEMD_SECCOMP=0 systemd-nspawn -q -D "$ROOT.tmp" --register=no --keep-unit sh -c \
  'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
   tomcat10 prometheus postgresql-15' >>"$ROOT.log" 2>&1 || {
  tail -n 30 "$ROOT.log" >&2
  exit 1
}
sed -i 's/port="8080"/port="8095"/' "$ROOT.tmp/etc/tomcat10/server.xml"
mv "$ROOT.tmp" "$ROOT"
# No getty on the console, no password prompts: the container is driven with nsenter.
systemctl --root="$ROOT" mask console-getty.service getty@tty1.service systemd-logind.service >/dev/null 2>&1 || true
echo warmer-test >"$ROOT/etc/hostname"
touch "$MARK"
