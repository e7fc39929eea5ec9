#!/usr/bin/env bash
# Runs every Plaza test: formatting, lints, unit tests, integration tests with real
# webrtc-rs peers over loopback, browser end-to-end tests in headless Chromium and Firefox
# (Debian chromium/firefox-esr and the npm drivers installed when missing), and the foreign-client tests (werift, aiortc, GStreamer
# webrtcbin; installed when missing). Fails loudly when something it needs cannot be had; never
# skips silently.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --release -- -D warnings

# What the tests run: the server, the unit and integration tests, and the load tester (the
# browser and foreign-client tests start it). The other examples and the criterion benchmarks
# are compiled by clippy above (`--all-targets`), not built again here.
step "build (release): server, tests, load tester"
cargo build --release --workspace --bins --tests --example loadtest

step "unit + integration tests"
# tests/integration/prometheus.rs reads the monitoring YAML under docker/ with PyYAML.
if ! python3 -c 'import yaml' 2>/dev/null; then
  apt-get install -y python3-yaml || { echo "python3-yaml is needed (tests/integration/prometheus.rs) and could not be installed" >&2; exit 1; }
fi
# tests/integration/cluster.rs starts real redis-server processes (testkit/src/redis.rs).
if ! command -v redis-server >/dev/null 2>&1; then
  { apt-get update -qq && apt-get install -y redis-server; } || { echo "redis-server is needed (tests/integration/cluster.rs) and could not be installed" >&2; exit 1; }
fi
# nextest runs each test in its own process; the `cargo test` fallback runs all the
# integration tests (one binary, tests/integration/) in one process, two at a time.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --release --workspace --lib --bins --tests --no-fail-fast --test-threads 2
else
  cargo test --release --workspace --lib --bins --tests --no-fail-fast -- --test-threads 2
fi

step "browser end-to-end tests (headless Chromium and Firefox, loopback-only network namespace)"
PLAZA_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/plaza" ./scripts/browser-tests.sh

step "foreign clients: werift, aiortc, GStreamer webrtcbin, webrtc-rs (network namespace)"
PLAZA_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/plaza" ./scripts/foreign-tests.sh
