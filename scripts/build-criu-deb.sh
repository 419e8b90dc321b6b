#!/usr/bin/env bash
# Builds CRIU 4.2.1 as a Debian package (tools/criu-deb/debian) and copies
# criu_<version>_<arch>.deb into OUTDIR. Usage: build-criu-deb.sh OUTDIR
#
# The source is Debian's own upstream tarball criu_4.2.1.orig.tar.xz
# (sha256-verified), from the Debian archive this machine is already
# configured for: a temporary deb-src entry for suite sid with the same URIs
# as the machine's Debian source list (removed afterwards, so later installs
# never pull from sid), or, failing that, the pool file under that same URI.
# Debian's criu_4.2.1-1.debian.tar.xz is not served by the archive, so the
# packaging is ours: the criu binary only.
#
# A package built from the same tarball and the same packaging is reused
# from the build cache (BUILD_ROOT/criu-deb/KEY/).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUTDIR=${1:?usage: build-criu-deb.sh OUTDIR}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

CRIU_VERSION=4.2.1
CRIU_DEB_VERSION=4.2.1-1
CRIU_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
BUILD_ROOT=${CRIU_BUILD_DIR:-/var/cache/warmer-build}
PACKAGING=$HERE/../tools/criu-deb/debian
BUILD_DEPS=(build-essential debhelper dpkg-dev pkg-config libprotobuf-dev libprotobuf-c-dev
  protobuf-c-compiler protobuf-compiler python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev
  libgnutls28-dev uuid-dev libnftables-dev libaio-dev iptables xz-utils curl ca-certificates)

log() { printf 'build-criu-deb: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "needs root (apt-get for the build dependencies)"
  exit 1
fi

# The cache key: the verified tarball and every byte of our packaging.
KEY=$( { echo "$CRIU_SHA256"; cd "$PACKAGING" && find . -type f -print0 | sort -z | xargs -0 sha256sum; } |
  sha256sum | cut -c1-16)
CACHED=$BUILD_ROOT/criu-deb/$KEY
if compgen -G "$CACHED/criu_*.deb" >/dev/null; then
  cp "$CACHED"/criu_*.deb "$OUTDIR/"
  log "reused $(basename "$CACHED"/criu_*.deb) (same tarball and packaging)"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${BUILD_DEPS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing build dependencies: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

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

WORK=$BUILD_ROOT/criu-deb/build
rm -rf "$WORK"
mkdir -p "$WORK"
cp "$TARBALL" "$WORK/"
tar -C "$WORK" -xf "$TARBALL"
cp -r "$PACKAGING" "$WORK/criu-$CRIU_VERSION/debian"
log "building the criu package (about a minute)"
(cd "$WORK/criu-$CRIU_VERSION" && dpkg-buildpackage -b -uc -us) >"$WORK/build.log" 2>&1 || {
  tail -n 40 "$WORK/build.log" >&2
  log "build failed: full log in $WORK/build.log"
  exit 1
}
mkdir -p "$CACHED"
cp "$WORK"/criu_*.deb "$CACHED/"
cp "$CACHED"/criu_*.deb "$OUTDIR/"
log "built $(basename "$CACHED"/criu_*.deb)"
