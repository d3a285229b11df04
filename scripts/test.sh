#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, every test of every crate.
# Installs what the tests need on a fresh Debian machine (when run as root), so one command works
# from a new clone.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "cargo is missing: install Rust (rustup) first" >&2; exit 1; }
# Debian packages the tests use (real servers and tools, never mocks). Add to this list.
# python3: the test bed's delay emulator; procps: kill, which the test bed uses to stop processes.
test_packages=(iproute2 iptables ethtool iputils-ping iperf3 python3 procps)
need=()
for pkg in "${test_packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [[ ${#need[@]} -gt 0 ]]; then
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "the tests need these Debian packages: ${need[*]} (run as root or install them)" >&2; exit 1
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== sans-I/O cores depend on no I/O crate"
for core in steelyard-proto steelyard-select; do
  if io=$(cargo tree --locked -p "$core" -e normal --prefix none | grep -E '^(tokio|mio|socket2|hyper|async-std|smol|reqwest|axum)[ @]'); then
    echo "$core must stay sans-I/O but depends on: $io" >&2; exit 1
  fi
done
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --all-targets --locked
# Doc tests (not covered by --all-targets).
cargo test --workspace --doc --locked
