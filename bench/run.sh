#!/usr/bin/env bash
# Plaza benchmark, Plaza beside Janus, in a private network namespace.
#
#   bench/run.sh                          # every scenario, default sizes (see --help)
#   bench/run.sh --scenarios meeting --meeting-participants 3,5 --duration 5
#
# Janus's libnice ignores loopback interfaces, so Janus gets a veth interface carrying
# 127.0.10.1/8 inside a new network namespace (`unshare --net`); the load generator, Plaza
# (127.0.0.1) and Janus all run in that namespace, which disappears with them. Needs root (or
# CAP_SYS_ADMIN + CAP_NET_ADMIN) for unshare and ip. See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PLAZA_BENCH_IN_NETNS:-}" ]; then
    profile=${PLAZA_BENCH_PROFILE:-release}
    if [ "$profile" = release ]; then
        cargo build --release --bins --example bench
    else
        cargo build --bins --example bench
    fi
    exec unshare --net env PLAZA_BENCH_IN_NETNS=1 PLAZA_BENCH_PROFILE="$profile" "$0" "$@"
fi

ip link set lo up
ip link add pzb0 type veth peer name pzb1
ip addr add 127.0.10.1/8 dev pzb0
ip link set pzb0 up
ip link set pzb1 up
profile=${PLAZA_BENCH_PROFILE:-release}
[ "$profile" = release ] || profile=debug
exec "target/$profile/examples/bench" --janus-ice pzb0 "$@"
