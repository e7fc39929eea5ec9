#!/usr/bin/env bash
# CPU profile of a Plaza server under a bounded synthetic load (perf, software clock: this
# machine has no hardware counters). Writes bench/results/<date>-profile-<name>.txt.
#
#   bench/profile.sh                       # meeting: 6 publishers (audio + video), 4 subscribers
#   PUBLISHERS=1 SUBSCRIBERS=40 NAME=livestream bench/profile.sh
#   FREQ=2000 bench/profile.sh             # sample at 2 kHz (default 499 Hz)
#
# Needs `perf` (apt-get install -y linux-perf), the server built with debug information
# (cargo build --profile profiling --bin plaza) and the load tester (cargo build --release
# --example loadtest). Ports 17890/17892 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
PUBLISHERS=${PUBLISHERS:-6}
SUBSCRIBERS=${SUBSCRIBERS:-4}
NAME=${NAME:-meeting}
DURATION=${DURATION:-25}
PORT=${PORT:-17890}
UDP_PORT=${UDP_PORT:-17892}
out="bench/results/$(date -u +%F)-profile-$NAME.txt"
data=/tmp/plaza-perf-$NAME.data   # kept for `perf report -i`

target/profiling/plaza --port "$PORT" --udp-port "$UDP_PORT" --log-level warn &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
sleep 1
# Record 10 s in the middle of the measured traffic (joins take a few seconds).
( sleep $((DURATION / 2)); perf record -e cpu-clock -F "${FREQ:-499}" --call-graph dwarf,16384 -p "$pid" \
    -o "$data" -- sleep 10 >/dev/null 2>&1 ) &
rec=$!
target/release/examples/loadtest --url "ws://127.0.0.1:$PORT/rtc" --room profile \
    --publishers "$PUBLISHERS" --subscribers "$SUBSCRIBERS" --duration "$DURATION" \
    --server-pid "$pid" > "$data.loadtest" 2>&1 || true
wait $rec || true
{
    echo "# Plaza CPU profile: $NAME ($PUBLISHERS publishers, $SUBSCRIBERS subscribers)"
    echo "# $(date -u '+%F %T') UTC, git $(git rev-parse --short HEAD), load: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# perf record -e cpu-clock -F ${FREQ:-499} --call-graph dwarf -p <plaza> -- sleep 10"
    echo
    echo "## loadtest summary"
    grep -E "^(server|media latency|join:|chat rtt)" "$data.loadtest" || true
    echo
    echo "## self time, grouped (bench/perf-buckets.py)"
    perf report -i "$data" --stdio --no-children --sort dso,symbol -g none --percent-limit 0 \
        2>/dev/null | python3 bench/perf-buckets.py
    echo
    echo "## inclusive time of selected functions (children)"
    perf report -i "$data" --stdio --children --sort symbol -g none --percent-limit 0 2>/dev/null \
        | grep -E "Core::(run|process|drain_pc|flush|handle_datagram|forward_rtp|handle_pc_message|fire_timers|select_layers)|RTCPeerConnection::(handle_read|poll_write|handle_timeout|poll_read)|write_rtp|__libc_sendto|__libc_recvfrom|recvfrom|epoll_wait|encrypt_rtp|decrypt_rtp|malloc|memmove" \
        | sed 's/ \+$//' | cut -c1-180 | head -40
    echo
    echo "## the kernel delivering the server's datagrams into the receivers' sockets (children)"
    echo "# On loopback the receive path of every datagram Plaza sends runs inside Plaza's send"
    echo "# system call: IP/UDP receive, socket queueing and waking the receiving thread. Across a"
    echo "# real NIC that work happens on the receiving machine."
    perf report -i "$data" --stdio --children --sort symbol -g none --percent-limit 0 2>/dev/null \
        | grep -E "\] (__x64_sys_sendmmsg|__sys_sendmmsg|udp_sendmsg|__dev_queue_xmit|__local_bh_enable_ip|do_softirq|net_rx_action|__netif_receive_skb|ip_rcv|ip_local_deliver|__udp4_lib_rcv|sock_def_readable|ep_poll_callback|__wake_up_sync_key|try_to_wake_up)( |$)" \
        | sed 's/ \+$//' | cut -c1-120
    echo
    echo "## every function with ≥ 2 % inclusive time (children)"
    perf report -i "$data" --stdio --children --sort symbol -g none --percent-limit 2 2>/dev/null \
        | grep -v "^#" | grep -v "^$" | sed 's/ \+$//' | cut -c1-200 | head -120
} > "$out"
rm -f "$data.loadtest"
echo "wrote $out"
