#!/usr/bin/env bash
# The test suite: installs what it needs, then format, lint, unit and
# integration tests (real CRIU, real processes; needs root), and compiles the
# benches. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
# The CRIU deps.sh settled on (it may not be the first on PATH: see
# scripts/install-criu.sh); an explicit WARMER_CRIU wins.
WARMER_CRIU=${WARMER_CRIU:-$(scripts/install-criu.sh)}
export WARMER_CRIU

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked --features warmer/failpoints -- -D warnings
echo "== cargo doc -D warnings (intra-doc links resolve)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked -q
echo "== cargo bench --no-run"
cargo bench --workspace --no-run --locked
echo "== cargo build (warmer and warmer-init side by side, as installed)"
cargo build --workspace --locked
echo "== cargo test"
cargo test --workspace --locked --features warmer/failpoints
echo "== systemd: reboot cycle in a systemd-nspawn container"
tests/systemd/reboot-cycle.sh
