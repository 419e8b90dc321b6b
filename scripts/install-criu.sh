#!/usr/bin/env bash
# Make sure a working CRIU >= 4.2 is installed.
#
# 1. A system `criu` that reports >= 4.2, passes `criu check`, opens
#    /dev/userfaultfd where a sandbox's user namespace is refused the
#    userfaultfd syscall (`criu check --feature uffd-dev`) and holds a lazy
#    restore's background transfer until the tree is quiet (`--feature
#    lazy-bg-idle`): our package's patches, tools/criu-deb/debian/patches) is
#    kept as is.
# 2. Otherwise the pinned CRIU 4.2.1 is built into a Debian package from the
#    Debian source package's upstream tarball (sha256-verified; see
#    scripts/build-criu-deb.sh), with that patch, and installed with apt as
#    /usr/sbin/criu. A CRIU without the patch still works; sandboxed services
#    then restore eagerly only.
#
# Prints the CRIU to use on stdout (warmer finds it by the same order:
# $WARMER_CRIU, PATH, /usr/local/sbin, /usr/sbin).
#
# Why not Debian 12's criu: 3.17 fails on kernels with [vvar_vclock]
# ("vdso: Unexpected rt vDSO area bounds"); 4.1 cannot dump TCP sockets on
# kernels >= 6.16. See README.md.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

log() { printf 'install-criu: %s\n' "$*" >&2; }

# version_ok BIN: succeeds when BIN is CRIU >= 4.2 and `criu check` passes.
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
}

# uffd_dev BIN: BIN can give a tree restored in a user namespace a userfaultfd.
uffd_dev() { "$1" check --feature uffd-dev >/dev/null 2>&1; }
# ours BIN: BIN has both of our package's patches (uffd-dev may still fail
# where the kernel has no /dev/userfaultfd).
ours() { "$1" check --feature lazy-bg-idle >/dev/null 2>&1; }

# use BIN: the choice, on stdout.
use() {
  log "using $1 ($("$1" --version | sed -n 's/^Version: *//p' | head -n1), criu check passed$2)"
  echo "$1"
  exit 0
}

# Our package, at the version this checkout builds (an older build of ours
# has the features but perhaps not their fixes: it is rebuilt).
want=$(sed -n '1s/^criu (\([^)]*\)).*/\1/p' "$HERE/../tools/criu-deb/debian/changelog")
have=$(dpkg-query -W -f '${Version}' criu 2>/dev/null || true)
stale_ours() {
  [ "$1" = /usr/sbin/criu ] || return 1
  case $have in *~warmer*) [ "$have" != "$want" ] ;; *) return 1 ;; esac
}

usable="" seen=" "
for candidate in "$(command -v criu 2>/dev/null || true)" /usr/local/sbin/criu /usr/sbin/criu; do
  case $seen in *" $candidate "*) continue ;; esac
  seen="$seen$candidate "
  if [ -n "$candidate" ] && [ -x "$candidate" ] && version_ok "$candidate"; then
    if stale_ours "$candidate"; then
      log "$candidate is our package $have; this checkout builds $want"
      continue
    fi
    if uffd_dev "$candidate" && ours "$candidate"; then
      use "$candidate" ", uffd-dev, lazy-bg-idle"
    fi
    log "$candidate lacks the patches of tools/criu-deb ('criu check --feature uffd-dev' or '--feature lazy-bg-idle' fails)"
    usable=${usable:-$candidate}
  fi
done

# Our package, already installed: the kernel, not CRIU, lacks /dev/userfaultfd.
if [ "$have" = "$want" ] && version_ok /usr/sbin/criu; then
  use /usr/sbin/criu " (no /dev/userfaultfd on this kernel: sandboxed services restore eagerly)"
fi

if [ "$(id -u)" -ne 0 ]; then
  [ -n "$usable" ] && use "$usable" " (not root: CRIU left as it is, without the package's patches)"
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
version_ok /usr/sbin/criu || exit 1
first=$(command -v criu 2>/dev/null || true)
if [ -n "$first" ] && [ "$first" != /usr/sbin/criu ]; then
  log "note: $first comes first on PATH; warmer runs it unless WARMER_CRIU=/usr/sbin/criu"
fi
if uffd_dev /usr/sbin/criu; then
  use /usr/sbin/criu ", uffd-dev, lazy-bg-idle"
fi
use /usr/sbin/criu " (no /dev/userfaultfd on this kernel: sandboxed services restore eagerly)"
