#!/usr/bin/env python3
"""Groups a `perf report --no-children` symbol list into buckets (self time).

    perf report -i perf.data --stdio --no-children --sort dso,symbol -g none --percent-limit 0 \
        | python3 bench/perf-buckets.py
"""
import re
import sys
from collections import defaultdict

BUCKETS = [
    ("kernel: UDP send (sendto)", r"\[k\].*(sendto|udp_send|ip_output|ip_finish|dev_queue_xmit|ip_make_skb|__ip_append|ip_send|udp_sendmsg)"),
    ("kernel: receive / softirq", r"\[k\].*(recv|napi|netif|softirq|ip_rcv|ip_local|udp_rcv|udp_queue|__udp4|sock_def_readable|process_backlog)"),
    ("kernel: epoll / scheduling / other", r"\[k\]"),
    ("memcpy / memmove", r"mem(move|cpy|set)"),
    ("malloc / free", r"(malloc|free|_int_|unlink_chunk|realloc|tcache|cfree|arena)"),
    ("SRTP / crypto (AES-GCM, AES-CTR, HMAC-SHA1)", r"(aesni|aes|gcm|ghash|sha1|hmac|rtc_srtp|srtp|ring::|rtc_crypto|poly)"),
    ("rtc: interceptors (NACK, TWCC, reports, CC)", r"rtc_interceptor|interceptor::"),
    ("rtc: RTP/RTCP parse + marshal", r"rtc_rtp|rtc_rtcp|marshal|unmarshal|Unmarshal|Marshal"),
    ("rtc: peer-connection pipeline (handlers, queues)", r"rtc::|rtc_ice|rtc_dtls|rtc_sctp|rtc_shared|sansio"),
    ("plaza: core (forward, rewrite, select)", r"plaza::"),
    ("tokio / std / hashing / other user", r"."),
]

totals = defaultdict(float)
top = defaultdict(list)
for line in sys.stdin:
    m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+(\[.\])\s+(.*)$", line)
    if not m:
        continue
    pct, dso, kind, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()
    text = f"{kind} {sym} {dso}"
    for name, pat in BUCKETS:
        if re.search(pat, text):
            totals[name] += pct
            top[name].append((pct, sym[:90]))
            break
for name, _ in BUCKETS:
    if totals[name] > 0:
        print(f"{totals[name]:6.1f}%  {name}")
        for pct, sym in sorted(top[name], reverse=True)[:4]:
            print(f"           {pct:5.2f}%  {sym}")
