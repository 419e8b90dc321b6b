#!/usr/bin/env bash
# Builds the Debian packages into target/debian/:
#   warmer_<version>_<arch>.deb   from debian/ (debhelper), this tree's build
#   criu_<version>_<arch>.deb     CRIU 4.2.1 (scripts/build-criu-deb.sh)
# and checks both with lintian (any error fails). Needs root (apt-get for
# the build tools) and a Rust toolchain (rustup).
#
#   sudo apt install ./target/debian/criu_*.deb ./target/debian/warmer_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/debian

log() { printf 'package: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "run as root: build tools are installed with apt-get"
  exit 1
fi
command -v cargo >/dev/null || { log "cargo not found: install a Rust toolchain (rustup) first"; exit 1; }
need=()
for pkg in debhelper dpkg-dev lintian; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

rm -rf "$OUT"
mkdir -p "$OUT"
scripts/build-criu-deb.sh "$OUT"

log "building warmer's package (debian/)"
# debian/rules directly (as dpkg-buildpackage -b would call it): the .deb goes
# to target/debian, nothing is written outside the tree.
debian/rules clean >/dev/null
debian/rules build >"$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log" >&2; exit 1; }
debian/rules binary >>"$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log" >&2; exit 1; }
debian/rules clean >/dev/null

status=0
for deb in "$OUT"/*.deb; do
  log "lintian $(basename "$deb")"
  lintian --fail-on error "$deb" >&2 || status=1
done
[ "$status" = 0 ] || { log "lintian reported errors"; exit 1; }
ls -1 "$OUT"/*.deb
