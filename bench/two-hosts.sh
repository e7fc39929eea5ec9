#!/usr/bin/env bash
# The benchmark with the server and the load generator on two emulated hosts: each in its own
# network namespace, joined by a veth pair, instead of both on loopback.
#
# Why: on loopback, the kernel delivers every datagram Plaza sends into the receiving socket
# inside Plaza's own send call (IP and UDP receive, queueing, waking the receiver), so the
# server's CPU time includes the viewers' receive path: about a fifth of it at 50-100 light
# viewers (`perf`: `net_rx_action` under `__x64_sys_sendmmsg`). Across a real network that
# work runs on the viewers' machines. Here each end of the veth pair receives in its own NAPI
# kernel thread, pinned to that side's CPUs: the generator side's thread on the generator's
# CPUs, the server side's on the server's. Plaza's CPU time is then its own work, sends
# included, as it would be with a NIC.
#
#   sudo bench/two-hosts.sh --servers plaza --scenarios livestream --simulcast --viewer light \
#       --livestream-viewers 50,100 --server-workers 1
#
# Every argument goes to `target/release/examples/bench` (build it and the server first:
# `cargo build --release --bins --example bench`). SERVER_CPUS (default 0) and GENERATOR_CPUS
# (default: every other CPU) place the two sides, as `--server-cpus` / `--generator-cpus` do.
# Needs root, `ip` and `ethtool`. The namespaces are removed on exit.
#
# What differs from a NIC: the veth ring holds 256 packets and drops past that (no queueing
# discipline in front, as on a real interface); the NAPI threads run at real-time priority so
# that the generator side keeps up with bursts. Drops on the link are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in ip ethtool; do
    command -v "$tool" >/dev/null || { echo "two-hosts: '$tool' is missing (apt-get install -y iproute2 ethtool)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "two-hosts: needs root (network namespaces)" >&2; exit 1; }
bench=target/release/examples/bench
[ -x "$bench" ] || { echo "two-hosts: $bench is missing (cargo build --release --bins --example bench)" >&2; exit 1; }

ncpu=$(nproc)
SERVER_CPUS=${SERVER_CPUS:-0}
GENERATOR_CPUS=${GENERATOR_CPUS:-$([ "$ncpu" -gt 1 ] && echo "1-$((ncpu - 1))" || echo 0)}
SRV_NS=plaza-bench-srv GEN_NS=plaza-bench-gen
SRV_IF=pzb-srv GEN_IF=pzb-gen
SRV_IP=10.231.0.1 GEN_IP=10.231.0.2

cleanup() {
    ip netns del "$SRV_NS" 2>/dev/null || true
    ip netns del "$GEN_NS" 2>/dev/null || true
}
cleanup
trap cleanup EXIT
ip netns add "$SRV_NS"
ip netns add "$GEN_NS"
ip link add "$SRV_IF" type veth peer name "$GEN_IF"
ip link set "$SRV_IF" netns "$SRV_NS"
ip link set "$GEN_IF" netns "$GEN_NS"
ip -n "$SRV_NS" addr add "$SRV_IP/24" dev "$SRV_IF"
ip -n "$GEN_NS" addr add "$GEN_IP/24" dev "$GEN_IF"
for pair in "$SRV_NS:$SRV_IF" "$GEN_NS:$GEN_IF"; do
    ns=${pair%%:*} dev=${pair#*:}
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$dev" up
    # GRO on gives the veth end its own NAPI instance; without TSO on the sender, UDP takes
    # it (the kernel sends TSO-capable traffic that GRO cannot merge through the backlog of
    # the sending CPU instead). Threaded: the NAPI runs in a kernel thread we can place.
    ip netns exec "$ns" ethtool -K "$dev" gro on tso off >/dev/null
    ip netns exec "$ns" sh -c "echo 1 > /sys/class/net/$dev/threaded"
done
napi_thread() { ps -e -o pid=,comm= | awk -v want="napi/$1-" 'index($2, want) == 1 { print $1 }'; }
place() {
    local dev=$1 cpus=$2 pid
    pid=$(napi_thread "$dev")
    [ -n "$pid" ] || { echo "two-hosts: no NAPI thread for $dev (kernel without threaded veth NAPI?)" >&2; exit 1; }
    for p in $pid; do
        taskset -p -c "$cpus" "$p" >/dev/null
        chrt -f -p 50 "$p"
    done
}
place "$SRV_IF" "$SERVER_CPUS"
place "$GEN_IF" "$GENERATOR_CPUS"
echo "two-hosts: server $SRV_IP in $SRV_NS (CPUs $SERVER_CPUS), generator $GEN_IP in $GEN_NS (CPUs $GENERATOR_CPUS)"

status=0
ip netns exec "$GEN_NS" "$bench" --plaza-netns "$SRV_NS" --plaza-ip "$SRV_IP" --client-ip "$GEN_IP" \
    --server-cpus "$SERVER_CPUS" --generator-cpus "$GENERATOR_CPUS" "$@" || status=$?
for pair in "$SRV_NS:$SRV_IF" "$GEN_NS:$GEN_IF"; do
    ns=${pair%%:*} dev=${pair#*:}
    dropped=$(ip netns exec "$ns" cat "/sys/class/net/$dev/statistics/tx_dropped")
    echo "two-hosts: $dev dropped $dropped datagrams it sent (the other end's ring was full)"
done
exit "$status"
