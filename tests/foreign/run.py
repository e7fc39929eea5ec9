"""Runs Plaza against clients it did not write and prints a PASS/FAIL table.

Run by scripts/foreign-tests.sh inside a private network namespace that it has prepared (see
there); it can also be run by hand in such a namespace:

    python tests/foreign/run.py --host-ip 127.0.0.2 [--only SUBSTRING ...] [--list]

For each combination a publisher client and a subscriber client join their own room on one
server (started here on free ports, media on --host-ip): the subscriber must decode (aiortc,
GStreamer, Chromium) or see correctly typed packets of (werift, webrtc-rs) one audio and one video
track from the publisher, and receive its chat (not from the load tester, which chats only with
its own peers); the publisher must see its two tracks published (Chromium: sent) and the
subscriber's `done` on chat. One more check: a webrtcbin offer nobody can demultiplex must be
refused. And WHIP: webrtcbin (`gst_client.py --whip`) or Debian's simple-whip-client
(`whip-client`, with the UPnP stand-in of upnp-stub.c) publishes over WHIP (HTTP only) and a
WebSocket subscriber decodes it. And WHEP: a viewer (webrtcbin or aiortc, `--whep`, or the
server's /watch page in headless Chromium) plays the room with one HTTP POST and must decode its
host's audio and video, then DELETE its session; for a WHIP publisher the time from its POST to
the viewer's first decoded media is printed (all stamps CLOCK_MONOTONIC, shared on one machine).
And a room that spans two nodes: two more servers form a cluster over a real redis-server
(`--redis`, `--cluster-span-above 1`); the publisher joins through the first node, the
subscriber (WebSocket or WHEP) through the second, which must serve it without a redirect and
receive the publisher's media over the node link.
Every client runs under a hard timeout. Exit status 1 if any combination fails.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
ART = os.path.join(TARGET, "foreign")
PY = os.environ.get("FOREIGN_PYTHON", os.path.join(TARGET, "foreign-venv", "bin", "python"))
PLAZA = os.environ.get("PLAZA_BIN", os.path.join(TARGET, "release", "plaza"))
LOADTEST = os.environ.get("LOADTEST_BIN", os.path.join(TARGET, "release", "examples", "loadtest"))
CLIENT_TIMEOUT = float(os.environ.get("FOREIGN_CLIENT_TIMEOUT", "20"))
# Debian's simple-whip-client and the directory of the libgupnp-igd stand-in it needs
# (upnp-stub.c, built there by scripts/foreign-tests.sh).
WHIP_CLIENT = os.environ.get("WHIP_CLIENT", "/usr/bin/whip-client")
UPNP_STUB_DIR = os.environ.get("UPNP_STUB_DIR", os.path.join(TARGET, "upnp-stub"))
SWC_AUDIO = (
    "audiotestsrc is-live=true wave=red-noise ! audioconvert ! audioresample ! queue ! opusenc ! rtpopuspay pt=100 ssrc=1"
    " ! queue ! application/x-rtp,media=audio,encoding-name=OPUS,payload=100"
)
SWC_VIDEO = (
    "videotestsrc is-live=true pattern=ball ! videoconvert ! queue ! vp8enc deadline=1 ! rtpvp8pay pt=96 ssrc=2"
    " ! queue ! application/x-rtp,media=video,encoding-name=VP8,payload=96"
)

CLIENTS = {
    "werift": ["node", os.path.join(HERE, "werift-client.mjs")],
    "aiortc": [PY, os.path.join(HERE, "aiortc_client.py")],
    "gstreamer": [PY, os.path.join(HERE, "gst_client.py")],
    "chromium": ["node", os.path.join(HERE, "chromium-client.mjs")],
}

# (publisher, subscriber, order): "sub-first" makes the subscriber receive the tracks through a
# renegotiation (track_published → new subscribe_offer); "pub-first" makes it a late joiner that
# gets them in its first offer.
COMBINATIONS = [
    ("werift", "werift", "sub-first"),
    ("aiortc", "aiortc", "sub-first"),
    ("gstreamer", "gstreamer", "sub-first"),
    ("werift", "aiortc", "sub-first"),
    ("aiortc", "werift", "sub-first"),
    ("werift", "gstreamer", "sub-first"),
    ("gstreamer", "werift", "sub-first"),
    ("aiortc", "gstreamer", "sub-first"),
    ("gstreamer", "aiortc", "sub-first"),
    ("gstreamer", "gstreamer", "pub-first"),
    ("webrtc-rs", "werift", "pub-first"),
    ("webrtc-rs", "aiortc", "pub-first"),
    ("webrtc-rs", "gstreamer", "pub-first"),
    ("werift", "webrtc-rs", "pub-first"),
    ("aiortc", "webrtc-rs", "pub-first"),
    ("gstreamer", "webrtc-rs", "pub-first"),
    ("chromium", "gstreamer", "sub-first"),
    ("gstreamer", "chromium", "sub-first"),
    ("chromium", "aiortc", "sub-first"),
    ("werift", "chromium", "sub-first"),
    ("gstreamer", None, "offer-without-ssrc"),
    # WHIP ingest (signaling/WHIP.md): webrtcbin publishes with one HTTP POST, no WebSocket.
    ("gstreamer-whip", "gstreamer", "whip"),
    ("gstreamer-whip", "aiortc", "whip"),
    ("simple-whip-client", "aiortc", "whip"),
    # WHEP playback: the viewer POSTs its recvonly offer, no WebSocket. "whep": the viewer comes
    # first and waits for a host; "whep-late": it joins a room whose host already publishes.
    ("gstreamer-whip", "gstreamer-whep", "whep"),
    ("gstreamer-whip", "gstreamer-whep", "whep-late"),
    ("gstreamer-whip", "aiortc-whep", "whep"),
    ("chromium", "aiortc-whep", "whep"),
    ("aiortc", "gstreamer-whep", "whep"),
    ("gstreamer", "aiortc-whep", "whep-late"),
    ("werift", "gstreamer-whep", "whep-late"),
    ("simple-whip-client", "gstreamer-whep", "whep"),
    # the server's player page (/watch) in headless Chromium
    ("simple-whip-client", "chromium-watch", "whep"),
    ("gstreamer-whip", "chromium-watch", "whep"),
    # A room spanning two nodes: the publisher through node A, the subscriber through node B.
    ("aiortc", "gstreamer", "span"),
    ("gstreamer-whip", "gstreamer-whep", "span-whep"),
]


def free_port(kind):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Redis:
    """A redis-server on a free port of 127.0.0.1, without persistence (the cluster's control plane)."""

    def __init__(self):
        self.port = free_port(socket.SOCK_STREAM)
        self.log = open(os.path.join(ART, "redis.log"), "w")
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("foreign-tests: redis-server did not start (apt-get install redis-server)")
                time.sleep(0.05)

    def command(self, *args):
        """One command (RESP), its reply's first line."""
        req = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as c:
            c.sendall(req.encode())
            return c.recv(512).split(b"\r\n", 1)[0].decode()

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class Server:
    def __init__(self, host_ip, name="plaza", extra=()):
        self.port = free_port(socket.SOCK_STREAM)
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.log_path = os.path.join(ART, f"{name}.log")
        self.log = open(self.log_path, "w")
        # HTTP/WebSocket on 127.0.0.1; media bound to and announced on host_ip, an address on a
        # non-loopback interface (libnice gathers no candidates on loopback interfaces).
        cmd = [PLAZA, "--port", str(self.port), "--udp-port", str(self.udp_port), "--udp-bind", host_ip, "--announce-ip", host_ip, *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = f"ws://127.0.0.1:{self.port}/rtc"
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"foreign-tests: plaza exited at startup ({self.proc.returncode}); see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise SystemExit(f"foreign-tests: plaza did not answer /healthz within 15 s; see {self.log_path}")
            time.sleep(0.1)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(8)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Proc:
    """One client process under a hard timeout, its output in ART/<tag>.log."""

    def __init__(self, tag, cmd, hard_timeout):
        self.tag = tag
        self.log_path = os.path.join(ART, f"{tag}.log")
        self.out = open(self.log_path, "w")
        self.out.write("$ " + " ".join(cmd) + "\n")
        self.out.flush()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.out, text=True, cwd=HERE, start_new_session=True)
        self.deadline = time.monotonic() + hard_timeout
        self.stdout = ""

    def wait(self):
        try:
            self.stdout, _ = self.proc.communicate(timeout=max(0.1, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.stdout, _ = self.proc.communicate()
            self.out.write(f"\n[runner] killed after its hard timeout\n")
        self.out.write(self.stdout)
        self.out.close()
        return self.proc.returncode

    def terminate(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def result(self):
        for line in self.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        return None


class LineProc(Proc):
    """A client whose output is its log (whip-client): stdout and stderr read line by line as they
    come, each line stamped with time.monotonic() when it arrives and written to ART/<tag>.log
    with that stamp. Its result is judged by the runner (see swc_result)."""

    def __init__(self, tag, cmd, hard_timeout, env=None):
        self.tag = tag
        self.log_path = os.path.join(ART, f"{tag}.log")
        self.out = open(self.log_path, "w")
        self.out.write("$ " + " ".join(cmd) + "\n")
        self.out.flush()
        self.start_mono = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", cwd=HERE,
            start_new_session=True, env=env,
        )  # fmt: skip
        self.deadline = time.monotonic() + hard_timeout
        self.stdout = ""
        self.lines = []  # (time.monotonic(), line)
        self.eof = False
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            t = time.monotonic()
            with self.changed:
                self.lines.append((t, line.rstrip("\n")))
                self.changed.notify_all()
            self.out.write(f"[{t - self.start_mono:7.3f}] {line}")
            self.out.flush()
        with self.changed:
            self.eof = True
            self.changed.notify_all()

    def first(self, marker):
        """(time, line) of the first line containing `marker`, or None."""
        return next(((t, line) for t, line in self.lines if marker in line), None)

    def wait_for(self, marker, timeout):
        """Until a line contains `marker` (True) or the output ends or `timeout` s pass (False)."""
        with self.changed:
            self.changed.wait_for(lambda: self.first(marker) is not None or self.eof, timeout)
            return self.first(marker) is not None

    def wait(self):
        try:
            self.proc.wait(timeout=max(0.1, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.killed = True
        self.reader.join(5)
        if getattr(self, "killed", False):
            self.out.write("\n[runner] killed after its hard timeout\n")
        self.out.close()
        return self.proc.returncode

    def result(self):
        return getattr(self, "judged", None)


def swc_start(server, room, tag):
    """Debian's simple-whip-client publishing VP8 + Opus test sources to /whip/{room}, under the
    libgupnp-igd stand-in (upnp-stub.c: libnice and whip-client would otherwise load libsoup 3
    and 2.4 together and abort). It runs until SIGTERM, then DELETEs its session."""
    http = http_base(server.url)
    token = dev_token(server.url, room, "simple-whip-client", grants="publish")
    cmd = [
        WHIP_CLIENT, "--disable-colors", "-u", f"{http}/whip/{urllib.parse.quote(room, safe='')}", "-t", token,
        "-A", SWC_AUDIO, "-V", SWC_VIDEO,
    ]  # fmt: skip
    env = dict(os.environ, LD_LIBRARY_PATH=UPNP_STUB_DIR)
    return LineProc(tag, cmd, CLIENT_TIMEOUT + 15, env=env)


def swc_result(p, rc, server):
    """Judges a stopped simple-whip-client from its log (it prints no RESULT): a 201 with a
    `Location` ("Resource URL"), a connected PeerConnection, exit 0 after SIGTERM, and its DELETE
    seen by the server (whip-client logs no status for it: the server's log must say the session
    ended with reason "session deleted"). `post_mono`: when it logged "Sending SDP offer"."""
    why = []
    post = p.first("Sending SDP offer")
    resource = p.first("Resource URL:")
    connected = p.first("PeerConnection connected")
    r = {"client": "simple-whip-client", "start_mono": p.start_mono}
    if post:
        r["post_mono"] = post[0]
        r["start_to_post_ms"] = round((post[0] - p.start_mono) * 1000)
    if connected and post:
        r["connect_ms"] = round((connected[0] - post[0]) * 1000)
    if rc != 0:
        why.append(f"exit status {rc}")
    if not post:
        why.append("never sent its offer")
    if not resource:
        why.append("no Resource URL (no 201 with a Location)")
    if not connected:
        why.append("its PeerConnection never connected")
    if resource:
        session = resource[1].split("Resource URL:", 1)[1].strip().rsplit("/", 1)[-1]
        r["session"] = session
        deadline = time.monotonic() + 3
        while True:
            with open(server.log_path) as f:
                if any(f"resource={session}" in line and "reason=session deleted" in line for line in f):
                    break
            if time.monotonic() > deadline:
                why.append(f"the server never logged session {session} as deleted (no DELETE)")
                break
            time.sleep(0.05)
    r["ok"] = not why
    r["reason"] = "; ".join(why) if why else f"published over WHIP (201, connected {r.get('connect_ms')} ms after the POST, DELETE)"
    p.judged = r
    return r


def http_base(url):
    return url.replace("ws://", "http://", 1).rsplit("/rtc", 1)[0]


def dev_token(url, room, name, grants=None):
    """An access token for `name` in `room` from the server's development endpoint (the server
    runs without API keys), with the default grants or `grants` (comma-separated names). Fails
    loudly: a client without a token cannot join."""
    http = http_base(url)
    fields = {"room": room, "name": name}
    if grants:
        fields["grants"] = grants
    query = urllib.parse.urlencode(fields)
    with urllib.request.urlopen(f"{http}/dev/token?{query}", timeout=5) as r:
        return json.loads(r.read())["token"]


def client_cmd(kind, url, room, name, **kw):
    cmd = CLIENTS[kind] + ["--url", url, "--room", room, "--name", name, "--timeout", str(CLIENT_TIMEOUT)]
    # Chromium runs the demo page, whose client fetches its own token from the same endpoint.
    if kind != "chromium":
        cmd += ["--token", dev_token(url, room, name)]
    if kw.get("publish"):
        cmd.append("--publish")
    if kw.get("expect_from"):
        cmd += ["--expect-from", kw["expect_from"]]
    if kw.get("peer"):
        cmd += ["--peer", kw["peer"]]
    if kw.get("until_signal"):
        cmd.append("--until-signal")
    if kw.get("media_only"):
        cmd.append("--media-only")
    return cmd


def summary(r):
    if r is None:
        return "no RESULT line"
    return r.get("reason", "")


def run_foreign_pair(server, pub, sub, order, room):
    """Both clients are foreign: the subscriber says `done` on chat when satisfied."""
    hard = CLIENT_TIMEOUT + 10
    pcmd = client_cmd(pub, server.url, room, f"{pub}-pub", publish=True, peer=f"{sub}-sub")
    scmd = client_cmd(sub, server.url, room, f"{sub}-sub", expect_from=f"{pub}-pub", peer=f"{pub}-pub")
    if (pub, sub) == ("chromium", "aiortc"):
        # aiortc 1.16 sometimes never decodes Chromium's Opus although every packet arrives
        # (its receiver counts them; seen in about half the runs, with older and newer servers
        # alike): for this pair, audio counts as received when its RTP arrives on the audio
        # track; video must still decode.
        scmd.append("--audio-rtp-ok")
    first, second = (scmd, pcmd) if order == "sub-first" else (pcmd, scmd)
    tags = {id(pcmd): f"{room}-pub-{pub}", id(scmd): f"{room}-sub-{sub}"}
    a = Proc(tags[id(first)], first, hard)
    if order == "pub-first":
        # a late joiner: let the publisher's tracks reach the server first
        time.sleep(1.5)
    b = Proc(tags[id(second)], second, hard)
    procs = {"pub": a if first is pcmd else b, "sub": b if first is pcmd else a}
    rc = {k: p.wait() for k, p in procs.items()}
    res = {k: p.result() for k, p in procs.items()}
    ok = rc["pub"] == 0 and rc["sub"] == 0 and all(r and r.get("ok") for r in res.values())
    detail = f"sub: {summary(res['sub'])} | pub: {summary(res['pub'])}"
    if pub == "werift" and res["pub"] and res["pub"].get("offer_has_msid") is not False:
        # these combinations are the ones that cover offers without a=msid
        ok = False
        detail = "werift's offer now has a=msid: the combination no longer covers offers without it | " + detail
    extra = {}
    if res["pub"]:
        extra = {k: res["pub"].get(k) for k in ("offer_has_msid", "offer_has_ssrc")}
    return ok, detail, extra, [procs["pub"].log_path, procs["sub"].log_path]


def loadtest_cmd(server, room, publishers, subscribers, duration, json_path):
    return [
        LOADTEST, "--url", server.url, "--room", room, "--publishers", str(publishers), "--subscribers", str(subscribers),
        "--duration", str(duration), "--join-timeout", "10", "--timeout", "10", "--chat-interval-ms", "200", "--json", json_path,
    ]  # fmt: skip


def run_rs_publisher(server, sub, room):
    """webrtc-rs (the load tester's publisher `pub-1`) publishes; a foreign client subscribes.
    A load tester alone in its room sends no chat, so only the media is checked."""
    json_path = os.path.join(ART, f"{room}-loadtest.json")
    lt = Proc(f"{room}-pub-webrtc-rs", loadtest_cmd(server, room, 1, 0, 5, json_path), CLIENT_TIMEOUT + 20)
    time.sleep(1.5)
    s = Proc(f"{room}-sub-{sub}", client_cmd(sub, server.url, room, f"{sub}-sub", expect_from="pub-1", media_only=True), CLIENT_TIMEOUT + 10)
    src = s.wait()
    lrc = lt.wait()
    r = s.result()
    ok = src == 0 and bool(r and r.get("ok")) and lrc == 0
    return ok, f"sub: {summary(r)} | loadtest exit {lrc}", {}, [lt.log_path, s.log_path]


def run_rs_subscriber(server, pub, room):
    """A foreign client publishes; webrtc-rs (the load tester's subscriber `sub-1`) subscribes.
    The load tester's JSON report must show sub-1 receiving one audio and one video track of the
    foreign publisher, with packets (and a VP8 keyframe). A load tester alone in its room sends no
    chat, so the publisher only checks that its tracks were published."""
    json_path = os.path.join(ART, f"{room}-loadtest.json")
    if os.path.exists(json_path):
        os.remove(json_path)
    p = Proc(f"{room}-pub-{pub}", client_cmd(pub, server.url, room, f"{pub}-pub", publish=True, until_signal=True), CLIENT_TIMEOUT + 15)
    time.sleep(1.5)
    lt = Proc(f"{room}-sub-webrtc-rs", loadtest_cmd(server, room, 0, 1, 4, json_path), CLIENT_TIMEOUT + 10)
    lrc = lt.wait()
    p.terminate()
    prc = p.wait()
    pr = p.result()
    why = []
    got = {}
    try:
        with open(json_path) as f:
            report = json.load(f)
        for t in report["tracks"]:
            if t["subscriber"] == "sub-1" and pr and t["publisher_id"] == pr.get("participant_id"):
                got[t["kind"]] = {"packets": t["packets_received"], "keyframes": t["keyframes_received"]}
        audio, video = got.get("audio", {}), got.get("video", {})
        if not (len(got) == 2 and audio.get("packets", 0) >= 50 and video.get("packets", 0) >= 30 and video.get("keyframes", 0) >= 1):
            why.append("webrtc-rs sub-1 did not receive one audio and one video track with packets (and a keyframe)")
    except (OSError, ValueError, KeyError) as e:
        why.append(f"no usable loadtest report ({type(e).__name__}: {e})")
    ok = lrc == 0 and prc == 0 and bool(pr and pr.get("ok")) and not why
    detail = f"webrtc-rs received {got}, loadtest exit {lrc} {'; '.join(why)} | pub: {summary(pr)}"
    return ok, detail, {}, [p.log_path, lt.log_path]


def run_gst_offer_without_ssrc(server, room):
    """webrtcbin offers before it knows its caps: no a=ssrc, audio m-section bundle-only. The
    server must say so (invalid_sdp naming the m-section) rather than accept media it cannot
    demultiplex."""
    cmd = client_cmd("gstreamer", server.url, room, "gstreamer-pub", publish=True) + ["--offer-without-caps", "--timeout", "8"]
    p = Proc(f"{room}-pub-gstreamer", cmd, 20)
    rc = p.wait()
    r = p.result()
    return rc == 0 and bool(r and r.get("ok")), f"pub: {summary(r)}", {}, [p.log_path]


def start_whip_publisher(server, pub, room):
    """A WHIP publisher (`pub`: gstreamer-whip or simple-whip-client) started in `room`, running
    until SIGTERM; its participant name is `pub`. Returns the process and the log line that says
    it is connected."""
    tag = f"{room}-pub-{pub}"
    if pub == "simple-whip-client":
        return swc_start(server, room, tag), "PeerConnection connected"
    endpoint = f"{http_base(server.url)}/whip/{urllib.parse.quote(room, safe='')}"
    pcmd = client_cmd("gstreamer", server.url, room, pub, until_signal=True) + ["--whip", endpoint]
    return Proc(tag, pcmd, CLIENT_TIMEOUT + 15), "WHIP publisher connected"


def publisher_result(server, p, rc):
    """A stopped publisher's RESULT (simple-whip-client: judged from its log)."""
    return swc_result(p, rc, server) if isinstance(p, LineProc) else p.result()


def run_whip_publisher(server, pub, sub, room):
    """A WHIP publisher (`pub`: GStreamer's webrtcbin or simple-whip-client; no WebSocket: POST,
    answer, DELETE); a foreign client subscribes over the WebSocket and must decode its media.
    The WHIP publisher is told to end (SIGTERM → DELETE) once the subscriber is done; it passes
    with 201, a connection and its DELETE."""
    s = Proc(f"{room}-sub-{sub}", client_cmd(sub, server.url, room, f"{sub}-sub", expect_from=pub, media_only=True), CLIENT_TIMEOUT + 10)
    time.sleep(1.0)
    p, _ = start_whip_publisher(server, pub, room)
    src = s.wait()
    p.terminate()
    prc = p.wait()
    sr, pr = s.result(), publisher_result(server, p, prc)
    ok = src == 0 and prc == 0 and bool(sr and sr.get("ok")) and bool(pr and pr.get("ok"))
    extra = {"connect_ms": pr.get("connect_ms")} if pr else {}
    return ok, f"sub: {summary(sr)} | pub: {summary(pr)}", extra, [p.log_path, s.log_path]


def wait_log(proc, marker, timeout):
    """Until `marker` appears in the client's log (stderr) or it exits; False after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(proc.log_path) as f:
            if marker in f.read():
                return True
        if proc.proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def run_whep_viewer(server, pub, sub, order, room, viewer_server=None):
    """A WHEP viewer (`sub`: gstreamer-whep, aiortc-whep, or chromium-watch: the server's /watch
    page) plays the room; `pub` publishes over WHIP (gstreamer-whip, simple-whip-client) or the
    WebSocket, until it is told to end (SIGTERM) once the viewer is done. "whep": the viewer's
    POST is answered before the publisher starts (it waits for a host); "whep-late": the
    publisher is up first. The viewer passes with 201, decoded audio and video and DELETE 200.
    `viewer_server`: the viewer POSTs there instead (another node of a cluster)."""
    vs = viewer_server or server
    http = http_base(vs.url)
    qroom = urllib.parse.quote(room, safe="")
    kind = sub.split("-")[0]
    if sub == "chromium-watch":
        # the page fetches its own development token (subscribe grant)
        vcmd = ["node", os.path.join(HERE, "chromium-watch.mjs"), "--page", f"{http}/watch?room={qroom}", "--timeout", str(CLIENT_TIMEOUT)]
    else:
        vcmd = CLIENTS[kind] + [
            "--url", vs.url, "--room", room, "--name", sub, "--timeout", str(CLIENT_TIMEOUT),
            "--token", dev_token(vs.url, room, sub, grants="subscribe"), "--whep", f"{http}/whep/{qroom}",
        ]  # fmt: skip
    if pub == "chromium" and kind == "aiortc":
        vcmd.append("--audio-rtp-ok")  # as chromium -> aiortc: see run_foreign_pair
    whip = pub in ("gstreamer-whip", "simple-whip-client")
    if not whip:
        pcmd = client_cmd(pub, server.url, room, f"{pub}-pub", publish=True, until_signal=True)
        ready = "track_published"
    hard = CLIENT_TIMEOUT + 15
    why = []

    def start_pub():
        if whip:
            return start_whip_publisher(server, pub, room)
        return Proc(f"{room}-pub-{pub}", pcmd, hard), ready

    if order == "whep":
        v = Proc(f"{room}-sub-{sub}", vcmd, hard)
        if not wait_log(v, "WHEP session", 15):
            why.append("the viewer's POST was not answered within 15 s")
        p, _ = start_pub()
    else:
        p, ready = start_pub()
        up = p.wait_for(ready, 20) if isinstance(p, LineProc) else wait_log(p, ready, 20)
        if not up:
            why.append(f"the publisher never logged {ready!r} within 20 s")
        v = Proc(f"{room}-sub-{sub}", vcmd, hard)
    vrc = v.wait()
    p.terminate()
    prc = p.wait()
    vr, pr = v.result(), publisher_result(server, p, prc)
    ok = vrc == 0 and prc == 0 and bool(vr and vr.get("ok")) and bool(pr and pr.get("ok")) and not why
    extra = {}
    if vr:
        extra["answer_ms"] = vr.get("answer_ms")
        extra["post_to_media_ms"] = vr.get("first_media_ms")
        firsts = {t["kind"]: t["first_mono"] for t in vr.get("tracks", {}).values() if "first_mono" in t}
        if "video" in firsts and vr.get("post_mono"):
            extra["post_to_video_ms"] = round((firsts["video"] - vr["post_mono"]) * 1000)
        if order == "whep" and pr and pr.get("post_mono") and firsts:
            # both clients run on this machine: CLOCK_MONOTONIC is one clock
            if "audio" in firsts:  # chromium-watch stamps its first video frame only
                extra["whip_post_to_media_ms"] = round((min(firsts.values()) - pr["post_mono"]) * 1000)
            if "video" in firsts:
                extra["whip_post_to_video_ms"] = round((firsts["video"] - pr["post_mono"]) * 1000)
            if "start_to_post_ms" in pr:
                # simple-whip-client: from its process start to its POST (pipeline, offer)
                extra["whip_start_to_post_ms"] = pr["start_to_post_ms"]
    if pr and sub in pr.get("joined_seen", []):
        # a WHEP viewer is a hidden participant: nobody is told it joined
        ok = False
        why.append(f"the publisher was told that {sub} joined")
    detail = "; ".join(why + [f"sub: {summary(vr)} | pub: {summary(pr)}"])
    return ok, detail, extra, [p.log_path, v.log_path]


class Cluster:
    """Two Plaza nodes on one redis-server; a room with one participant spans both."""

    def __init__(self, host_ip):
        self.redis = Redis()
        args = ["--redis", self.redis.url, "--cluster-span-above", "1", "--workers", "1"]
        self.a = Server(host_ip, "plaza-node-a", [*args, "--node-id", "ND_a"])
        self.b = Server(host_ip, "plaza-node-b", [*args, "--node-id", "ND_b"])
        deadline = time.monotonic() + 15
        while not all(self.links_up(n) for n in (self.a, self.b)):
            if time.monotonic() > deadline:
                raise SystemExit("foreign-tests: the two cluster nodes did not link within 15 s")
            time.sleep(0.1)

    @staticmethod
    def stats(n):
        with urllib.request.urlopen(f"{http_base(n.url)}/stats", timeout=2) as r:
            return json.loads(r.read())["cluster"]

    def links_up(self, n):
        try:
            return self.stats(n)["link_peers_up"] == 1
        except OSError:
            return False

    def stop(self):
        for s in (self.a, self.b):
            s.stop()
        self.redis.stop()


def run_span(cluster, pub, sub, order, room):
    """The publisher joins through node A; the subscriber through node B, which extends the room
    (no redirect: B's `extended_joins` grows by one) and receives the publisher's media over the
    node link. "span": both on the WebSocket (the subscriber decodes the media and says `done` on
    chat, which crosses back to A); "span-whep": a WHIP publisher and a WHEP viewer."""
    before = Cluster.stats(cluster.b)["extended_joins"]
    # The room goes to A (both nodes are idle: either could be chosen, and these clients do not
    # follow redirects): its lease is written first, as A's; A renews it once the room is open.
    reply = cluster.redis.command("SET", f"plaza:room:{room}", "ND_a", "PX", "10000")
    if reply != "+OK":
        return False, f"could not place the room on node A: {reply}", {}, []
    if order == "span-whep":
        ok, detail, extra, logs = run_whep_viewer(cluster.a, pub, sub, "whep-late", room, viewer_server=cluster.b)
    else:
        hard = CLIENT_TIMEOUT + 10
        pcmd = client_cmd(pub, cluster.a.url, room, f"{pub}-pub", publish=True, peer=f"{sub}-sub")
        p = Proc(f"{room}-pub-{pub}", pcmd, hard)
        if not wait_log(p, "track_published", 20):
            p.terminate()
        scmd = client_cmd(sub, cluster.b.url, room, f"{sub}-sub", expect_from=f"{pub}-pub", peer=f"{pub}-pub")
        s = Proc(f"{room}-sub-{sub}", scmd, hard)
        src, prc = s.wait(), p.wait()
        sr, pr = s.result(), p.result()
        ok = src == 0 and prc == 0 and bool(sr and sr.get("ok")) and bool(pr and pr.get("ok"))
        detail, extra, logs = f"sub: {summary(sr)} | pub: {summary(pr)}", {}, [p.log_path, s.log_path]
    served = Cluster.stats(cluster.b)["extended_joins"] - before
    if served != 1:
        ok = False
        detail = f"node B served {served} extended joins, not 1 (the subscriber was redirected?) | " + detail
    return ok, detail, extra, logs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host-ip", required=True, help="address of a non-loopback interface in this namespace")
    ap.add_argument("--only", action="append", default=[], help="run combinations whose label contains this")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    os.makedirs(ART, exist_ok=True)
    combos = []
    for pub, sub, order in COMBINATIONS:
        if order == "offer-without-ssrc":
            label = "gstreamer offer without a=ssrc"
        elif order in ("whip", "whep"):
            label = f"{pub} -> {sub}"
        elif order in ("span", "span-whep"):
            label = f"{pub} -> {sub} (two nodes)"
        elif order == "whep-late":
            label = f"{pub} -> {sub} (late join)"
        else:
            label = f"{pub} -> {sub}" + (" (late join)" if order == "pub-first" and "webrtc-rs" not in (pub, sub) else "")
        if not args.only or any(o in label for o in args.only):
            combos.append((label, pub, sub, order))
    if args.list:
        for c in combos:
            print(c[0])
        return 0
    if not combos:
        print("foreign-tests: no combination matches --only", file=sys.stderr)
        return 1
    for path in (PLAZA, LOADTEST if any("webrtc-rs" in c[0] for c in combos) else PLAZA, PY):
        if not os.access(path, os.X_OK):
            print(f"foreign-tests: FAILED: {path} is missing", file=sys.stderr)
            return 1
    if any(c[1] == "simple-whip-client" for c in combos):
        stub = os.path.join(UPNP_STUB_DIR, "libgupnp-igd-1.0.so.4")
        for path, what in ((WHIP_CLIENT, "apt-get install simple-whip-client"), (stub, "cc ... tests/foreign/upnp-stub.c, see there")):
            if not os.path.exists(path):
                print(f"foreign-tests: FAILED: {path} is missing ({what})", file=sys.stderr)
                return 1
    server = Server(args.host_ip)
    print(f"plaza on {server.url}, media on {args.host_ip}:{server.udp_port}; logs in {ART}", flush=True)
    cluster = None
    rows = []
    try:
        for i, (label, pub, sub, order) in enumerate(combos):
            room = f"c{i}-{pub}-{sub or order}"
            t = time.monotonic()
            if order in ("span", "span-whep"):
                if cluster is None:
                    cluster = Cluster(args.host_ip)
                ok, detail, extra, logs = run_span(cluster, pub, sub, order, room)
            elif order == "offer-without-ssrc":
                ok, detail, extra, logs = run_gst_offer_without_ssrc(server, room)
            elif order == "whip":
                ok, detail, extra, logs = run_whip_publisher(server, pub, sub, room)
            elif order in ("whep", "whep-late"):
                ok, detail, extra, logs = run_whep_viewer(server, pub, sub, order, room)
            elif pub == "webrtc-rs":
                ok, detail, extra, logs = run_rs_publisher(server, sub, room)
            elif sub == "webrtc-rs":
                ok, detail, extra, logs = run_rs_subscriber(server, pub, room)
            else:
                ok, detail, extra, logs = run_foreign_pair(server, pub, sub, order, room)
            dt = time.monotonic() - t
            rows.append((label, ok, dt, detail, extra, logs))
            print(f"{'PASS' if ok else 'FAIL'}  {label:<46} {dt:5.1f} s  {detail if not ok else ''}", flush=True)
    finally:
        server.stop()
        if cluster is not None:
            cluster.stop()
    print("\nforeign clients against Plaza")
    print(f"{'combination':<48}{'result':<8}{'time':>7}  notes")
    for label, ok, dt, detail, extra, logs in rows:
        notes = ", ".join(f"{k}={v}" for k, v in extra.items() if v is not None)
        print(f"{label:<48}{'PASS' if ok else 'FAIL':<8}{dt:6.1f}s  {notes}")
        if not ok:
            print(f"    {detail[:600]}")
            print(f"    logs: {' '.join(os.path.relpath(p, ROOT) for p in logs)}")
    passed = sum(1 for r in rows if r[1])
    failed = len(rows) - passed
    print(f"\nforeign: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
