#!/usr/bin/env bash
# Plaza benchmark with the server and the load generator in two network namespaces joined by
# a veth pair, so that the receive path of the datagrams the server sends runs on the load
# generator's CPUs, as it would on the viewers' machines.
#
#   bench/split.sh --servers plaza --scenarios livestream --simulcast --viewer light \
#       --livestream-viewers 100 --server-workers 1 --no-write
#
# On loopback the kernel delivers every datagram Plaza sends into the receiving socket inside
# Plaza's own `sendmmsg` (IP and UDP receive, socket queueing, waking the receiver), and
# that work is charged to the server. Here the server (namespace `plaza-bench-srv-<pid>`,
# 10.77.0.2) sends on one end of a veth pair; the other end (10.77.0.1, in a private
# namespace of this script's own, where the generator runs) hands what arrives to the
# generator's CPUs with receive packet steering (RPS), as a NIC's queue would be served on
# the receiving machine. What arrives at the server's end is steered to the server's CPUs,
# so the server still pays for what it receives. Handing datagrams to another CPU costs an
# inter-processor interrupt, which in a VM can cost as much as the receive path it moves
# (see bench/README.md).
#
# SERVER_CPUS (default 0) and GENERATOR_CPUS (default 1) pin both sides and choose the
# steering; every other argument goes to `target/release/examples/bench` (build it and the
# server first: cargo build --release --bins --example bench). Needs root (unshare, ip
# netns, sysfs). Nothing on the host's own network changes: both namespaces disappear when
# the script exits.
set -euo pipefail
cd "$(dirname "$0")/.."

server_cpus=${SERVER_CPUS:-0}
generator_cpus=${GENERATOR_CPUS:-1}

# A CPU list ("0", "0-1", "1,3") as the hexadecimal mask rps_cpus takes.
mask() {
    local m=0 part lo hi c
    IFS=, read -ra parts <<<"$1"
    for part in "${parts[@]}"; do
        lo=${part%-*}
        hi=${part#*-}
        for ((c = lo; c <= hi; c++)); do m=$((m | (1 << c))); done
    done
    printf '%x' "$m"
}

if [ -z "${PLAZA_SPLIT_IN_NETNS:-}" ]; then
    # A private network namespace (and a mount namespace, for a sysfs that shows it).
    exec unshare --net --mount env PLAZA_SPLIT_IN_NETNS=1 "$0" "$@"
fi

mount -t sysfs sysfs /sys
ip link set lo up
ns=plaza-bench-srv-$$
wrapper=$(mktemp /tmp/plaza-split-XXXXXX)
cleanup() {
    ip netns del "$ns" 2>/dev/null || true
    rm -f "$wrapper"
}
trap cleanup EXIT
ip netns add "$ns"
ip link add pzg0 type veth peer name pzs0 netns "$ns"
ip addr add 10.77.0.1/24 dev pzg0
ip link set pzg0 up
ip -n "$ns" link set lo up
ip -n "$ns" addr add 10.77.0.2/24 dev pzs0
ip -n "$ns" link set pzs0 up
mask "$generator_cpus" > /sys/class/net/pzg0/queues/rx-0/rps_cpus
ip netns exec "$ns" sh -c "echo $(mask "$server_cpus") > /sys/class/net/pzs0/queues/rx-0/rps_cpus"
echo "split: server in $ns at 10.77.0.2 (CPUs $server_cpus, rps $(cat /sys/class/net/pzg0/queues/rx-0/rps_cpus) on the generator's end), generator at 10.77.0.1 (CPUs $generator_cpus)" >&2

# The server through `ip netns exec`, which execs it: the pid the benchmark measures is the
# server's, and the pinning the benchmark gives it is kept.
cat > "$wrapper" <<EOF
#!/bin/sh
exec ip netns exec $ns ${PLAZA_BIN:-$PWD/target/release/plaza} "\$@"
EOF
chmod +x "$wrapper"
target/release/examples/bench --plaza-bin "$wrapper" --plaza-ip 10.77.0.2 --client-ip 10.77.0.1 \
    --server-cpus "$server_cpus" --generator-cpus "$generator_cpus" "$@"
