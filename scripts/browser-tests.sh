#!/usr/bin/env bash
# End-to-end tests of the browser client and demo page in headless Chromium and Firefox.
#
#   scripts/browser-tests.sh            run tests/browser/*.test.js
#   scripts/browser-tests.sh --bench    also run the measurements (tests/browser/bench.js, then
#                                       tests/browser/netbench.js: join over UDP / ICE-TCP / TURN,
#                                       session resume after a reset or an outage; then
#                                       tests/browser/restartbench.js: ICE restart after an
#                                       address change)
#   scripts/browser-tests.sh --bench-only
#   scripts/browser-tests.sh --netbench-only   only netbench.js and restartbench.js
#
# Installs what is missing (Debian chromium and firefox-esr via apt; coturn, the TURN server of
# the TURN tests, iptables, which blocks direct UDP in some of them, and python3, which runs
# the lossy-link impairer tests/browser/impair.py, via apt;
# playwright-core, which drives Chromium, and puppeteer-core, which drives Firefox over
# WebDriver BiDi, via npm ci),
# builds the release server if needed, then runs everything inside a loopback-only network
# namespace (unshare --net; the server listens on 127.0.0.1:7880 / UDP 7882 there). Fails, never
# skips, when something cannot be had. Artifacts (screenshots, server logs): target/browser/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

die() { printf '\nbrowser-tests: FAILED: %s\n' "$*" >&2; exit 1; }
step() { printf '\n==> %s\n' "$*"; }

RUN_TESTS=1
RUN_BENCH=0
RUN_NETBENCH=0
for arg in "$@"; do
  case "$arg" in
    --bench) RUN_BENCH=1; RUN_NETBENCH=1 ;;
    --bench-only) RUN_BENCH=1; RUN_NETBENCH=1; RUN_TESTS=0 ;;
    --netbench-only) RUN_NETBENCH=1; RUN_TESTS=0 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) die "unknown argument $arg" ;;
  esac
done

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

APT_UPDATED=0
apt_install() { # package binary
  step "installing Debian $1 (apt)"
  if [ "$APT_UPDATED" = 0 ]; then
    as_root apt-get update -qq || die "apt-get update failed; cannot install $1"
    APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null \
    || die "apt-get install $1 failed"
  [ -x "$2" ] || die "$2 is still missing after installing $1"
}

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
[ -x "$CHROMIUM" ] || apt_install chromium "$CHROMIUM"
"$CHROMIUM" --version 2>/dev/null | head -n1 || die "$CHROMIUM does not run"
FIREFOX=${FIREFOX:-/usr/bin/firefox-esr}
[ -x "$FIREFOX" ] || apt_install firefox-esr "$FIREFOX"
"$FIREFOX" --version 2>/dev/null | head -n1 || die "$FIREFOX does not run"
# coturn: the TURN server tests/browser/turn.test.js relays through (not started as a service).
TURNSERVER=${TURNSERVER:-/usr/bin/turnserver}
[ -x "$TURNSERVER" ] || apt_install coturn "$TURNSERVER"
# redis-server: the cluster's control plane in tests/browser/cluster.test.js and cluster_span.test.js (started on its own port).
command -v redis-server >/dev/null || apt_install redis-server /usr/bin/redis-server
IPTABLES=$(command -v iptables || true)
[ -n "$IPTABLES" ] || { apt_install iptables /usr/sbin/iptables; IPTABLES=/usr/sbin/iptables; }
"$IPTABLES" --version >/dev/null 2>&1 || die "$IPTABLES does not run"
# The lossy-link test (lossy.test.js) impairs one UDP flow in user space: iptables NFQUEUE
# rules hand its packets to tests/browser/impair.py (python3, standard library only), which
# drops and delays them. Not tc netem: many kernels (small VM kernels among them) are
# built without the netem qdisc, and no module can be loaded into them. Checked below, inside
# the namespace: the NFQUEUE target and nfnetlink_queue must work.
command -v python3 >/dev/null || apt_install python3 /usr/bin/python3

command -v node >/dev/null || die "node is missing (apt-get install nodejs npm)"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
  || die "node >= 20 is needed (have $(node --version))"
command -v unshare >/dev/null && command -v ip >/dev/null || die "unshare and ip (util-linux, iproute2) are needed"

# npm ci when a driver, a third-party client (thirdparty.test.js: Eyevinn's WHIP client and
# WHEP player, and esbuild, which bundles them) is missing or not the version package-lock.json
# pins, or when esbuild's native binary does not run.
if ! (cd tests/browser && node -e '
  const lock = require("./package-lock.json").packages;
  for (const m of ["playwright-core", "puppeteer-core", "@eyevinn/whip-web-client", "@eyevinn/webrtc-player", "esbuild"]) {
    if (lock[`node_modules/${m}`].version !== require(`./node_modules/${m}/package.json`).version) process.exit(1);
  }
  require("esbuild").transformSync("");' 2>/dev/null); then
  step "npm ci (tests/browser)"
  (cd tests/browser && npm ci --no-audit --no-fund) || die "npm ci in tests/browser failed"
fi

if [ -z "${PLAZA_BIN:-}" ]; then
  step "cargo build --release --bin plaza"
  cargo build --release --bin plaza || die "building the server failed"
  export PLAZA_BIN="$ROOT/target/release/plaza"
fi

mkdir -p target/browser
export ARTIFACTS="$ROOT/target/browser" CHROMIUM FIREFOX TURNSERVER

# Everything below runs in a private network namespace with only loopback: the server, the
# browsers and the tests cannot reach (or be reached from) anything else.
# Root gets a plain network namespace; anyone else a user namespace mapped to root, if allowed.
if [ "$(id -u)" = 0 ]; then NETNS=(unshare --net); else NETNS=(unshare --user --map-root-user --net); fi
"${NETNS[@]}" true 2>/dev/null || die "cannot create a network namespace (${NETNS[*]}): run as root or allow unprivileged user namespaces"
step "entering a loopback-only network namespace"
"${NETNS[@]}" bash -euo pipefail -c '
  ip link set lo up
  # Firefox gathers no ICE candidates without a default route; Chromium does not mind it.
  ip route add default dev lo src 127.0.0.1
  cd tests/browser
  # The lossy-link impairment: nfnetlink_queue bindable and the NFQUEUE target accepted.
  python3 impair.py --check --queue 7199 >/dev/null \
    || { echo "browser-tests: FAILED: impair.py cannot bind an NFQUEUE queue (kernel without CONFIG_NETFILTER_NETLINK_QUEUE?)" >&2; exit 1; }
  iptables -I OUTPUT -p udp --dport 9 -j NFQUEUE --queue-num 7199 && iptables -D OUTPUT -p udp --dport 9 -j NFQUEUE --queue-num 7199 \
    || { echo "browser-tests: FAILED: iptables refuses the NFQUEUE target (kernel without CONFIG_NETFILTER_XT_TARGET_NFQUEUE?)" >&2; exit 1; }
  status=0
  if [ "$1" = 1 ]; then
    echo "==> node --test"
    node --test --test-concurrency=1 --test-reporter=spec ./*.test.js || status=$?
  fi
  if [ "$2" = 1 ]; then
    echo "==> measurements (bench.js)"
    node bench.js || status=$?
  fi
  if [ "$3" = 1 ]; then
    echo "==> real-network measurements (netbench.js)"
    node netbench.js || status=$?
    echo "==> ICE restart after an address change (restartbench.js)"
    node restartbench.js || status=$?
  fi
  exit $status
' browser-tests "$RUN_TESTS" "$RUN_BENCH" "$RUN_NETBENCH" || die "browser tests failed (server logs: target/browser/plaza*.log)"
printf '\nbrowser-tests: ok\n'
