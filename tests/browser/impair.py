#!/usr/bin/env python3
"""A lossy, slow link in user space: random loss and a fixed delay for the packets that
iptables hands to NFQUEUE queues (netfilter's nfnetlink_queue, spoken directly over a netlink
socket; standard library only).

Used by the browser tests where the kernel has no netem qdisc (tc qdisc ... netem): the
test sends one direction of a subscriber's UDP flow to one queue, e.g.

    iptables -I OUTPUT -p udp --dport 40000 -j NFQUEUE --queue-num 7101

and runs `impair.py --queue 7101 --loss 0.1 --delay-ms 100`. Each packet of a queue is
dropped with probability `loss`, independently of the others; every other packet is
released `delay-ms` after it was queued, in order. Several `--queue` options each get the
same impairment.

Prints `ready` once every queue is bound, then a JSON line of counters per queue every
second and at exit ({"queue": n, "seen": .., "dropped": .., "accepted": ..}). Exits on
SIGTERM / SIGINT / closed stdin, releasing what it still holds. `--check` only binds the
queues (is nfnetlink_queue there, may we use it?) and exits.
"""
import argparse
import heapq
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NF_DROP = 0
NF_ACCEPT = 1


def nla(kind, payload):
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


class Queues:
    def __init__(self, queues, maxlen):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self.seq = 0
        for q in queues:
            self.config(q, nla(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)))
            self.config(q, nla(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)) + nla(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen)))

    def send(self, msg_type, queue, attrs, flags):
        self.seq += 1
        body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + attrs
        hdr = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, NLM_F_REQUEST | flags, self.seq, 0)
        self.sock.send(hdr + body)

    def config(self, queue, attrs):
        self.send(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_ACK)
        while True:
            data = self.sock.recv(65536)
            for kind, _seq, payload in self.messages(data):
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", payload, 0)
                    if err != 0:
                        raise OSError(-err, f"nfqueue config of queue {queue}: {os.strerror(-err)}")
                    return

    def verdict(self, queue, packet_id, verdict):
        self.send(NFQNL_MSG_VERDICT, queue, nla(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id)), 0)

    @staticmethod
    def messages(data):
        off = 0
        while off + 16 <= len(data):
            n, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, off)
            if n < 16:
                break
            yield kind, seq, data[off + 16 : off + n]
            off += (n + 3) & ~3

    def packets(self, data):
        """(queue, packet id) of each queued packet in `data`."""
        for kind, _seq, payload in self.messages(data):
            if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                continue
            (queue,) = struct.unpack_from("!H", payload, 2)
            off = 4
            while off + 4 <= len(payload):
                n, t = struct.unpack_from("=HH", payload, off)
                if n < 4:
                    break
                if (t & 0x7FFF) == NFQA_PACKET_HDR:
                    (packet_id,) = struct.unpack_from("!I", payload, off + 4)
                    yield queue, packet_id
                    break
                off += (n + 3) & ~3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queue", type=int, action="append", required=True)
    ap.add_argument("--loss", type=float, default=0.0, help="drop probability per packet (0..1)")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--maxlen", type=int, default=4096, help="kernel queue length (packets)")
    ap.add_argument("--check", action="store_true", help="bind the queues, print ready and exit")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    qs = Queues(args.queue, args.maxlen)
    if args.check:
        print("ready", flush=True)
        return
    stats = {q: {"queue": q, "seen": 0, "dropped": 0, "accepted": 0} for q in args.queue}
    held = []  # (release time, order, queue, packet id)
    order = 0
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("ready", flush=True)
    delay = args.delay_ms / 1000.0
    next_report = time.monotonic() + 1.0
    poller = select.poll()
    poller.register(qs.sock, select.POLLIN)
    poller.register(sys.stdin, select.POLLIN | select.POLLHUP)
    while not stop:
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, _, q, pid = heapq.heappop(held)
            qs.verdict(q, pid, NF_ACCEPT)
            stats[q]["accepted"] += 1
        if now >= next_report:
            for s in stats.values():
                print(json.dumps(s), flush=True)
            next_report = now + 1.0
        wake = min(next_report, held[0][0]) if held else next_report
        for fd, ev in poller.poll(max(0.0, (wake - time.monotonic()) * 1000.0)):
            if fd == sys.stdin.fileno():
                if not os.read(fd, 4096):
                    stop = True
                continue
            try:
                data = qs.sock.recv(1 << 20)
            except OSError as e:  # ENOBUFS: the kernel dropped messages; carry on
                print(json.dumps({"warning": str(e)}), flush=True)
                continue
            t = time.monotonic()
            for q, pid in qs.packets(data):
                stats[q]["seen"] += 1
                if rng.random() < args.loss:
                    qs.verdict(q, pid, NF_DROP)
                    stats[q]["dropped"] += 1
                else:
                    order += 1
                    heapq.heappush(held, (t + delay, order, q, pid))
    for _, _, q, pid in held:
        qs.verdict(q, pid, NF_ACCEPT)
        stats[q]["accepted"] += 1
    for s in stats.values():
        print(json.dumps(s), flush=True)


if __name__ == "__main__":
    main()
