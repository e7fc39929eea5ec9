#!/usr/bin/env python3
"""Cluster registry timings with the release binary and a real redis-server.

  cargo build --release --bin plaza && python3 bench/cluster_registry.py [RUNS]

Measures, per run: graceful shutdown (SIGTERM) -> the node's record gone; crash (SIGKILL) ->
record gone (TTL); Redis killed and restarted on the same port -> record back. Then the
heartbeat's cost: Redis commands/s from one node (INFO commandstats) and the node's CPU with
and without --redis over an idle interval (/proc/<pid>/stat). Polls Redis every 2 ms.
"""
import os, signal, socket, subprocess, sys, time

BIN = os.environ.get("PLAZA_BIN", "target/release/plaza")
RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def redis_cmd(port, *args):
    """One RESP command on a fresh connection; returns the raw reply (None if unreachable)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=0.5)
    except OSError:
        return None
    try:
        msg = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
        s.sendall(msg.encode())
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"$") and not data.startswith(b"$-1"):
            n = int(data[1:data.index(b"\r\n")])
            while len(data) < data.index(b"\r\n") + 2 + n + 2:
                data += s.recv(65536)
        return data
    except OSError:
        return None
    finally:
        s.close()


def start_redis(port):
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while redis_cmd(port, "PING") != b"+PONG\r\n":
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.01)
    return p


def start_node(redis_port, node_id):
    args = [BIN, "--port", "0", "--udp-port", "0", "--log-level", "warn"]
    if redis_port:
        args += ["--redis", f"redis://127.0.0.1:{redis_port}/", "--node-id", node_id]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def exists(port, node_id):
    r = redis_cmd(port, "EXISTS", f"plaza:node:{node_id}")
    return r == b":1\r\n"


def wait(pred, within, what):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > within:
            raise SystemExit(f"{what}: not within {within} s")
        time.sleep(0.002)
    return time.monotonic() - t0


def cpu_ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def stats(xs):
    xs = sorted(xs)
    return f"min {xs[0]*1000:.0f} ms, median {xs[len(xs)//2]*1000:.0f} ms, max {xs[-1]*1000:.0f} ms"


def main():
    port = free_port()
    redis = start_redis(port)
    graceful, crash, back = [], [], []
    for i in range(RUNS):
        nid = f"ND_bench{i}"
        node = start_node(port, nid)
        wait(lambda: exists(port, nid), 10, "registered")
        t0 = time.monotonic(); node.send_signal(signal.SIGTERM)
        wait(lambda: not exists(port, nid), 10, "gone after SIGTERM")
        graceful.append(time.monotonic() - t0)
        node.wait(10)

        node = start_node(port, nid)
        wait(lambda: exists(port, nid), 10, "registered")
        time.sleep(0.3 + 0.7 * i / max(RUNS - 1, 1))  # kill at different points of the beat
        t0 = time.monotonic(); node.kill(); node.wait()
        wait(lambda: not exists(port, nid), 10, "gone after SIGKILL")
        crash.append(time.monotonic() - t0)

        node = start_node(port, nid)
        wait(lambda: exists(port, nid), 10, "registered")
        redis.kill(); redis.wait()
        time.sleep(2.0 + 0.25 * i)  # outages of 2 s and up: different points of the backoff
        t0 = time.monotonic(); redis = start_redis(port)
        wait(lambda: exists(port, nid), 10, "registered again")
        back.append(time.monotonic() - t0)
        node.send_signal(signal.SIGTERM); node.wait(10)
    print(f"graceful shutdown -> gone ({RUNS} runs): {stats(graceful)}")
    print(f"crash (SIGKILL) -> gone, TTL 3 s ({RUNS} runs): {stats(crash)}")
    print(f"Redis back -> re-registered, outages 2-3 s ({RUNS} runs): {stats(back)}")

    # Heartbeat cost over an idle interval.
    secs = 20
    for with_redis in (False, True):
        node = start_node(port if with_redis else None, "ND_cost")
        if with_redis:
            wait(lambda: exists(port, "ND_cost"), 10, "registered")
        time.sleep(2)
        redis_cmd(port, "CONFIG", "RESETSTAT")
        c0, r0 = cpu_ticks(node.pid), cpu_ticks(redis.pid)
        time.sleep(secs)
        c1, r1 = cpu_ticks(node.pid), cpu_ticks(redis.pid)
        info = redis_cmd(port, "INFO", "commandstats").decode()
        calls = sum(int(l.split("calls=")[1].split(",")[0]) for l in info.splitlines() if "calls=" in l)
        label = "with --redis" if with_redis else "without --redis"
        print(f"idle node {label}: node CPU {100*(c1-c0)/TICK/secs:.2f} % of a core, "
              f"redis-server CPU {100*(r1-r0)/TICK/secs:.2f} %, Redis commands {calls/secs:.2f}/s "
              f"(over {secs} s; includes this script's 2 INFO/RESETSTAT calls)")
        node.send_signal(signal.SIGTERM); node.wait(10)
    redis.kill()


if __name__ == "__main__":
    main()
