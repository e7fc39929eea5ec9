"""A Plaza participant built on GStreamer's webrtcbin (ICE by libnice), talking the signaling
protocol of signaling/README.md.

    python gst_client.py --url ws://H:P/rtc --room R --name N --token JWT [--publish] [--expect-from NAME]
                         [--peer NAME] [--until-signal] [--media-only] [--timeout S] [--offer-without-caps]
                         [--whip http://H:P/whip/R | --whep http://H:P/whep/R]

Every participant answers the server's subscribe offers on a receive-only webrtcbin and says
hello on the `chat` data channel. With --publish it also publishes `videotestsrc ! vp8enc` and
`audiotestsrc ! opusenc` on a second webrtcbin. With --expect-from NAME it checks that GStreamer
*decodes* NAME's media (decodebin: raw video buffers with a size, raw 48 kHz audio buffers) and
receives NAME's chat (not with --media-only, for a publisher that says nothing), then sends `done` on chat and leaves. A publisher leaves when --peer sends
`done`. Prints `RESULT {json}` and exits 0 on success, 1 on failure or timeout.

The publisher's offer: webrtcbin fires on-negotiation-needed as soon as the sink pads are linked,
before the payloaders have negotiated caps, and an offer made then has no a=ssrc (webrtcbin only
writes a=ssrc from the caps' `ssrc` field). This client therefore pins the caps on each
transceiver (codec-preferences with payload type and ssrc) and creates the offer only once both
sink pads carry caps. --offer-without-caps instead pins codecs without ssrc and offers before
any caps: the offer then has no a=ssrc, no a=rid and no RTP header extensions, with the audio
m-section `a=bundle-only` (port 0). Nobody can demultiplex its RTP, so the server must refuse
it with `invalid_sdp` naming that m-section (or, should it ever learn to, publish both tracks);
with this flag the client passes in either case and fails when the server does neither.

With --whip ENDPOINT it publishes the same pipeline over WHIP (RFC 9725) instead: no WebSocket,
one `POST` of the offer (`application/sdp`, the token as bearer token), the `201`'s answer applied
(its candidates with it: the server is ICE-lite and does not trickle), and once the connection
is up, with --until-signal, it waits for SIGTERM and ends the session with `DELETE`. It passes
when the `POST` got 201 with a `Location` and an `ETag`, the connection came up and the
`DELETE` got 200.

With --whep ENDPOINT it plays the room over WHEP instead (no WebSocket either): a webrtcbin with
two `recvonly` transceivers (Opus audio, VP8 video), its offer `POST`ed with the token (which
needs the subscribe grant), the `201`'s answer applied, the media decoded by `decodebin` as in
the subscriber above (raw 48 kHz audio buffers, raw video buffers with a size), then `DELETE`.
It passes when the `POST` got 201 with a `Location`, both m-sections decoded enough buffers and the
`DELETE` got 200; it fails when nothing decodes within --timeout. Its RESULT carries
CLOCK_MONOTONIC timestamps (`post_mono`, and per track `first_rtp_mono`, `first_mono`: the
first decoded buffer), as the WHIP publisher's carries its `post_mono`, so that a runner on the
same machine can measure the time from one to the other.

libnice ignores loopback interfaces: run it where a non-loopback interface carries an address the
server is reachable on (scripts/foreign-tests.sh adds 127.0.0.2 on a veth pair).
"""

import argparse
import asyncio
import json
import os
import signal
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstWebRTC", "1.0")
gi.require_version("GstSdp", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

import websockets  # noqa: E402

T0 = time.monotonic()
VIDEO_PT, AUDIO_PT = 96, 111
TWCC_EXT, TWCC_URI = 3, "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"


def parse_sdp(sdp):
    out, cur = {}, None
    for line in sdp.splitlines():
        if line.startswith("m="):
            cur = {"kind": line[2:].split(" ")[0], "msid": None}
        elif cur is not None and line.startswith("a=mid:"):
            out[line[6:].strip()] = cur
        elif cur is not None and line.startswith("a=msid:"):
            cur["msid"] = line[7:].strip().split(" ")
    return out


def promise_wait(element, action, *args):
    """Emit a webrtcbin action that takes a promise last; wait for and return its reply."""
    promise = Gst.Promise.new()
    element.emit(action, *args, promise)
    if promise.wait() != Gst.PromiseResult.REPLIED:
        raise RuntimeError(f"{action}: promise not replied")
    reply = promise.get_reply()
    if reply is not None and reply.has_field("error"):
        raise RuntimeError(f"{action}: {reply.get_value('error')}")
    return reply


def sdp_desc(kind, text):
    res, msg = GstSdp.SDPMessage.new_from_text(text)
    if res != GstSdp.SDPResult.OK:
        raise RuntimeError(f"cannot parse SDP: {res}")
    return GstWebRTC.WebRTCSessionDescription.new(kind, msg)


def http_request(method, url, body=b"", headers=None):
    """One HTTP request: (status, headers, body text); an error status is a result, not an exception."""
    req = urllib.request.Request(url, data=body if method in ("POST", "PATCH") else None, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode("utf-8", "replace")


class Client:
    def __init__(self, args):
        self.args = args
        self.loop = asyncio.get_running_loop()
        self.names = {}
        self.my_id = None
        self.mids = {}
        self.chat = None
        self.result = {"client": "gstreamer", "name": args.name, "errors": [], "tracks": {}, "chat_from": [], "own_tracks": [], "joined_seen": []}
        self.done = self.loop.create_future()
        self.done_sent = False
        self.ws = None
        self.lock = threading.Lock()
        self.sub_pipe = Gst.Pipeline.new("sub")
        self.sub = Gst.ElementFactory.make("webrtcbin", "subrtc")
        self.sub.set_property("bundle-policy", GstWebRTC.WebRTCBundlePolicy.MAX_BUNDLE)
        self.sub_pipe.add(self.sub)
        self.pub_pipe = None
        self.pub = None

    def log(self, *m):
        print(f"[gst {self.args.name} +{time.monotonic() - T0:.2f}s]", *m, file=sys.stderr, flush=True)

    def finish(self, ok, why):
        def set_it():
            if not self.done.done():
                self.done.set_result((ok, why))

        self.loop.call_soon_threadsafe(set_it)

    def send_threadsafe(self, msg):
        asyncio.run_coroutine_threadsafe(self.ws.send(json.dumps(msg)), self.loop)

    def watch_bus(self, pipe, label):
        bus = pipe.get_bus()
        bus.add_signal_watch()

        def on_msg(_bus, msg):
            if msg.type == Gst.MessageType.ERROR:
                err, dbg = msg.parse_error()
                self.log(f"{label} pipeline error from {msg.src.get_name()}: {err.message} ({dbg})")
                self.finish(False, f"{label} pipeline error: {err.message}")
            elif msg.type == Gst.MessageType.WARNING:
                err, _ = msg.parse_warning()
                self.log(f"{label} pipeline warning from {msg.src.get_name()}: {err.message}")

        bus.connect("message", on_msg)

    def on_state(self, label, element):
        state = element.get_property("connection-state")
        self.log(label, "PC", state.value_nick)
        if state == GstWebRTC.WebRTCPeerConnectionState.FAILED:
            self.finish(False, f"{label} PC failed (ICE/DTLS)")

    # ---- subscriber webrtcbin ----
    def setup_sub(self):
        self.sub.connect("pad-added", self.on_sub_pad)
        self.sub.connect("on-data-channel", self.on_data_channel)
        self.sub.connect("notify::connection-state", lambda e, _p: self.on_state("subscriber", e))
        self.watch_bus(self.sub_pipe, "subscriber")
        self.sub_pipe.set_state(Gst.State.PLAYING)

    def on_sub_pad(self, _element, pad):
        if pad.get_direction() != Gst.PadDirection.SRC:
            return
        trans = pad.get_property("transceiver")
        mid = trans.get_property("mid") if trans is not None else None
        m = self.mids.get(mid, {})
        msid = m.get("msid") or [None, None]
        st = {
            "mid": mid, "kind": m.get("kind"), "from": self.names.get(msid[0], msid[0]), "track_id": msid[1], "buffers": 0, "caps": None,
            "first_rtp_mono": time.monotonic(),
        }  # fmt: skip
        with self.lock:
            self.result["tracks"][f"mid{mid}"] = st
        self.log("pad added mid", mid, st["kind"], "from", st["from"], pad.get_current_caps().to_string() if pad.get_current_caps() else "")
        dec = Gst.ElementFactory.make("decodebin")
        sink = Gst.ElementFactory.make("fakesink")
        sink.set_property("sync", False)
        sink.set_property("async", False)
        self.sub_pipe.add(dec)
        self.sub_pipe.add(sink)

        def on_dec_pad(_dec, dpad):
            caps = dpad.get_current_caps() or dpad.query_caps(None)
            s = caps.get_structure(0)
            st["caps"] = s.get_name()
            if s.get_name().startswith("video/"):
                st["width"], st["height"] = s.get_value("width"), s.get_value("height")
            elif s.get_name().startswith("audio/"):
                st["rate"] = s.get_value("rate")

            def probe(_pad, _info):
                if st["buffers"] == 0:
                    st["first_mono"] = time.monotonic()
                    self.log(f"first decoded {st['kind']} buffer (mid {mid})")
                st["buffers"] += 1
                if st["buffers"] % 10 == 0:
                    self.loop.call_soon_threadsafe(self.check)
                return Gst.PadProbeReturn.OK

            dpad.add_probe(Gst.PadProbeType.BUFFER, probe)
            dpad.link(sink.get_static_pad("sink"))

        dec.connect("pad-added", on_dec_pad)
        dec.sync_state_with_parent()
        sink.sync_state_with_parent()
        pad.link(dec.get_static_pad("sink"))

    def on_data_channel(self, _element, channel):
        label = channel.get_property("label")
        self.log("data channel", label)
        if label != "chat":
            return
        self.chat = channel

        def on_message(_ch, text):
            head, _, body = text.partition("\n")
            sender = self.names.get(json.loads(head).get("from"), "?")
            entry = f"{sender}:{body}"
            with self.lock:
                if entry not in self.result["chat_from"]:
                    self.result["chat_from"].append(entry)
            self.loop.call_soon_threadsafe(self.check)

        channel.connect("on-message-string", on_message)

    def chat_open(self):
        return self.chat is not None and self.chat.get_property("ready-state") == GstWebRTC.WebRTCDataChannelState.OPEN

    async def hello_loop(self):
        while True:
            await asyncio.sleep(0.4)
            if self.chat_open():
                self.chat.emit("send-string", f"{{}}\nhello from {self.args.name}")

    def answer(self, sdp):
        """Runs in a worker thread (promise waits block)."""
        self.mids.update(parse_sdp(sdp))
        promise_wait(self.sub, "set-remote-description", sdp_desc(GstWebRTC.WebRTCSDPType.OFFER, sdp))
        reply = promise_wait(self.sub, "create-answer", None)
        answer = reply.get_value("answer")
        promise_wait(self.sub, "set-local-description", answer)
        return answer.sdp.as_text()

    # ---- publisher webrtcbin ----
    def build_pub(self):
        self.pub_pipe = Gst.parse_launch(
            "webrtcbin name=pubrtc bundle-policy=max-bundle "
            "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=30/1 ! videoconvert ! "
            "vp8enc deadline=1 keyframe-max-dist=30 target-bitrate=300000 ! "
            f"rtpvp8pay name=vpay pt={VIDEO_PT} picture-id-mode=15-bit ! queue ! pubrtc.sink_0 "
            "audiotestsrc is-live=true wave=sine freq=440 ! audioconvert ! audioresample ! "
            f"opusenc ! rtpopuspay name=apay pt={AUDIO_PT} ! queue ! pubrtc.sink_1"
        )
        self.pub = self.pub_pipe.get_by_name("pubrtc")
        self.pub.connect("notify::connection-state", lambda e, _p: self.on_state("publisher", e))
        self.watch_bus(self.pub_pipe, "publisher")
        ssrcs = {"video": random.randrange(1, 2**31), "audio": random.randrange(1, 2**31)}
        self.pub_pipe.get_by_name("vpay").set_property("ssrc", ssrcs["video"])
        self.pub_pipe.get_by_name("apay").set_property("ssrc", ssrcs["audio"])
        caps = {
            "video": f"application/x-rtp,media=video,encoding-name=VP8,payload={VIDEO_PT},clock-rate=90000,ssrc=(uint){ssrcs['video']}",
            "audio": (
                f"application/x-rtp,media=audio,encoding-name=OPUS,payload={AUDIO_PT},clock-rate=48000,"
                f"encoding-params=(string)2,ssrc=(uint){ssrcs['audio']}"
            ),
        }
        for i, kind in enumerate(["video", "audio"]):
            pad = self.pub.get_static_pad(f"sink_{i}")
            pad.set_property("msid", f"gst-{self.args.name}")
            trans = pad.get_property("transceiver")
            trans.set_property("direction", GstWebRTC.WebRTCRTPTransceiverDirection.SENDONLY)
            if self.args.offer_without_caps:
                # codecs but no ssrc: webrtcbin need not wait for caps and writes no a=ssrc
                caps[kind] = caps[kind].split(",ssrc=")[0]
            trans.set_property("codec-preferences", Gst.Caps.from_string(caps[kind]))
        self.negotiation_needed = threading.Event()
        self.pub.connect("on-negotiation-needed", lambda _e: self.negotiation_needed.set())

    def make_offer(self):
        """Runs in a worker thread: wait for negotiation-needed (and caps), create the offer."""
        if self.args.offer_without_caps:
            # PAUSED: the live sources produce nothing yet, so no caps reach webrtcbin: the offer
            # an application gets when it offers as soon as its pads are linked.
            self.pub_pipe.set_state(Gst.State.PAUSED)
        else:
            self.pub_pipe.set_state(Gst.State.PLAYING)
        if not self.args.offer_without_caps:
            if not self.negotiation_needed.wait(10):
                raise RuntimeError("webrtcbin never asked for negotiation")
            deadline = time.monotonic() + 10
            pads = [self.pub.get_static_pad("sink_0"), self.pub.get_static_pad("sink_1")]
            while not all(p.get_current_caps() for p in pads):
                if time.monotonic() > deadline:
                    raise RuntimeError("the sink pads never got caps")
                time.sleep(0.02)
        reply = promise_wait(self.pub, "create-offer", None)
        offer = reply.get_value("offer")
        promise_wait(self.pub, "set-local-description", offer)
        self.pub_pipe.set_state(Gst.State.PLAYING)
        return offer.sdp.as_text()

    # ---- checks ----
    def chat_from(self, name, body=None):
        with self.lock:
            return any((c == f"{name}:{body}") if body else c.startswith(f"{name}:") for c in self.result["chat_from"])

    def media_ok(self):
        with self.lock:
            ts = [t for t in self.result["tracks"].values() if self.args.whep or t["from"] == self.args.expect_from]
        audio = [t for t in ts if t["kind"] == "audio"]
        video = [t for t in ts if t["kind"] == "video"]
        for t in audio + video:
            if t["caps"] and not t["caps"].startswith(t["kind"] + "/"):
                self.finish(False, f"the {t['kind']} m-section decodes to {t['caps']}: {json.dumps(t)}")
        if len(audio) != 1 or len(video) != 1:
            return False
        a, v = audio[0], video[0]
        return a["buffers"] >= 50 and a.get("rate") == 48000 and v["buffers"] >= 20 and (v.get("width") or 0) > 0

    def on_sigterm(self):
        ok = bool(self.args.publish and len(self.result["own_tracks"]) >= 2 and (not self.args.peer or self.chat_from(self.args.peer)))
        progress = {k: self.result[k] for k in ("tracks", "chat_from", "own_tracks", "errors")}
        self.finish(ok, f"stopped by SIGTERM: {json.dumps(progress)}")

    def check(self):
        a = self.args
        if a.whep:
            if self.media_ok():
                self.finish(True, "decoded audio and video over WHEP")
        elif a.expect_from:
            if not self.done_sent and self.media_ok() and (a.media_only or self.chat_from(a.expect_from)) and (a.media_only or self.chat_open()):
                self.done_sent = True
                if self.chat_open():
                    self.chat.emit("send-string", "{}\ndone")
                self.loop.call_later(0.3, self.finish, True, f"decoded media and chat from {a.expect_from}")
        elif a.publish and a.offer_without_caps:
            if len(self.result["own_tracks"]) >= 2:
                self.finish(True, f"the server demultiplexed the offer without a=ssrc: published {self.result['own_tracks']}")
        elif a.publish:
            if a.until_signal:
                return
            if len(self.result["own_tracks"]) >= 2 and (not a.peer or self.chat_from(a.peer, "done")):
                self.finish(True, f"published {', '.join(self.result['own_tracks'])}; {a.peer} said done")
        elif a.peer and self.chat_from(a.peer):
            self.finish(True, f"chat from {a.peer}")

    async def signaling(self):
        try:
            await self.signaling_loop()
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            self.finish(False, f"signaling failed: {type(e).__name__}: {e}")

    async def signaling_loop(self):
        async for raw in self.ws:
            msg = json.loads(raw)
            t = msg["type"]
            if t == "joined":
                self.my_id = msg["participant_id"]
                self.result["participant_id"] = self.my_id
                self.names[self.my_id] = self.args.name
                for p in msg["participants"]:
                    self.names[p["id"]] = p["name"]
                    self.result["joined_seen"].append(p["name"])
                self.log("joined as", self.my_id)
                if self.args.publish:
                    self.build_pub()
                    sdp = await asyncio.to_thread(self.make_offer)
                    self.result["offer_has_msid"] = "\na=msid:" in sdp
                    self.result["offer_has_ssrc"] = "\na=ssrc:" in sdp
                    self.log("publish offer: a=msid", self.result["offer_has_msid"], "a=ssrc", self.result["offer_has_ssrc"])
                    if os.environ.get("FOREIGN_DEBUG"):
                        self.log("offer:\n" + sdp)
                    await self.ws.send(json.dumps({"type": "publish_offer", "sdp": sdp}))
            elif t == "participant_joined":
                self.names[msg["participant"]["id"]] = msg["participant"]["name"]
                self.result["joined_seen"].append(msg["participant"]["name"])
            elif t == "subscribe_offer":
                sdp = await asyncio.to_thread(self.answer, msg["sdp"])
                if os.environ.get("FOREIGN_DEBUG"):
                    self.log("subscribe offer:\n" + msg["sdp"] + "\nsubscribe answer:\n" + sdp)
                await self.ws.send(json.dumps({"type": "subscribe_answer", "sdp": sdp}))
            elif t == "publish_answer":
                self.result["publish_answer"] = True
                await asyncio.to_thread(
                    promise_wait, self.pub, "set-remote-description", sdp_desc(GstWebRTC.WebRTCSDPType.ANSWER, msg["sdp"])
                )
            elif t == "track_published":
                self.log("track_published", json.dumps(msg["track"]))
                if msg["track"]["participant_id"] == self.my_id:
                    self.result["own_tracks"].append(f"{msg['track']['kind']}:{msg['track']['mime_type']}")
                self.check()
            elif t == "error":
                self.log("server error", json.dumps(msg))
                self.result["errors"].append(msg)
                if msg.get("request") == "publish_offer":
                    if self.args.offer_without_caps and msg.get("code") == "invalid_sdp" and any(m in msg.get("message", "") for m in ("video0", "audio1")):
                        self.finish(True, f"the server refused the offer without a=ssrc, naming the m-section: {msg.get('message')}")
                    else:
                        self.finish(False, f"server refused the publish offer: {msg.get('code')}: {msg.get('message')}")
            elif t == "leave":
                self.finish(False, f"removed by the server: {msg.get('reason')}")
        self.finish(False, "WebSocket closed")

    async def run(self):
        self.loop.add_signal_handler(signal.SIGTERM, self.on_sigterm)
        glib_loop = GLib.MainLoop()
        threading.Thread(target=glib_loop.run, daemon=True).start()
        self.setup_sub()
        async with websockets.connect(self.args.url, max_size=None) as ws:
            self.ws = ws
            await ws.send(json.dumps({"type": "join", "room": self.args.room, "name": self.args.name, "token": self.args.token, "protocol": 1}))
            tasks = [asyncio.ensure_future(self.signaling()), asyncio.ensure_future(self.hello_loop())]
            try:
                ok, why = await asyncio.wait_for(asyncio.shield(self.done), self.args.timeout)
            except asyncio.TimeoutError:
                with self.lock:
                    progress = {k: self.result[k] for k in ("tracks", "chat_from", "own_tracks", "errors")}
                ok, why = False, f"timed out after {self.args.timeout} s: {json.dumps(progress)}"
                if self.args.offer_without_caps and self.result.get("publish_answer"):
                    why = (
                        "the server answered the offer without a=ssrc (publish_answer, no error) but published no track "
                        f"within {self.args.timeout} s: it accepted RTP it cannot demultiplex"
                    )
            try:
                await ws.send(json.dumps({"type": "leave"}))
            except Exception:
                pass
            for t in tasks:
                t.cancel()
        self.result.update(ok=ok, reason=why)
        self.log("PASS" if ok else "FAIL", why)
        print("RESULT " + json.dumps(self.result), flush=True)
        # Tearing webrtcbin down can block on libnice threads; the result is out, so leave hard.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if ok else 1)


    async def run_whip(self):
        """Publish over WHIP: POST the offer, apply the answer, wait for the connection; with
        --until-signal stay until SIGTERM; DELETE the session."""
        stop = self.loop.create_future()
        self.loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
        glib_loop = GLib.MainLoop()
        threading.Thread(target=glib_loop.run, daemon=True).start()
        ok, why = False, ""
        try:
            self.build_pub()
            sdp = await asyncio.to_thread(self.make_offer)
            headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {self.args.token}"}
            t0 = time.monotonic()
            self.result["post_mono"] = t0
            status, rh, body = await asyncio.to_thread(http_request, "POST", self.args.whip, sdp.encode(), headers)
            self.result["whip_post"] = status
            if status != 201:
                raise RuntimeError(f"POST {self.args.whip}: {status} {body.strip()}")
            rh = {k.lower(): v for k, v in rh.items()}
            if not rh.get("location") or not rh.get("etag"):
                raise RuntimeError(f"201 without Location or ETag: {rh}")
            location = urllib.parse.urljoin(self.args.whip, rh["location"])
            self.log("WHIP session", location, "ETag", rh["etag"])
            await asyncio.to_thread(promise_wait, self.pub, "set-remote-description", sdp_desc(GstWebRTC.WebRTCSDPType.ANSWER, body))
            deadline = time.monotonic() + self.args.timeout
            while self.pub.get_property("connection-state") != GstWebRTC.WebRTCPeerConnectionState.CONNECTED:
                if self.done.done():
                    raise RuntimeError(self.done.result()[1])
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not connected within {self.args.timeout} s of the POST")
                await asyncio.sleep(0.05)
            self.result["connect_ms"] = round((time.monotonic() - t0) * 1000)
            self.log(f"WHIP publisher connected {self.result['connect_ms']} ms after the POST")
            if self.args.until_signal:
                await asyncio.wait_for(stop, self.args.timeout)
            status, _, body = await asyncio.to_thread(http_request, "DELETE", location, b"", {"Authorization": f"Bearer {self.args.token}"})
            self.result["whip_delete"] = status
            if status != 200:
                raise RuntimeError(f"DELETE {location}: {status} {body.strip()}")
            ok, why = True, f"published over WHIP (201, connected in {self.result['connect_ms']} ms, DELETE 200)"
        except asyncio.TimeoutError:
            why = f"no SIGTERM within {self.args.timeout} s"
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            why = f"{type(e).__name__}: {e}"
        self.result.update(ok=ok, reason=why)
        self.log("PASS" if ok else "FAIL", why)
        print("RESULT " + json.dumps(self.result), flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if ok else 1)

    async def run_whep(self):
        """Play over WHEP: recvonly transceivers, POST the offer, apply the answer, decode until
        media_ok (or the timeout), DELETE the session."""
        glib_loop = GLib.MainLoop()
        threading.Thread(target=glib_loop.run, daemon=True).start()
        ok, why, location = False, "", None
        headers = {"Authorization": f"Bearer {self.args.token}"}
        try:
            self.setup_sub()
            # transport-wide CC (a=extmap): the server's layer selection runs on the viewer's
            # bandwidth estimate, which it gets from TWCC feedback
            twcc = f"extmap-{TWCC_EXT}=(string){TWCC_URI}"
            caps = {
                "audio": f"application/x-rtp,media=audio,encoding-name=OPUS,payload={AUDIO_PT},clock-rate=48000,encoding-params=(string)2,{twcc}",
                "video": (
                    f"application/x-rtp,media=video,encoding-name=VP8,payload={VIDEO_PT},clock-rate=90000,"
                    f"rtcp-fb-nack-pli=(boolean)true,rtcp-fb-nack=(boolean)true,{twcc}"
                ),
            }
            for kind in ("audio", "video"):
                self.sub.emit("add-transceiver", GstWebRTC.WebRTCRTPTransceiverDirection.RECVONLY, Gst.Caps.from_string(caps[kind]))

            def offer():
                reply = promise_wait(self.sub, "create-offer", None)
                desc = reply.get_value("offer")
                promise_wait(self.sub, "set-local-description", desc)
                return desc.sdp.as_text()

            sdp = await asyncio.to_thread(offer)
            if os.environ.get("FOREIGN_DEBUG"):
                self.log("WHEP offer:\n" + sdp)
            t0 = time.monotonic()
            self.result["post_mono"] = t0
            status, rh, body = await asyncio.to_thread(
                http_request, "POST", self.args.whep, sdp.encode(), {**headers, "Content-Type": "application/sdp"}
            )
            self.result["whep_post"] = status
            if status != 201:
                raise RuntimeError(f"POST {self.args.whep}: {status} {body.strip()}")
            rh = {k.lower(): v for k, v in rh.items()}
            if not rh.get("location"):
                raise RuntimeError(f"201 without Location: {rh}")
            location = urllib.parse.urljoin(self.args.whep, rh["location"])
            self.result["answer_ms"] = round((time.monotonic() - t0) * 1000)
            self.log("WHEP session", location, f"answered in {self.result['answer_ms']} ms")
            if os.environ.get("FOREIGN_DEBUG"):
                self.log("WHEP answer:\n" + body)
            self.mids.update(parse_sdp(body))
            await asyncio.to_thread(promise_wait, self.sub, "set-remote-description", sdp_desc(GstWebRTC.WebRTCSDPType.ANSWER, body))
            try:
                ok, why = await asyncio.wait_for(asyncio.shield(self.done), self.args.timeout)
            except asyncio.TimeoutError:
                with self.lock:
                    progress = {k: self.result[k] for k in ("tracks", "errors")}
                state = self.sub.get_property("connection-state").value_nick
                why = f"nothing (or not enough) decoded within {self.args.timeout} s (PC {state}): {json.dumps(progress)}"
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            ok, why = False, f"{type(e).__name__}: {e}"
        if location:
            status, _, body = await asyncio.to_thread(http_request, "DELETE", location, b"", headers)
            self.result["whep_delete"] = status
            if status != 200 and ok:
                ok, why = False, f"DELETE {location}: {status} {body.strip()}"
        with self.lock:
            tracks = list(self.result["tracks"].values())
        firsts = [t["first_mono"] for t in tracks if "first_mono" in t]
        if firsts:
            self.result["first_media_ms"] = round((min(firsts) - self.result["post_mono"]) * 1000)
        if ok:
            why += f" (201, first media {self.result.get('first_media_ms')} ms after the POST, DELETE 200)"
        self.result.update(ok=ok, reason=why)
        self.log("PASS" if ok else "FAIL", why)
        print("RESULT " + json.dumps(self.result), flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if ok else 1)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--room", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--token", required=True, help="access token (JWT) for the join")
    p.add_argument("--publish", action="store_true")
    p.add_argument("--expect-from")
    p.add_argument("--peer")
    p.add_argument("--until-signal", action="store_true")
    p.add_argument("--media-only", action="store_true", help="do not wait for the publisher's chat")
    p.add_argument("--timeout", type=float, default=25)
    p.add_argument("--offer-without-caps", action="store_true")
    p.add_argument("--whip", help="publish over WHIP to this endpoint (http://H:P/whip/ROOM) instead of the WebSocket")
    p.add_argument("--whep", help="play over WHEP from this endpoint (http://H:P/whep/ROOM[/PARTICIPANT]) instead of the WebSocket")
    args = p.parse_args()
    Gst.init(None)
    client = Client(args)
    await (client.run_whip() if args.whip else client.run_whep() if args.whep else client.run())


if __name__ == "__main__":
    asyncio.run(main())
