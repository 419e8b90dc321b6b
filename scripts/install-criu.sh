#!/usr/bin/env bash
# Make sure a working CRIU >= 4.2 is installed.
#
# 1. A system `criu` that reports >= 4.2 and passes `criu check` is kept as is.
# 2. Otherwise the pinned CRIU 4.2.1 is built into a Debian package from the
#    Debian source package's upstream tarball (sha256-verified; see
#    scripts/build-criu-deb.sh) and installed with apt as /usr/sbin/criu.
#
# Why not Debian 12's criu: 3.17 fails on kernels with [vvar_vclock]
# ("vdso: Unexpected rt vDSO area bounds"); 4.1 cannot dump TCP sockets on
# kernels >= 6.16. See README.md.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

log() { printf 'install-criu: %s\n' "$*" >&2; }

# version_ok BIN: prints the version and succeeds when BIN is CRIU >= 4.2 and `criu check` passes.
version_ok() {
  local bin=$1 v
  v=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n1)
  [ -n "$v" ] || return 1
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%.*}
  if [ "$major" -lt 4 ] || { [ "$major" -eq 4 ] && [ "$minor" -lt 2 ]; }; then
    log "$bin is CRIU $v (< 4.2): not usable"
    return 1
  fi
  if ! "$bin" check >/dev/null 2>&1; then
    log "$bin is CRIU $v but 'criu check' fails"
    return 1
  fi
  log "using $bin (CRIU $v, criu check passed)"
}

for candidate in "$(command -v criu 2>/dev/null || true)" /usr/local/sbin/criu /usr/sbin/criu; do
  if [ -n "$candidate" ] && [ -x "$candidate" ] && version_ok "$candidate"; then
    exit 0
  fi
done

if [ "$(id -u)" -ne 0 ]; then
  log "installing CRIU needs root (apt-get)"
  exit 1
fi

# Built as a Debian package (scripts/build-criu-deb.sh) and installed with apt,
# so dpkg knows /usr/sbin/criu and apt removes it.
DEBS=${CRIU_BUILD_DIR:-/var/cache/warmer-build}/debs
rm -rf "$DEBS"
"$HERE/build-criu-deb.sh" "$DEBS"
export DEBIAN_FRONTEND=noninteractive
log "installing $(basename "$DEBS"/criu_*.deb) with apt"
apt-get install -y -qq --no-install-recommends "$DEBS"/criu_*.deb >/dev/null
version_ok /usr/sbin/criu
