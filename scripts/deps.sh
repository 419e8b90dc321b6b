#!/usr/bin/env bash
# Everything warmer's build, tests and demo need on a fresh Debian machine:
# Debian packages, CRIU >= 4.2 (built when the system has none), and the Rust
# crates (fetched by cargo). Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'deps: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "run as root: CRIU checkpoints need root, and packages are installed with apt-get"
  exit 1
fi
if ! command -v cargo >/dev/null; then
  log "cargo not found: install a Rust toolchain (rustup) first"
  exit 1
fi

# The example services run on Debian's python3 (/usr/bin/python3); curl for the
# demo; docker-registry: the real OCI registry of tests/registry.rs; Debian's
# tomcat10 and prometheus, run as their units run them by tests/sandbox.rs and
# adopted by tests/adopt.rs.
need=()
for pkg in python3 curl iptables make systemd systemd-container debootstrap docker-registry man-db tomcat10 prometheus; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# PostgreSQL 15 (Debian's) for tests/postgres.rs (the pid_file a host tool reads).
if ! dpkg -s postgresql-15 >/dev/null 2>&1; then
  log "installing postgresql-15"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null
fi

# A JDK for the JVM test (tests/jvm.rs compiles examples/jvm/Hello.java).
if ! command -v javac >/dev/null; then
  log "installing default-jdk-headless"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends default-jdk-headless >/dev/null
fi

scripts/install-criu.sh >/dev/null
cargo fetch --locked 2>/dev/null || cargo fetch
