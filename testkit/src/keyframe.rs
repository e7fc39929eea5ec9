//! An interceptor that hands keyframe requests (PLI/FIR) for our local tracks to the
//! application, so a synthetic publisher can answer them by jumping to the next keyframe, and
//! records the NACKs a publisher and the RTCP sender reports a subscriber receives.
//!
//! webrtc-rs delivers inbound RTCP to a local track only when an interceptor marks it
//! `DeliverToApplication` (see the `rtcp-processing` example of webrtc 0.21).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rtc::interceptor::{Attribute, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::sansio::Protocol;
use rtc::shared::error::Error;

/// The registry slot: application-most, after every built-in interceptor.
pub const KEYFRAME_TAP_SLOT: usize = 14_000;

pub fn is_keyframe_request(packet: &dyn rtc::rtcp::Packet) -> bool {
    let any = packet.as_any();
    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
}

/// The media SSRCs a keyframe request asks for (PLI: its media SSRC; FIR: each entry's SSRC);
/// empty for any other packet.
pub fn keyframe_request_ssrcs(packet: &dyn rtc::rtcp::Packet) -> Vec<u32> {
    let any = packet.as_any();
    if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
        vec![pli.media_ssrc]
    } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
        fir.fir.iter().map(|e| e.ssrc).collect()
    } else {
        Vec::new()
    }
}

/// An RTCP sender report a subscriber received, as it was when it arrived.
#[derive(Debug, Clone, Copy)]
pub struct SenderReportSeen {
    pub ntp_time: u64,
    pub rtp_time: u32,
    pub packet_count: u32,
    pub octet_count: u32,
    pub at: Instant,
    /// Sender reports received for this SSRC so far.
    pub count: u64,
}

/// What the tap saw of the feedback a publisher received, and of the sender reports a
/// subscriber received.
#[derive(Debug, Default)]
pub struct FeedbackCounters {
    /// Packets the server asked to retransmit (NACK): loss on the publisher → server leg.
    pub nacked_packets: AtomicU64,
    pub nack_messages: AtomicU64,
    /// Transport-wide congestion control feedback packets received (publisher connections).
    pub twcc_feedback: AtomicU64,
    /// Receiver report blocks received, and the largest cumulative loss one reported.
    pub report_blocks: AtomicU64,
    pub reported_lost: AtomicU64,
    /// The latest sender report per SSRC (subscriber connections).
    pub sender_reports: Mutex<HashMap<u32, SenderReportSeen>>,
    /// Woken at every sender report.
    pub sender_report_arrived: tokio::sync::Notify,
}

impl FeedbackCounters {
    pub fn nacked_packets(&self) -> u64 {
        self.nacked_packets.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct KeyframeRequestTap {
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
    counters: Arc<FeedbackCounters>,
}

impl KeyframeRequestTap {
    /// A tap that also counts NACKs into `counters`.
    pub fn with_counters(counters: Arc<FeedbackCounters>) -> Self {
        KeyframeRequestTap {
            counters,
            ..Default::default()
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet
            && !packets.is_empty()
        {
            for p in packets {
                if let Some(sr) = p.as_any().downcast_ref::<SenderReport>() {
                    if let Ok(mut m) = self.counters.sender_reports.lock() {
                        let count = m.get(&sr.ssrc).map_or(0, |s| s.count) + 1;
                        m.insert(
                            sr.ssrc,
                            SenderReportSeen {
                                ntp_time: sr.ntp_time,
                                rtp_time: sr.rtp_time,
                                packet_count: sr.packet_count,
                                octet_count: sr.octet_count,
                                at: msg.now,
                                count,
                            },
                        );
                    }
                    self.counters.sender_report_arrived.notify_waiters();
                }
                if p.as_any().is::<TransportLayerCc>() {
                    self.counters.twcc_feedback.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(rr) = p.as_any().downcast_ref::<ReceiverReport>() {
                    for block in &rr.reports {
                        self.counters.report_blocks.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .reported_lost
                            .fetch_max(u64::from(block.total_lost), Ordering::Relaxed);
                    }
                }
                if let Some(nack) = p.as_any().downcast_ref::<TransportLayerNack>() {
                    let n: u64 = nack
                        .nacks
                        .iter()
                        .map(|pair| 1 + u64::from(pair.lost_packets.count_ones()))
                        .sum();
                    self.counters.nacked_packets.fetch_add(n, Ordering::Relaxed);
                    self.counters.nack_messages.fetch_add(1, Ordering::Relaxed);
                }
            }
            let requests: Vec<Box<dyn rtc::rtcp::Packet>> = packets
                .iter()
                .filter(|p| is_keyframe_request(p.as_ref()))
                .cloned()
                .collect();
            if requests.is_empty() {
                // Nothing for the application; nothing after this slot needs it either.
                return Ok(());
            }
            msg.message.packet = Packet::Rtcp(requests);
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for KeyframeRequestTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}
