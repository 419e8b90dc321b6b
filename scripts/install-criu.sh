#!/usr/bin/env bash
# Make sure a working CRIU >= 4.2 is installed.
#
# 1. A system `criu` that reports >= 4.2 and passes `criu check` is used as is.
# 2. Otherwise the pinned CRIU 4.2.1 is built from the Debian source package's
#    upstream tarball (sha256-verified) and installed as /usr/local/sbin/criu.
#
# The tarball comes from the Debian archive this machine is already configured
# for: a temporary deb-src entry for suite sid with the same URIs as the
# existing Debian source list (removed afterwards, so later installs never pull
# from sid), or, failing that, the pool file under that same URI.
#
# Why not Debian 12's criu: 3.17 fails on kernels with [vvar_vclock]
# ("vdso: Unexpected rt vDSO area bounds"); 4.1 cannot dump TCP sockets on
# kernels >= 6.16. See README.md.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

CRIU_VERSION=4.2.1
CRIU_DEB_VERSION=4.2.1-1
CRIU_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
PREFIX=${CRIU_PREFIX:-/usr/local}
BUILD_ROOT=${CRIU_BUILD_DIR:-/var/cache/warmer-build}
BUILD_DEPS=(build-essential pkg-config libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
  python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev uuid-dev
  libnftables-dev libaio-dev iptables xz-utils curl ca-certificates dpkg-dev)

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

for candidate in "$(command -v criu 2>/dev/null || true)" "$PREFIX/sbin/criu"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ] && version_ok "$candidate"; then
    exit 0
  fi
done

if [ "$(id -u)" -ne 0 ]; then
  log "building CRIU needs root (apt-get and install into $PREFIX)"
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log "installing build dependencies"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${BUILD_DEPS[@]}" >/dev/null

URI=$("$HERE/debian-uri.sh")

mkdir -p "$BUILD_ROOT"
cd "$BUILD_ROOT"
TARBALL=criu_${CRIU_VERSION}.orig.tar.xz

sha_ok() { [ -f "$TARBALL" ] && echo "$CRIU_SHA256  $TARBALL" | sha256sum -c --status; }

if ! sha_ok; then
  rm -f "$TARBALL"
  SRC_LIST=/etc/apt/sources.list.d/warmer-criu-sid-src.sources
  cleanup_src() { rm -f "$SRC_LIST"; }
  trap cleanup_src EXIT
  signed_by=/usr/share/keyrings/debian-archive-keyring.gpg
  {
    echo "Types: deb-src"
    echo "URIs: $URI"
    echo "Suites: sid"
    echo "Components: main"
    [ -f "$signed_by" ] && echo "Signed-By: $signed_by"
  } >"$SRC_LIST"
  log "fetching criu=$CRIU_DEB_VERSION source from suite sid"
  # Only refresh the temporary source, not every list on the machine.
  if apt-get update -qq -o Dir::Etc::sourcelist="$SRC_LIST" -o Dir::Etc::sourceparts=- \
       -o APT::Get::List-Cleanup=0 &&
     apt-get source -qq --download-only "criu=$CRIU_DEB_VERSION" >/dev/null 2>&1; then
    :
  fi
  cleanup_src
  trap - EXIT
  # apt-get source fails as a whole when the .debian.tar.xz 404s, but it may have fetched
  # the orig tarball first; if not, take it from the pool of the same archive.
  if ! sha_ok; then
    rm -f "$TARBALL"
    log "fetching $TARBALL from the archive pool"
    curl -fsSL --retry 3 -o "$TARBALL" "$URI/pool/main/c/criu/$TARBALL"
  fi
  if ! sha_ok; then
    log "sha256 mismatch for $TARBALL (want $CRIU_SHA256): refusing to build"
    exit 1
  fi
fi
log "sha256 verified: $TARBALL"

rm -rf "criu-$CRIU_VERSION"
tar xf "$TARBALL"
log "building CRIU $CRIU_VERSION (about a minute)"
make -s -C "criu-$CRIU_VERSION" -j"$(nproc)" criu >build.log 2>&1 || {
  tail -n 40 build.log >&2
  log "build failed: full log in $BUILD_ROOT/build.log"
  exit 1
}
install -D -m 0755 "criu-$CRIU_VERSION/criu/criu" "$PREFIX/sbin/criu"
version_ok "$PREFIX/sbin/criu"
