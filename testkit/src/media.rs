//! Pre-encoded media for synthetic publishers: VP8 from IVF files, Opus from Ogg files.
//!
//! Nothing is encoded at run time. A clip is parsed once (and cached per path), then played in a
//! loop by a [`FrameCursor`] whose RTP timestamps keep running across the loop boundary, turned
//! into RTP packets by a [`MediaPacketizer`] (webrtc-rs's packetizer and payloaders), and paced at
//! the frame rate by [`run_pacer`] on a tokio interval: a frame's packets all at once, or spread
//! at a multiple of the clip's bitrate as a browser's pacer sends them ([`Pacing`]).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::Bytes;
use plaza::signal::TrackKind;
use rtc::rtp;
use rtc::rtp::packetizer::Packetizer;

/// Directory of the assets shipped with the repository (`assets/`, beside `testkit/`).
pub fn assets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets")
}

/// The default VP8 clip: 320x240, 30 fps, keyframe every 30 frames.
pub fn default_video_file() -> PathBuf {
    assets_dir().join("video_320x240_vp8.ivf")
}

/// The default Opus clip: 48 kHz, 20 ms frames.
pub fn default_audio_file() -> PathBuf {
    assets_dir().join("audio_sine_opus.ogg")
}

/// The simulcast clips shipped in `assets/`, as `(rid, file)` from the smallest to the largest:
/// `q` 320x180 ~150 kbit/s, `h` 640x360 ~500 kbit/s, `f` 1280x720 ~1.5 Mbit/s (same picture,
/// keyframes at the same frame indexes).
pub fn simulcast_files() -> Vec<(String, PathBuf)> {
    [
        ("q", "simulcast_q_320x180_vp8.ivf"),
        ("h", "simulcast_h_640x360_vp8.ivf"),
        ("f", "simulcast_f_1280x720_vp8.ivf"),
    ]
    .into_iter()
    .map(|(rid, file)| (rid.to_owned(), assets_dir().join(file)))
    .collect()
}

/// Frame size from the start of a VP8 keyframe (RFC 6386 §9.1: 3-byte frame tag, start code
/// `9d 01 2a`, 14-bit width and height). `None` for an interframe or a bad start code.
pub fn vp8_keyframe_size(frame: &[u8]) -> Option<(u16, u16)> {
    if frame.first()? & 0x01 != 0 {
        return None;
    }
    let &[0x9d, 0x01, 0x2a, w0, w1, h0, h1] = frame.get(3..10)? else {
        return None;
    };
    Some((
        u16::from_le_bytes([w0, w1]) & 0x3fff,
        u16::from_le_bytes([h0, h1]) & 0x3fff,
    ))
}

/// Bytes of a frame's start that identify it (see [`frame_fingerprint`]).
pub const FINGERPRINT_BYTES: usize = 48;

/// A fingerprint of a VP8 frame from its first [`FINGERPRINT_BYTES`] bytes: enough to tell
/// which clip (so which simulcast layer) and which frame a received packet carries, because the
/// first RTP packet of a frame holds at least that much of it (or the whole frame) unchanged —
/// an SFU rewrites the payload descriptor, never the VP8 data.
pub fn frame_fingerprint(data: &[u8]) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    data[..data.len().min(FINGERPRINT_BYTES)].hash(&mut h);
    h.finish()
}

/// Where a known frame comes from: the size of its clip and its index in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameOrigin {
    /// The clip's frame size (0x0 when two clips of different sizes share this fingerprint).
    pub width: u16,
    pub height: u16,
    pub index: usize,
    pub keyframe: bool,
}

fn frame_index() -> &'static Mutex<HashMap<u64, FrameOrigin>> {
    static INDEX: OnceLock<Mutex<HashMap<u64, FrameOrigin>>> = OnceLock::new();
    INDEX.get_or_init(Default::default)
}

fn index_clip(clip: &Clip) {
    if clip.kind != TrackKind::Video {
        return;
    }
    let mut index = frame_index().lock().unwrap_or_else(|e| e.into_inner());
    for (i, f) in clip.frames.iter().enumerate() {
        let origin = FrameOrigin {
            width: clip.width,
            height: clip.height,
            index: i,
            keyframe: f.keyframe,
        };
        index
            .entry(frame_fingerprint(&f.data))
            .and_modify(|o| {
                if (o.width, o.height) != (origin.width, origin.height) {
                    o.width = 0;
                    o.height = 0;
                }
            })
            .or_insert(origin);
    }
}

/// The clip frame a received frame start is, if a video clip with it was loaded in this process
/// (every [`Clip::load`] indexes its frames; [`index_known_clips`] loads the shipped ones).
pub fn known_frame(frame_start: &[u8]) -> Option<FrameOrigin> {
    frame_index()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&frame_fingerprint(frame_start))
        .copied()
}

/// Loads (and so indexes) every video clip shipped in `assets/`, so that a process that only
/// receives can still tell which clip a frame comes from.
pub fn index_known_clips() {
    for (_, file) in simulcast_files() {
        let _ = Clip::load(&file);
    }
    let _ = Clip::load(&default_video_file());
}

/// RTP clock rates.
pub const VIDEO_CLOCK_RATE: u32 = 90_000;
pub const AUDIO_CLOCK_RATE: u32 = 48_000;
/// Outbound MTU the packetizer cuts frames to (the same as webrtc-rs's sample track).
pub const RTP_MTU: usize = 1200;

/// One encoded frame (VP8 frame or Opus packet) and its duration in RTP clock units.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub data: Bytes,
    /// Duration in units of the RTP clock (90 kHz video, 48 kHz audio).
    pub samples: u32,
    /// A VP8 keyframe (always false for audio).
    pub keyframe: bool,
}

/// A parsed clip, played in a loop.
#[derive(Debug, Clone)]
pub struct Clip {
    pub kind: TrackKind,
    pub frames: Vec<Frame>,
    /// Time between frames for pacing (the first frame's duration).
    pub frame_interval: Duration,
    /// Video size, 0 for audio.
    pub width: u16,
    pub height: u16,
}

impl Clip {
    /// Parses a VP8 IVF file (constant frame rate from the IVF header's time base).
    pub fn parse_ivf(data: &[u8]) -> Result<Clip> {
        ensure!(data.len() >= 32, "IVF: file shorter than its header");
        ensure!(&data[0..4] == b"DKIF", "IVF: bad signature");
        let header_size = u16::from_le_bytes([data[6], data[7]]) as usize;
        let fourcc = &data[8..12];
        ensure!(
            fourcc == b"VP80",
            "IVF: codec {:?} is not VP8",
            String::from_utf8_lossy(fourcc)
        );
        let width = u16::from_le_bytes([data[12], data[13]]);
        let height = u16::from_le_bytes([data[14], data[15]]);
        let rate = u32::from_le_bytes([data[16], data[17], data[18], data[19]]);
        let scale = u32::from_le_bytes([data[20], data[21], data[22], data[23]]);
        ensure!(rate > 0 && scale > 0, "IVF: zero time base {scale}/{rate}");
        let samples = (u64::from(VIDEO_CLOCK_RATE) * u64::from(scale) / u64::from(rate)) as u32;
        ensure!(samples > 0, "IVF: frame rate {rate}/{scale} too high");
        let frame_interval = Duration::from_secs_f64(f64::from(scale) / f64::from(rate));

        let mut frames = Vec::new();
        let mut pos = header_size.max(32);
        while pos + 12 <= data.len() {
            let size = u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]])
                as usize;
            pos += 12;
            ensure!(
                pos + size <= data.len(),
                "IVF: frame {} truncated",
                frames.len()
            );
            let frame = Bytes::copy_from_slice(&data[pos..pos + size]);
            pos += size;
            if frame.is_empty() {
                continue;
            }
            // VP8 frame tag: bit 0 of the first byte is 0 for a keyframe (RFC 6386 §9.1).
            let keyframe = frame[0] & 0x01 == 0;
            frames.push(Frame {
                data: frame,
                samples,
                keyframe,
            });
        }
        ensure!(!frames.is_empty(), "IVF: no frames");
        ensure!(frames[0].keyframe, "IVF: first frame is not a keyframe");
        Ok(Clip {
            kind: TrackKind::Video,
            frames,
            frame_interval,
            width,
            height,
        })
    }

    /// Parses an Ogg Opus file into Opus packets (any number per page, packets may span pages);
    /// durations come from each packet's TOC byte.
    pub fn parse_ogg_opus(data: &[u8]) -> Result<Clip> {
        let mut packets: Vec<Vec<u8>> = Vec::new();
        let mut partial: Vec<u8> = Vec::new();
        let mut serial: Option<u32> = None;
        let mut pos = 0usize;
        while pos < data.len() {
            ensure!(
                data.len() >= pos + 27,
                "Ogg: truncated page header at {pos}"
            );
            ensure!(
                &data[pos..pos + 4] == b"OggS",
                "Ogg: bad capture pattern at {pos}"
            );
            ensure!(data[pos + 4] == 0, "Ogg: unknown version");
            let page_serial = u32::from_le_bytes([
                data[pos + 14],
                data[pos + 15],
                data[pos + 16],
                data[pos + 17],
            ]);
            let nsegs = data[pos + 26] as usize;
            ensure!(
                data.len() >= pos + 27 + nsegs,
                "Ogg: truncated segment table"
            );
            let lacing = &data[pos + 27..pos + 27 + nsegs];
            let body_len: usize = lacing.iter().map(|&l| l as usize).sum();
            let mut body = pos + 27 + nsegs;
            ensure!(data.len() >= body + body_len, "Ogg: truncated page body");
            pos = body + body_len;
            if *serial.get_or_insert(page_serial) != page_serial {
                // Only the first logical stream is played.
                continue;
            }
            for &l in lacing {
                partial.extend_from_slice(&data[body..body + l as usize]);
                body += l as usize;
                if l < 255 {
                    packets.push(std::mem::take(&mut partial));
                }
            }
        }
        let mut frames = Vec::new();
        for p in packets {
            if p.starts_with(b"OpusHead") || p.starts_with(b"OpusTags") || p.is_empty() {
                continue;
            }
            let samples = opus_packet_samples(&p)
                .ok_or_else(|| anyhow!("Opus: bad TOC in packet {}", frames.len()))?;
            frames.push(Frame {
                data: Bytes::from(p),
                samples,
                keyframe: false,
            });
        }
        ensure!(!frames.is_empty(), "Ogg: no Opus packets");
        let frame_interval = Duration::from_micros(
            u64::from(frames[0].samples) * 1_000_000 / u64::from(AUDIO_CLOCK_RATE),
        );
        Ok(Clip {
            kind: TrackKind::Audio,
            frames,
            frame_interval,
            width: 0,
            height: 0,
        })
    }

    /// Loads and parses a clip by file extension (`.ivf` or `.ogg`/`.opus`), cached per path so
    /// many peers share one copy.
    pub fn load(path: &Path) -> Result<Arc<Clip>> {
        static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<Clip>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        if let Some(clip) = cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .cloned()
        {
            return Ok(clip);
        }
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let clip = match ext.as_str() {
            "ivf" => Clip::parse_ivf(&data),
            "ogg" | "opus" => Clip::parse_ogg_opus(&data),
            _ => bail!("{}: unknown media file type", path.display()),
        }
        .with_context(|| format!("parsing {}", path.display()))?;
        index_clip(&clip);
        let clip = Arc::new(clip);
        cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_owned(), clip.clone());
        Ok(clip)
    }

    /// Total duration of one pass, in RTP clock units.
    pub fn total_samples(&self) -> u64 {
        self.frames.iter().map(|f| u64::from(f.samples)).sum()
    }
}

/// Samples (at 48 kHz) in one Opus packet, from its TOC byte (RFC 6716 §3.1).
pub fn opus_packet_samples(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    let frame = match config {
        0..=11 => [480, 960, 1920, 2880][(config % 4) as usize],
        12..=15 => [480, 960][(config % 2) as usize],
        _ => [120, 240, 480, 960][(config % 4) as usize],
    };
    let count = match toc & 0x03 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(*packet.get(1)? & 0x3f),
    };
    (count > 0 && frame * count <= 5760).then_some(frame * count)
}

/// Walks a clip in a loop; can jump to the next keyframe on request.
#[derive(Debug, Clone)]
pub struct FrameCursor {
    clip: Arc<Clip>,
    next: usize,
    /// Completed passes over the clip.
    pub loops: u64,
}

impl FrameCursor {
    pub fn new(clip: Arc<Clip>) -> Self {
        FrameCursor {
            clip,
            next: 0,
            loops: 0,
        }
    }

    pub fn clip(&self) -> &Arc<Clip> {
        &self.clip
    }

    /// The next frame. With `want_keyframe`, skips forward (wrapping) to the next keyframe if
    /// the next frame is not one; timestamps stay continuous since each call advances by the
    /// returned frame's duration only.
    pub fn next_frame(&mut self, want_keyframe: bool) -> &Frame {
        let frames = &self.clip.frames;
        if want_keyframe && !frames[self.next].keyframe {
            let n = frames.len();
            if let Some(step) = (1..n).find(|s| frames[(self.next + s) % n].keyframe) {
                if self.next + step >= n {
                    self.loops += 1;
                }
                self.next = (self.next + step) % n;
            }
        }
        let idx = self.next;
        self.next += 1;
        if self.next == frames.len() {
            self.next = 0;
            self.loops += 1;
        }
        &frames[idx]
    }
}

/// Turns frames into RTP packets with webrtc-rs's packetizer (VP8 with picture ids, Opus).
pub struct MediaPacketizer {
    cursor: FrameCursor,
    packetizer: Box<dyn Packetizer + Send>,
    /// VP8: the next picture id (15 bits), see [`MediaPacketizer::new`].
    picture_id: Option<u16>,
}

/// Rewrites the picture id of a VP8 payload descriptor written by webrtc-rs's payloader (X=1,
/// I=1, 7- or 15-bit id) into a 15-bit one with `value`. `None` if the descriptor has no
/// picture id.
pub fn set_picture_id_15(payload: &[u8], value: u16) -> Option<Bytes> {
    let (&b0, &b1) = (payload.first()?, payload.get(1)?);
    if b0 & 0x80 == 0 || b1 & 0x80 == 0 {
        return None;
    }
    let m = *payload.get(2)?;
    let rest = if m & 0x80 != 0 { 4 } else { 3 };
    let mut out = Vec::with_capacity(payload.len() + 1);
    out.extend_from_slice(&[b0, b1, 0x80 | ((value >> 8) & 0x7f) as u8, value as u8]);
    out.extend_from_slice(payload.get(rest..)?);
    Some(Bytes::from(out))
}

impl MediaPacketizer {
    /// A packetizer for `clip`. VP8 packets carry a 15-bit picture id starting at a random
    /// value, as browsers send them (webrtc-rs's payloader alone would start at 0 and send ids
    /// below 128 in 7 bits, changing width mid-stream).
    pub fn new(clip: Arc<Clip>, ssrc: u32, payload_type: u8) -> Result<Self> {
        let (payloader, clock_rate): (Box<dyn rtp::packetizer::Payloader>, u32) = match clip.kind {
            TrackKind::Video => {
                let mut p = rtp::codec::vp8::Vp8Payloader::default();
                p.enable_picture_id = true;
                (Box::new(p), VIDEO_CLOCK_RATE)
            }
            TrackKind::Audio => (
                Box::<rtp::codec::opus::OpusPayloader>::default(),
                AUDIO_CLOCK_RATE,
            ),
        };
        let is_video = clip.kind == TrackKind::Video;
        let packetizer = rtp::packetizer::new_packetizer(
            Instant::now(),
            // One byte is kept for the 15-bit picture id written below.
            if is_video { RTP_MTU - 1 } else { RTP_MTU },
            payload_type,
            ssrc,
            payloader,
            Box::new(rtp::sequence::new_random_sequencer()),
            clock_rate,
        );
        Ok(MediaPacketizer {
            cursor: FrameCursor::new(clip),
            packetizer: Box::new(packetizer),
            picture_id: is_video.then(|| rand::random::<u16>() & 0x7fff),
        })
    }

    /// Packetizes the next frame. Returns the packets and whether the frame was a keyframe.
    pub fn next_packets(&mut self, want_keyframe: bool) -> Result<(Vec<rtp::Packet>, bool)> {
        let frame = self.cursor.next_frame(want_keyframe);
        let keyframe = frame.keyframe;
        let (data, samples) = (frame.data.clone(), frame.samples);
        let mut packets = self
            .packetizer
            .packetize(Instant::now(), &data, samples)
            .map_err(|e| anyhow!("packetize: {e}"))?;
        if let Some(pid) = self.picture_id.as_mut() {
            for p in &mut packets {
                if let Some(payload) = set_picture_id_15(&p.payload, *pid) {
                    p.payload = payload;
                }
            }
            *pid = (*pid + 1) & 0x7fff;
        }
        Ok((packets, keyframe))
    }

    /// The clip it plays.
    pub fn clip(&self) -> &Arc<Clip> {
        self.cursor.clip()
    }

    /// Lets one frame's time pass without sending it (a paused encoder): the clip and the RTP
    /// timestamp advance, sequence numbers and picture ids do not (nothing was sent, so the
    /// receiver must see no gap).
    pub fn skip_frame(&mut self) {
        let samples = self.cursor.next_frame(false).samples;
        self.packetizer.skip_samples(samples);
    }

    pub fn loops(&self) -> u64 {
        self.cursor.loops
    }
}

/// Where the pacer writes packets (a webrtc-rs local track, or a channel in tests).
pub trait PacketSink: Send + Sync + 'static {
    fn write(&self, packet: rtp::Packet) -> impl Future<Output = Result<(), String>> + Send;
}

/// Counters a pacer keeps for one local track.
#[derive(Debug, Clone, Default)]
pub struct SendCounters {
    pub packets: u64,
    /// RTP payload bytes.
    pub bytes: u64,
    pub frames: u64,
    pub keyframes: u64,
    pub write_errors: u64,
    pub last_error: Option<String>,
    pub started_at: Option<Instant>,
    /// Keyframe requests (PLI/FIR) received for this track.
    pub keyframe_requests: u64,
}

impl SendCounters {
    /// Adds `other` (another simulcast layer of the same track) into `self`.
    pub fn add(&mut self, other: &SendCounters) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.frames += other.frames;
        self.keyframes += other.keyframes;
        self.write_errors += other.write_errors;
        self.keyframe_requests += other.keyframe_requests;
        if other.last_error.is_some() {
            self.last_error.clone_from(&other.last_error);
        }
        self.started_at = match (self.started_at, other.started_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// Shared control and counters of a pacer.
#[derive(Debug, Default)]
pub struct PacerControl {
    pub counters: Mutex<SendCounters>,
    /// While set, no frames are sent (the clip position and the RTP timestamp still advance,
    /// like a muted camera's clock; sequence numbers do not).
    pub paused: AtomicBool,
    /// Set to make the next frame a keyframe (jumping forward in the clip).
    pub keyframe_requested: AtomicBool,
    /// While set, no frames are sent either: the server asked to pause this simulcast layer
    /// (`publisher_layers` without its RID). Kept apart from `paused`, which is the
    /// application's.
    pub dynacast_paused: AtomicBool,
}

impl PacerControl {
    pub fn counters(&self) -> SendCounters {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether frames are being held back (by the application or by the server).
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire) || self.dynacast_paused.load(Ordering::Acquire)
    }

    pub fn request_keyframe(&self) {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keyframe_requests += 1;
        self.keyframe_requested.store(true, Ordering::Release);
    }
}

/// How a frame's packets leave within its frame interval.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Pacing {
    /// All at once, at the frame's tick: the largest burst a receiver can get.
    #[default]
    Burst,
    /// Spread at this multiple of the clip's average bitrate, as a browser's pacer sends
    /// (libwebrtc's pacing factor is 2.5): a packet leaves when the frame's bytes before it
    /// would have left at that rate, counted from the frame's tick. Timers have a resolution
    /// of about a millisecond, so packets due within one leave together.
    Rate(f64),
}

impl Pacing {
    /// Bytes per second at which `clip`'s frames leave (`None`: all at once).
    pub fn bytes_per_second(self, clip: &Clip) -> Option<f64> {
        let Pacing::Rate(factor) = self else {
            return None;
        };
        let bytes: usize = clip.frames.iter().map(|f| f.data.len()).sum();
        let secs = clip.frame_interval.as_secs_f64() * clip.frames.len() as f64;
        (factor > 0.0 && bytes > 0 && secs > 0.0).then(|| factor * bytes as f64 / secs)
    }

    /// When a packet is due after its frame's tick: once the `before` bytes ahead of it in the
    /// frame have left at `rate` bytes per second.
    pub fn due(rate: f64, before: usize) -> Duration {
        Duration::from_secs_f64(before as f64 / rate)
    }
}

/// Sends one frame per tick, forever (until the task is aborted), its packets as `pacing`
/// says. `on_progress` is called after every tick, paused or not (to wake waiters).
pub async fn run_pacer<S: PacketSink>(
    mut packetizer: MediaPacketizer,
    interval: Duration,
    pacing: Pacing,
    sink: S,
    control: Arc<PacerControl>,
    on_progress: impl Fn() + Send + 'static,
) {
    let rate = pacing.bytes_per_second(packetizer.clip());
    let mut ticker = tokio::time::interval(interval);
    // Burst (the default) catches up after a stall, so the average rate matches the RTP clock.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    control
        .counters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .started_at = Some(Instant::now());
    loop {
        let tick = ticker.tick().await;
        if control.is_paused() {
            // A keyframe request waits for the resume (which starts with a keyframe anyway).
            packetizer.skip_frame();
            on_progress();
            continue;
        }
        let want_key = control.keyframe_requested.swap(false, Ordering::AcqRel);
        let (packets, keyframe) = match packetizer.next_packets(want_key) {
            Ok(p) => p,
            Err(e) => {
                let mut c = control.counters.lock().unwrap_or_else(|e| e.into_inner());
                c.write_errors += 1;
                c.last_error = Some(e.to_string());
                continue;
            }
        };
        let mut sent = 0u64;
        let mut bytes = 0u64;
        // The frame's bytes ahead of the next packet, sent or not (pacing spaces packets by
        // what the frame holds, whatever the sink did with them).
        let mut ahead = 0usize;
        let mut error = None;
        for p in packets {
            let len = p.payload.len() as u64;
            if let Some(rate) = rate {
                let due = tick + Pacing::due(rate, ahead);
                if due > tokio::time::Instant::now() {
                    tokio::time::sleep_until(due).await;
                }
            }
            ahead += p.payload.len();
            match sink.write(p).await {
                Ok(()) => {
                    sent += 1;
                    bytes += len;
                }
                Err(e) => error = Some(e),
            }
        }
        {
            let mut c = control.counters.lock().unwrap_or_else(|e| e.into_inner());
            c.packets += sent;
            c.bytes += bytes;
            if sent > 0 {
                c.frames += 1;
                if keyframe {
                    c.keyframes += 1;
                }
            }
            if let Some(e) = error {
                c.write_errors += 1;
                c.last_error = Some(e);
            }
        }
        on_progress();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn video() -> Arc<Clip> {
        Clip::load(&default_video_file()).expect("video asset")
    }

    fn audio() -> Arc<Clip> {
        Clip::load(&default_audio_file()).expect("audio asset")
    }

    #[test]
    fn video_asset_parses() {
        let clip = video();
        assert_eq!((clip.width, clip.height), (320, 240));
        assert_eq!(clip.frame_interval, Duration::from_secs_f64(1.0 / 30.0));
        assert!(clip.frames.iter().all(|f| f.samples == 3000));
        let keys: Vec<usize> = (0..clip.frames.len())
            .filter(|&i| clip.frames[i].keyframe)
            .collect();
        assert_eq!(keys[0], 0);
        assert!(keys.windows(2).all(|w| w[1] - w[0] == 30), "{keys:?}");
        assert!(clip.frames.len() >= 150);
    }

    #[test]
    fn audio_asset_parses_into_20ms_packets() {
        let clip = audio();
        assert_eq!(clip.frame_interval, Duration::from_millis(20));
        assert!(clip.frames.iter().all(|f| f.samples == 960));
        assert!(clip.frames.len() >= 250, "{}", clip.frames.len());
    }

    #[test]
    fn simulcast_assets_parse() {
        for (name, w, h) in [
            ("simulcast_f_1280x720_vp8.ivf", 1280, 720),
            ("simulcast_h_640x360_vp8.ivf", 640, 360),
            ("simulcast_q_320x180_vp8.ivf", 320, 180),
        ] {
            let clip = Clip::load(&assets_dir().join(name)).unwrap();
            assert_eq!((clip.width, clip.height), (w, h));
            assert_eq!(clip.frames.len(), 150);
        }
    }

    #[test]
    fn simulcast_layers_are_distinct_streams_with_aligned_keyframes() {
        let mut keys = Vec::new();
        for (rid, file) in simulcast_files() {
            let clip = Clip::load(&file).unwrap();
            let k: Vec<usize> = (0..clip.frames.len())
                .filter(|&i| clip.frames[i].keyframe)
                .collect();
            assert_eq!(k, vec![0, 60, 120], "{rid}");
            keys.push(k);
            for &i in &keys[0] {
                assert_eq!(
                    vp8_keyframe_size(&clip.frames[i].data),
                    Some((clip.width, clip.height)),
                    "{rid} frame {i}"
                );
            }
            assert_eq!(vp8_keyframe_size(&clip.frames[1].data), None);
        }
        // Every frame of every shipped clip is told apart by its fingerprint.
        index_known_clips();
        for (_, file) in simulcast_files() {
            let clip = Clip::load(&file).unwrap();
            for (i, f) in clip.frames.iter().enumerate() {
                let origin = known_frame(&f.data).expect("indexed");
                assert_eq!(
                    (origin.width, origin.height, origin.index, origin.keyframe),
                    (clip.width, clip.height, i, f.keyframe),
                    "{} frame {i}",
                    file.display()
                );
            }
        }
        assert_eq!(known_frame(b"not a frame of ours"), None);
    }

    #[test]
    fn opus_toc() {
        // config 31 (CELT FB 20 ms), code 0.
        assert_eq!(opus_packet_samples(&[31 << 3]), Some(960));
        // config 1 (SILK NB 20 ms), code 1: two frames.
        assert_eq!(opus_packet_samples(&[(1 << 3) | 1]), Some(1920));
        // config 16 (CELT 2.5 ms), code 3 with 4 frames.
        assert_eq!(opus_packet_samples(&[(16 << 3) | 3, 4]), Some(480));
        assert_eq!(opus_packet_samples(&[]), None);
        assert_eq!(opus_packet_samples(&[3]), None);
    }

    #[test]
    fn ogg_packets_spanning_pages_and_several_per_page() {
        fn page(serial: u32, lacing: &[u8], body: &[u8]) -> Vec<u8> {
            let mut p = b"OggS".to_vec();
            p.push(0);
            p.push(0);
            p.extend_from_slice(&0u64.to_le_bytes());
            p.extend_from_slice(&serial.to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
            p.push(lacing.len() as u8);
            p.extend_from_slice(lacing);
            p.extend_from_slice(body);
            p
        }
        let head = b"OpusHead\x01\x01\x00\x00\x80\xbb\x00\x00\x00\x00\x00".to_vec();
        let mut file = page(7, &[head.len() as u8], &head);
        file.extend(page(7, &[8], b"OpusTags"));
        // Two packets in one page: 3 bytes and 2 bytes.
        let (a, b) = ([31u8 << 3, 1, 2], [31u8 << 3, 9]);
        file.extend(page(7, &[3, 2], &[&a[..], &b[..]].concat()));
        // One 300-byte packet spanning two pages (255 | 45).
        let mut big = vec![31u8 << 3];
        big.resize(300, 0xaa);
        file.extend(page(7, &[255], &big[..255]));
        file.extend(page(7, &[45], &big[255..]));
        let clip = Clip::parse_ogg_opus(&file).unwrap();
        let sizes: Vec<usize> = clip.frames.iter().map(|f| f.data.len()).collect();
        assert_eq!(sizes, vec![3, 2, 300]);
    }

    #[test]
    fn ivf_rejects_garbage() {
        assert!(Clip::parse_ivf(b"nope").is_err());
        let mut bad = vec![0u8; 32];
        bad[0..4].copy_from_slice(b"DKIF");
        bad[8..12].copy_from_slice(b"VP90");
        assert!(Clip::parse_ivf(&bad).is_err());
    }

    #[test]
    fn cursor_loops_and_jumps_to_keyframes() {
        let clip = video();
        let n = clip.frames.len();
        let mut c = FrameCursor::new(clip.clone());
        assert!(c.next_frame(false).keyframe);
        for _ in 1..n {
            c.next_frame(false);
        }
        assert_eq!(c.loops, 1);
        assert!(c.next_frame(false).keyframe, "loop restarts at frame 0");
        // At frame 1: a keyframe request jumps to frame 30.
        let f = c.next_frame(true).clone();
        assert!(f.keyframe);
        assert_eq!(f, clip.frames[30]);
        // Without a request the clip continues after the keyframe.
        assert_eq!(c.next_frame(false), &clip.frames[31]);
        // A request when the next frame already is a keyframe does not skip it.
        for _ in 32..60 {
            c.next_frame(false);
        }
        assert_eq!(c.next_frame(true), &clip.frames[60]);
    }

    #[test]
    fn packets_are_continuous_across_loops() {
        let clip = audio();
        let n = clip.frames.len();
        let mut p = MediaPacketizer::new(clip, 1234, 111).unwrap();
        let mut last: Option<(u16, u32)> = None;
        for _ in 0..(2 * n + 5) {
            let (pkts, _) = p.next_packets(false).unwrap();
            assert_eq!(pkts.len(), 1);
            let h = &pkts[0].header;
            assert_eq!((h.ssrc, h.payload_type), (1234, 111));
            if let Some((seq, ts)) = last {
                assert_eq!(h.sequence_number, seq.wrapping_add(1));
                assert_eq!(h.timestamp, ts.wrapping_add(960));
            }
            last = Some((h.sequence_number, h.timestamp));
        }
        assert_eq!(p.loops(), 2);
    }

    #[test]
    fn video_frames_are_split_with_marker_on_last() {
        let mut p = MediaPacketizer::new(video(), 1, 96).unwrap();
        let (pkts, key) = p.next_packets(false).unwrap();
        assert!(key);
        assert!(!pkts.is_empty());
        assert!(pkts.iter().all(|p| p.payload.len() <= RTP_MTU - 12));
        assert!(pkts.last().unwrap().header.marker);
        assert!(pkts[..pkts.len() - 1].iter().all(|p| !p.header.marker));
        let ts = pkts[0].header.timestamp;
        let (next, _) = p.next_packets(false).unwrap();
        assert_eq!(next[0].header.timestamp, ts.wrapping_add(3000));
    }

    struct ChannelSink(tokio::sync::mpsc::UnboundedSender<rtp::Packet>);

    impl PacketSink for ChannelSink {
        fn write(&self, packet: rtp::Packet) -> impl Future<Output = Result<(), String>> + Send {
            let r = self.0.send(packet).map_err(|e| e.to_string());
            async move { r }
        }
    }

    /// Starts a pacer on `clip` writing into a channel; `ticks` gets one item per tick.
    fn start(
        clip: Arc<Clip>,
        control: Arc<PacerControl>,
    ) -> (
        tokio::task::JoinHandle<()>,
        tokio::sync::mpsc::UnboundedReceiver<rtp::Packet>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        start_paced(clip, control, Pacing::Burst)
    }

    fn start_paced(
        clip: Arc<Clip>,
        control: Arc<PacerControl>,
        pacing: Pacing,
    ) -> (
        tokio::task::JoinHandle<()>,
        tokio::sync::mpsc::UnboundedReceiver<rtp::Packet>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (tick_tx, ticks) = tokio::sync::mpsc::unbounded_channel();
        let packetizer = MediaPacketizer::new(clip.clone(), 9, 111).unwrap();
        let task = tokio::spawn(run_pacer(
            packetizer,
            clip.frame_interval,
            pacing,
            ChannelSink(tx),
            control,
            move || {
                let _ = tick_tx.send(());
            },
        ));
        (task, rx, ticks)
    }

    async fn next<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("pacer stalled")
            .expect("pacer gone")
    }

    #[tokio::test]
    async fn pacer_never_runs_ahead_of_the_frame_rate_and_can_pause() {
        let clip = audio();
        let control = Arc::new(PacerControl::default());
        let (task, mut rx, mut ticks) = start(clip.clone(), control.clone());
        let t0 = Instant::now();
        let mut last = None;
        for _ in 0..10 {
            last = Some(next(&mut rx).await);
        }
        // Ticks are scheduled at start + k * 20 ms: 10 frames take at least 9 intervals.
        assert!(
            t0.elapsed() >= clip.frame_interval * 9,
            "{:?}",
            t0.elapsed()
        );
        control.paused.store(true, Ordering::Release);
        // Drain what was sent before the pause took effect, then watch three paused ticks.
        while ticks.try_recv().is_ok() {}
        for _ in 0..2 {
            next(&mut ticks).await;
        }
        while let Ok(p) = rx.try_recv() {
            last = Some(p);
        }
        let last = last.expect("packets before the pause");
        let sent = control.counters().packets;
        for _ in 0..3 {
            next(&mut ticks).await;
        }
        assert!(rx.try_recv().is_err(), "paused pacer sends nothing");
        assert_eq!(control.counters().packets, sent);
        control.paused.store(false, Ordering::Release);
        // No sequence gap (nothing was sent), but the clock went on.
        let p = next(&mut rx).await;
        assert_eq!(
            p.header.sequence_number,
            last.header.sequence_number.wrapping_add(1)
        );
        let skipped = p.header.timestamp.wrapping_sub(last.header.timestamp);
        assert!(skipped >= 4 * 960, "timestamp advanced by {skipped}");
        task.abort();
    }

    #[tokio::test]
    async fn pacer_answers_keyframe_requests() {
        let clip = video();
        let control = Arc::new(PacerControl::default());
        let (task, _rx, mut ticks) = start(clip.clone(), control.clone());
        for _ in 0..3 {
            next(&mut ticks).await;
        }
        assert_eq!(control.counters().keyframes, 1, "only frame 0 so far");
        control.request_keyframe();
        let before = control.counters().frames;
        while control.counters().frames == before {
            next(&mut ticks).await;
        }
        let c = control.counters();
        assert_eq!((c.keyframes, c.keyframe_requests), (2, 1));
        task.abort();
    }

    /// Each packet of the clip's first frame: when it arrived after the first, and its size.
    async fn first_frame(pacing: Pacing) -> Vec<(Duration, usize)> {
        let control = Arc::new(PacerControl::default());
        let (task, mut rx, _ticks) = start_paced(video(), control, pacing);
        let mut seen = Vec::new();
        let mut t0 = None;
        loop {
            let p = next(&mut rx).await;
            let t0 = *t0.get_or_insert_with(Instant::now);
            seen.push((t0.elapsed(), p.payload.len()));
            if p.header.marker {
                break;
            }
        }
        task.abort();
        seen
    }

    #[test]
    fn a_paced_packet_is_due_when_the_bytes_before_it_have_left_at_the_rate() {
        let clip = video();
        let bytes: usize = clip.frames.iter().map(|f| f.data.len()).sum();
        let secs = clip.frame_interval.as_secs_f64() * clip.frames.len() as f64;
        let rate = Pacing::Rate(2.5).bytes_per_second(&clip).unwrap();
        assert!((rate - 2.5 * bytes as f64 / secs).abs() < 1e-6);
        assert_eq!(Pacing::due(rate, 0), Duration::ZERO);
        assert_eq!(Pacing::due(1000.0, 2500), Duration::from_millis(2500));
        assert_eq!(Pacing::Burst.bytes_per_second(&clip), None);
        assert_eq!(Pacing::Rate(0.0).bytes_per_second(&clip), None);
    }

    #[tokio::test]
    async fn a_paced_frame_is_spread_and_a_burst_is_not() {
        let burst = first_frame(Pacing::Burst).await;
        assert!(burst.len() >= 3, "a keyframe of several packets: {burst:?}");
        let paced = first_frame(Pacing::Rate(2.5)).await;
        assert_eq!(paced.len(), burst.len());
        // Timers never fire early: each packet left no sooner than it was due after the first.
        let rate = Pacing::Rate(2.5).bytes_per_second(&video()).unwrap();
        let mut before = 0;
        for (i, &(at, len)) in paced.iter().enumerate() {
            if i > 0 {
                let due = Pacing::due(rate, before) - Pacing::due(rate, paced[0].1);
                assert!(at >= due, "packet {i} at {at:?}, due {due:?}: {paced:?}");
            }
            before += len;
        }
        let last = paced.last().unwrap().0;
        assert!(last >= Duration::from_millis(10), "spread: {paced:?}");
        assert!(
            burst.last().unwrap().0 < last,
            "burst {burst:?}, paced {paced:?}"
        );
    }
}
