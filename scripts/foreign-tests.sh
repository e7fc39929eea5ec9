#!/usr/bin/env bash
# Plaza against WebRTC clients it did not write: werift (npm), aiortc (PyPI) and GStreamer's
# webrtcbin (Debian, ICE by libnice), each publishing to and subscribing from the others, a
# webrtc-rs peer (the load tester), headless Chromium (the demo page, and the /watch player
# page as a WHEP viewer) and Debian's simple-whip-client as a WHIP publisher.
# tests/foreign/run.py lists the combinations and what each checks.
#
#   scripts/foreign-tests.sh                 every combination
#   scripts/foreign-tests.sh --only werift   the combinations whose label contains "werift"
#   scripts/foreign-tests.sh --list
#
# Installs what is missing: GStreamer, Chromium and simple-whip-client (apt), werift and playwright-core (npm ci in
# tests/foreign, pinned by its package-lock.json), aiortc (pip, pinned by tests/foreign/requirements.txt, into the venv
# target/foreign-venv, made from /usr/bin/python3 with its system packages so that the same
# interpreter also has Debian's `gi` for GStreamer). Builds the release server and load tester
# when PLAZA_BIN is not set, and the libgupnp-igd stand-in whip-client needs into target/upnp-stub
# (tests/foreign/upnp-stub.c says why). Fails, never skips, when something cannot be had.
#
# Network: everything runs in a private network namespace (unshare --net). libnice, and so
# webrtcbin, gathers no candidates on loopback interfaces, and werift none on interfaces named
# veth*; a namespace with only `lo` gives them nothing to connect from. So the namespace gets a
# veth pair pz0/pz1 with 127.0.0.2/8 on pz0, and the server binds its media port to 127.0.0.2
# and announces it (--udp-bind 127.0.0.2 --announce-ip 127.0.0.2). Every client then gathers
# 127.0.0.2 as a host candidate and reaches the server there (the kernel delivers it locally);
# the signaling stays on 127.0.0.1. Nothing leaves the namespace.
#
# Artifacts (server log, one log per client): target/foreign/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

die() { printf '\nforeign-tests: FAILED: %s\n' "$*" >&2; exit 1; }
step() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
  esac
done

command -v unshare >/dev/null && command -v ip >/dev/null || die "unshare and ip (util-linux, iproute2) are needed"
command -v node >/dev/null || die "node is missing (apt-get install nodejs npm)"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
  || die "node >= 20 is needed (have $(node --version))"
SYS_PY=/usr/bin/python3
[ -x "$SYS_PY" ] || die "$SYS_PY is missing (Debian's python3: GStreamer's Python bindings are built for it)"

# --- GStreamer (Debian packages) ---
GST_PKGS=(gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-nice
  gstreamer1.0-libav gstreamer1.0-tools python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0
  gir1.2-gst-plugins-bad-1.0 python3-venv)
gst_ok() {
  "$SYS_PY" - <<'EOF' 2>/dev/null
import gi
gi.require_version("Gst", "1.0"); gi.require_version("GstWebRTC", "1.0"); gi.require_version("GstSdp", "1.0")
from gi.repository import Gst, GstWebRTC, GstSdp
Gst.init(None)
need = ["webrtcbin", "nicesrc", "nicesink", "dtlssrtpenc", "sctpenc", "vp8enc", "vp8dec", "opusenc", "opusdec",
        "rtpvp8pay", "rtpopuspay", "videotestsrc", "audiotestsrc", "decodebin", "fakesink"]
missing = [e for e in need if Gst.ElementFactory.find(e) is None]
raise SystemExit(1 if missing else 0)
EOF
}
if ! gst_ok || ! "$SYS_PY" -c 'import ensurepip' 2>/dev/null; then
  step "installing GStreamer and libnice (apt): ${GST_PKGS[*]}"
  t=$(date +%s)
  as_root apt-get update -qq || die "apt-get update failed; cannot install GStreamer"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${GST_PKGS[@]}" >/dev/null \
    || die "apt-get install ${GST_PKGS[*]} failed"
  echo "apt install took $(( $(date +%s) - t )) s"
  gst_ok || die "GStreamer elements are still missing after the install (webrtcbin, nicesrc, vp8enc, opusenc, ...)"
fi

# --- Chromium (apt) ---
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  step "installing Debian chromium (apt)"
  as_root apt-get update -qq || die "apt-get update failed; cannot install chromium"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    || die "apt-get install chromium failed"
  [ -x "$CHROMIUM" ] || die "$CHROMIUM is still missing after installing chromium"
fi
export CHROMIUM

# --- simple-whip-client (apt) and the libgupnp-igd stand-in it needs ---
WHIP_CLIENT=${WHIP_CLIENT:-/usr/bin/whip-client}
if [ ! -x "$WHIP_CLIENT" ]; then
  step "installing Debian simple-whip-client (apt)"
  as_root apt-get update -qq || die "apt-get update failed; cannot install simple-whip-client"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq simple-whip-client >/dev/null \
    || die "apt-get install simple-whip-client failed"
  [ -x "$WHIP_CLIENT" ] || die "$WHIP_CLIENT is still missing after installing simple-whip-client"
fi
# whip-client links libsoup 2.4, libnice's libgupnp-igd pulls in libsoup 3: together they abort
# at start. The stand-in (same soname, no dependencies) is found first via LD_LIBRARY_PATH.
UPNP_STUB_DIR="$TARGET/upnp-stub"
if [ ! -f "$UPNP_STUB_DIR/libgupnp-igd-1.0.so.4" ] || [ tests/foreign/upnp-stub.c -nt "$UPNP_STUB_DIR/libgupnp-igd-1.0.so.4" ]; then
  command -v cc >/dev/null || die "cc is missing (apt-get install gcc): needed for tests/foreign/upnp-stub.c"
  mkdir -p "$UPNP_STUB_DIR"
  cc -shared -fPIC -Wl,-soname,libgupnp-igd-1.0.so.4 -o "$UPNP_STUB_DIR/libgupnp-igd-1.0.so.4" tests/foreign/upnp-stub.c \
    || die "building tests/foreign/upnp-stub.c failed"
fi
# libnice is loaded with GStreamer's nice plugin, not linked by whip-client: check it.
# (whole outputs captured first: with pipefail, a reader that stops early fails the pipeline)
LIBS=$(ldconfig -p) || die "ldconfig -p failed"
LIBNICE=$(awk '$1 == "libnice.so.10" && !found { print $NF; found = 1 }' <<<"$LIBS")
[ -n "$LIBNICE" ] || die "libnice.so.10 is not installed (gstreamer1.0-nice)"
NICE_DEPS=$(LD_LIBRARY_PATH="$UPNP_STUB_DIR" ldd "$LIBNICE") || die "ldd $LIBNICE failed"
[[ $NICE_DEPS == *"libgupnp-igd-1.0.so.4 => $UPNP_STUB_DIR/"* ]] \
  || die "$LIBNICE does not take the libgupnp-igd stand-in from $UPNP_STUB_DIR"
[[ $NICE_DEPS != *libsoup-3* ]] \
  || die "$LIBNICE still loads libsoup 3 with the libgupnp-igd stand-in: whip-client would abort at start"
export WHIP_CLIENT UPNP_STUB_DIR

# --- werift, playwright-core (npm, pinned by the lockfile) ---
if ! (cd tests/foreign && node -e '
  const lock = require("./package-lock.json").packages;
  for (const name of ["werift", "ws", "playwright-core"]) {
    const have = require(`./node_modules/${name}/package.json`).version;
    if (have !== lock[`node_modules/${name}`].version) process.exit(1);
  }' 2>/dev/null); then
  step "npm ci (tests/foreign)"
  t=$(date +%s)
  (cd tests/foreign && npm ci --no-audit --no-fund) || die "npm ci in tests/foreign failed"
  echo "npm ci took $(( $(date +%s) - t )) s"
fi

# --- aiortc (PyPI, pinned) in a venv that also sees Debian's gi ---
VENV="$TARGET/foreign-venv"
STAMP="$VENV/.requirements"
if ! cmp -s tests/foreign/requirements.txt "$STAMP" 2>/dev/null || ! "$VENV/bin/python" -c 'import aiortc, websockets, gi' 2>/dev/null; then
  step "pip install -r tests/foreign/requirements.txt (venv $VENV)"
  t=$(date +%s)
  rm -rf "$VENV"
  "$SYS_PY" -m venv --system-site-packages "$VENV" || die "cannot create the venv $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r tests/foreign/requirements.txt \
    || die "pip install -r tests/foreign/requirements.txt failed"
  "$VENV/bin/python" -c 'import aiortc, websockets, gi' || die "the venv cannot import aiortc, websockets and gi"
  cp tests/foreign/requirements.txt "$STAMP"
  echo "venv + pip install took $(( $(date +%s) - t )) s"
fi

# --- the server and the webrtc-rs load tester ---
if [ -z "${PLAZA_BIN:-}" ]; then
  step "cargo build --release --bin plaza --example loadtest"
  cargo build --release --bin plaza --example loadtest || die "building the server failed"
  export PLAZA_BIN="$TARGET/release/plaza"
fi
export LOADTEST_BIN="${LOADTEST_BIN:-$(dirname "$PLAZA_BIN")/examples/loadtest}"
[ -x "$LOADTEST_BIN" ] || die "$LOADTEST_BIN is missing (cargo build --release --example loadtest)"
export FOREIGN_PYTHON="$VENV/bin/python" CARGO_TARGET_DIR="$TARGET"

if [ "$(id -u)" = 0 ]; then NETNS=(unshare --net); else NETNS=(unshare --user --map-root-user --net); fi
"${NETNS[@]}" true 2>/dev/null || die "cannot create a network namespace (${NETNS[*]}): run as root or allow unprivileged user namespaces"
step "foreign clients (private network namespace: lo + veth pz0 127.0.0.2)"
# Hard bound on the whole run, beyond the per-client timeouts in run.py.
timeout --kill-after=10 "${FOREIGN_TIMEOUT:-600}" "${NETNS[@]}" bash -euo pipefail -c '
  ip link set lo up
  ip link add pz0 type veth peer name pz1
  ip addr add 127.0.0.2/8 dev pz0
  ip link set pz1 up
  ip link set pz0 up
  exec "$0" tests/foreign/run.py --host-ip 127.0.0.2 "$@"
' "$SYS_PY" "$@" || die "foreign client tests failed (logs: target/foreign/)"
printf '\nforeign-tests: ok\n'
