"""A Plaza participant built on aiortc, talking the signaling protocol of signaling/README.md.

    python aiortc_client.py --url ws://H:P/rtc --room R --name N --token JWT [--publish] [--expect-from NAME]
                            [--peer NAME] [--until-signal] [--media-only] [--timeout S]
                            [--whep http://H:P/whep/R [--audio-rtp-ok]]

Every participant answers the server's subscribe offers and says hello on the `chat` data
channel. With --publish it also publishes the assets/ clips through aiortc's MediaPlayer (decoded
and re-encoded by aiortc: VP8 video, Opus audio). With --expect-from NAME it checks that aiortc
*decodes* NAME's media (video frames with a size, 48 kHz audio frames) and receives NAME's chat,
then sends `done` on chat and leaves. A publisher leaves when --peer sends `done` (with --until-signal: at
SIGTERM, passing if its tracks were published and --peer's chat arrived). Prints
`RESULT {json}` and exits 0 on success, 1 on failure or timeout.

With --whep ENDPOINT it plays the room over WHEP instead (no WebSocket): an RTCPeerConnection
with `recvonly` audio and video transceivers, its offer `POST`ed with the token (subscribe
grant), the `201`'s answer applied, then the frames decoded as above (video frames with a size,
48 kHz audio frames; with --audio-rtp-ok audio counts once 50 RTP packets arrived on its track),
and the session ended with `DELETE`. It passes on 201 with a `Location`, decoded media and
DELETE 200, and fails when nothing decodes within --timeout.
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "assets")
T0 = time.monotonic()


def parse_sdp(sdp):
    """mid -> {kind, msid} of every m-section."""
    out, cur = {}, None
    for line in sdp.splitlines():
        if line.startswith("m="):
            cur = {"kind": line[2:].split(" ")[0], "msid": None}
        elif cur is not None and line.startswith("a=mid:"):
            out[line[6:].strip()] = cur
        elif cur is not None and line.startswith("a=msid:"):
            cur["msid"] = line[7:].strip().split(" ")
    return out


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
        self.names = {}
        self.my_id = None
        self.mids = {}
        self.chat = None
        self.result = {"client": "aiortc", "name": args.name, "errors": [], "tracks": {}, "chat_from": [], "own_tracks": [], "joined_seen": []}
        self.done = asyncio.get_running_loop().create_future()
        self.done_sent = False
        self.sub = RTCPeerConnection()
        self.sub_connected = asyncio.Event()
        self.offers_answered = 0
        self.pub = None
        self.ws = None
        self.tasks = []

    def log(self, *m):
        print(f"[aiortc {self.args.name} +{time.monotonic() - T0:.2f}s]", *m, file=sys.stderr, flush=True)

    def finish(self, ok, why):
        if not self.done.done():
            self.done.set_result((ok, why))

    async def send(self, msg):
        await self.ws.send(json.dumps(msg))

    # ---- subscriber PC ----
    def setup_sub(self):
        @self.sub.on("track")
        def on_track(track):
            mid = next((t.mid for t in self.sub.getTransceivers() if t.receiver.track is track), None)
            m = self.mids.get(mid, {})
            msid = m.get("msid") or [None, None]
            st = {"mid": mid, "kind": track.kind, "from": self.names.get(msid[0], msid[0]), "track_id": msid[1], "frames": 0}
            self.result["tracks"][f"mid{mid}"] = st
            self.log("track mid", mid, track.kind, "from", st["from"])
            self.tasks.append(asyncio.ensure_future(self.consume(track, st)))

        @self.sub.on("datachannel")
        def on_dc(channel):
            self.log("data channel", channel.label)
            if channel.label != "chat":
                return
            self.chat = channel

            @channel.on("message")
            def on_message(data):
                text = data.decode() if isinstance(data, bytes) else data
                head, _, body = text.partition("\n")
                sender = self.names.get(json.loads(head).get("from"), "?")
                entry = f"{sender}:{body}"
                if entry not in self.result["chat_from"]:
                    self.result["chat_from"].append(entry)
                self.check()

        @self.sub.on("connectionstatechange")
        def on_state():
            self.log("subscriber PC", self.sub.connectionState)
            if self.sub.connectionState == "connected":
                self.sub_connected.set()
            elif self.sub.connectionState == "failed":
                self.finish(False, "subscriber PC failed")

    async def consume(self, track, st):
        while True:
            try:
                frame = await track.recv()
            except Exception:
                return
            if st["frames"] == 0:
                st["first_mono"] = time.monotonic()
                self.log(f"first decoded {track.kind} frame (mid {st['mid']})")
            st["frames"] += 1
            if track.kind == "video":
                st["width"], st["height"] = frame.width, frame.height
            else:
                st["sample_rate"] = frame.sample_rate
                st["samples"] = st.get("samples", 0) + frame.samples
            self.check()

    async def answer(self, sdp):
        # aiortc 1.16 starts the receivers of a renegotiation only if the (bundled) DTLS transport
        # is "new" or "connected" when the answer is set: an offer applied while the first DTLS
        # handshake is still running leaves its tracks without receivers forever (no frames, no
        # error). So later offers wait until the subscriber PC has connected.
        if self.offers_answered > 0:
            await asyncio.wait_for(self.sub_connected.wait(), 10)
        self.offers_answered += 1
        self.mids.update(parse_sdp(sdp))
        await self.sub.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        await self.sub.setLocalDescription(await self.sub.createAnswer())
        await self.send({"type": "subscribe_answer", "sdp": self.sub.localDescription.sdp})

    async def hello_loop(self):
        while True:
            await asyncio.sleep(0.4)
            if self.chat is not None and self.chat.readyState == "open":
                self.chat.send(f"{{}}\nhello from {self.args.name}")

    # ---- publisher PC ----
    async def publish(self):
        self.pub = RTCPeerConnection()
        self.audio_player = MediaPlayer(os.path.join(ASSETS, "audio_sine_opus.ogg"), loop=True)
        self.video_player = MediaPlayer(os.path.join(ASSETS, "video_320x240_vp8.ivf"), loop=True)
        self.pub.addTransceiver(self.audio_player.audio, direction="sendonly")
        self.pub.addTransceiver(self.video_player.video, direction="sendonly")

        @self.pub.on("connectionstatechange")
        def on_state():
            self.log("publisher PC", self.pub.connectionState)
            if self.pub.connectionState == "failed":
                self.finish(False, "publisher PC failed")

        await self.pub.setLocalDescription(await self.pub.createOffer())
        sdp = self.pub.localDescription.sdp
        self.result["offer_has_msid"] = "\na=msid:" in sdp
        self.result["offer_has_ssrc"] = "\na=ssrc:" in sdp
        await self.send({"type": "publish_offer", "sdp": sdp})

    # ---- checks ----
    def chat_from(self, name, body=None):
        return any((c == f"{name}:{body}") if body else c.startswith(f"{name}:") for c in self.result["chat_from"])

    def media_ok(self):
        ts = [t for t in self.result["tracks"].values() if self.args.whep or t["from"] == self.args.expect_from]
        audio = [t for t in ts if t["kind"] == "audio"]
        video = [t for t in ts if t["kind"] == "video"]
        if len(audio) != 1 or len(video) != 1:
            return False
        a, v = audio[0], video[0]
        audio_ok = a["frames"] >= 50 and a.get("sample_rate") == 48000
        if self.args.audio_rtp_ok:
            audio_ok = audio_ok or a.get("rtp_packets", 0) >= 50
        return audio_ok and v["frames"] >= 20 and v.get("width", 0) > 0

    async def poll_rtp(self):
        """With --audio-rtp-ok: the RTP packets each receiver got, from its stats."""
        while True:
            await asyncio.sleep(0.25)
            for t in self.sub.getTransceivers():
                st = self.result["tracks"].get(f"mid{t.mid}")
                if st is None:
                    continue
                try:
                    stats = await t.receiver.getStats()
                except Exception:  # noqa: BLE001 - not started yet
                    continue
                st["rtp_packets"] = sum(
                    s.packetsReceived for s in stats.values() if s.type == "inbound-rtp"
                )
            self.check()

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
            if not self.done_sent and self.media_ok() and (a.media_only or self.chat_from(a.expect_from)):
                self.done_sent = True
                if self.chat is not None:
                    self.chat.send("{}\ndone")
                asyncio.get_running_loop().call_later(0.3, self.finish, True, f"decoded media and chat from {a.expect_from}")
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
                    await self.publish()
            elif t == "participant_joined":
                self.names[msg["participant"]["id"]] = msg["participant"]["name"]
                self.result["joined_seen"].append(msg["participant"]["name"])
            elif t == "subscribe_offer":
                await self.answer(msg["sdp"])
            elif t == "publish_answer":
                await self.pub.setRemoteDescription(RTCSessionDescription(sdp=msg["sdp"], type="answer"))
            elif t == "track_published":
                self.log("track_published", json.dumps(msg["track"]))
                if msg["track"]["participant_id"] == self.my_id:
                    self.result["own_tracks"].append(f"{msg['track']['kind']}:{msg['track']['mime_type']}")
                self.check()
            elif t == "error":
                self.log("server error", json.dumps(msg))
                self.result["errors"].append(msg)
            elif t == "leave":
                self.finish(False, f"removed by the server: {msg.get('reason')}")
        self.finish(False, "WebSocket closed")

    async def run(self):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.on_sigterm)
        self.setup_sub()
        async with websockets.connect(self.args.url, max_size=None) as ws:
            self.ws = ws
            await self.send({"type": "join", "room": self.args.room, "name": self.args.name, "token": self.args.token, "protocol": 1})
            tasks = [asyncio.ensure_future(self.signaling()), asyncio.ensure_future(self.hello_loop())]
            if self.args.audio_rtp_ok:
                tasks.append(asyncio.ensure_future(self.poll_rtp()))
            try:
                ok, why = await asyncio.wait_for(asyncio.shield(self.done), self.args.timeout)
            except asyncio.TimeoutError:
                progress = {k: self.result[k] for k in ("tracks", "chat_from", "own_tracks", "errors")}
                # What the receivers got on the wire, to tell "nothing arrived" from "not decoded".
                rtp = {}
                for t in self.sub.getTransceivers():
                    try:
                        stats = await t.receiver.getStats()
                        rtp[f"mid{t.mid}"] = [
                            {"ssrc": s.ssrc, "packets": s.packetsReceived}
                            for s in stats.values()
                            if s.type == "inbound-rtp"
                        ]
                    except Exception as e:  # noqa: BLE001 - diagnostics only
                        rtp[f"mid{t.mid}"] = repr(e)
                progress["rtp"] = rtp
                ok, why = False, f"timed out after {self.args.timeout} s: {json.dumps(progress)}"
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                ok, why = False, f"{type(e).__name__}: {e}"
            try:
                await self.send({"type": "leave"})
            except Exception:
                pass
            for t in tasks + self.tasks:
                t.cancel()
        await self.sub.close()
        if self.pub:
            await self.pub.close()
        self.result.update(ok=ok, reason=why)
        self.log("PASS" if ok else "FAIL", why)
        print("RESULT " + json.dumps(self.result), flush=True)
        return ok

    async def run_whep(self):
        """Play over WHEP: recvonly transceivers, POST the offer, apply the answer, decode until
        media_ok (or the timeout), DELETE the session."""
        # no STUN server: the server is ICE-lite, host candidates reach it
        self.sub = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        ok, why, location, tasks = False, "", None, []
        headers = {"Authorization": f"Bearer {self.args.token}"}
        try:
            @self.sub.on("track")
            def on_track(track):
                mid = next((t.mid for t in self.sub.getTransceivers() if t.receiver.track is track), None)
                st = {"mid": mid, "kind": track.kind, "from": None, "frames": 0}
                self.result["tracks"][f"mid{mid}"] = st
                self.log("track mid", mid, track.kind)
                self.tasks.append(asyncio.ensure_future(self.consume(track, st)))

            @self.sub.on("connectionstatechange")
            def on_state():
                self.log("viewer PC", self.sub.connectionState)
                if self.sub.connectionState == "failed":
                    self.finish(False, "viewer PC failed")

            self.sub.addTransceiver("audio", direction="recvonly")
            self.sub.addTransceiver("video", direction="recvonly")
            await self.sub.setLocalDescription(await self.sub.createOffer())
            sdp = self.sub.localDescription.sdp
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
            await self.sub.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
            if self.args.audio_rtp_ok:
                tasks.append(asyncio.ensure_future(self.poll_rtp()))
            try:
                ok, why = await asyncio.wait_for(asyncio.shield(self.done), self.args.timeout)
            except asyncio.TimeoutError:
                progress = {k: self.result[k] for k in ("tracks", "errors")}
                rtp = {}
                for t in self.sub.getTransceivers():
                    try:
                        stats = await t.receiver.getStats()
                        rtp[f"mid{t.mid}"] = [{"ssrc": s.ssrc, "packets": s.packetsReceived} for s in stats.values() if s.type == "inbound-rtp"]
                    except Exception as e:  # noqa: BLE001 - diagnostics only
                        rtp[f"mid{t.mid}"] = repr(e)
                progress["rtp"] = rtp
                why = f"nothing (or not enough) decoded within {self.args.timeout} s (PC {self.sub.connectionState}): {json.dumps(progress)}"
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            ok, why = False, f"{type(e).__name__}: {e}"
        if location:
            status, _, body = await asyncio.to_thread(http_request, "DELETE", location, b"", headers)
            self.result["whep_delete"] = status
            if status != 200 and ok:
                ok, why = False, f"DELETE {location}: {status} {body.strip()}"
        for t in tasks + self.tasks:
            t.cancel()
        await self.sub.close()
        firsts = [t["first_mono"] for t in self.result["tracks"].values() if "first_mono" in t]
        if firsts:
            self.result["first_media_ms"] = round((min(firsts) - self.result["post_mono"]) * 1000)
        if ok:
            why += f" (201, first media {self.result.get('first_media_ms')} ms after the POST, DELETE 200)"
        self.result.update(ok=ok, reason=why)
        self.log("PASS" if ok else "FAIL", why)
        print("RESULT " + json.dumps(self.result), flush=True)
        return ok


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
    p.add_argument(
        "--audio-rtp-ok",
        action="store_true",
        help="audio counts as received once 50 RTP packets arrived on its track (not decoded)",
    )
    p.add_argument("--whep", help="play over WHEP from this endpoint (http://H:P/whep/ROOM[/PARTICIPANT]) instead of the WebSocket")
    args = p.parse_args()
    if os.environ.get("FOREIGN_DEBUG"):
        logging.basicConfig(level=logging.DEBUG)
    c = Client(args)
    return await (c.run_whep() if args.whep else c.run())


if __name__ == "__main__":
    sys.exit(0 if asyncio.run(main()) else 1)
