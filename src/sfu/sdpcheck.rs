//! Checks of a client's SDP before `rtc` sees it: what `rtc` would accept but the server cannot
//! use (media it could not demultiplex) or must not (sizes that would be copied into every other
//! participant's signaling). Each failure names the m-section and why, for an `invalid_sdp`
//! error.

use thiserror::Error;

/// Longest msid stream or track id (browsers use 36-character UUIDs).
pub const MAX_MSID_CHARS: usize = 64;
/// Most RIDs in one m-section (simulcast uses two or three).
pub const MAX_RIDS: usize = 8;
/// Most m-sections in one offer.
pub const MAX_SECTIONS: usize = 64;

/// Why an offer is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SdpError {
    #[error("the offer has {0} m-sections; at most {MAX_SECTIONS} are accepted")]
    TooManySections(usize),
    #[error(
        "m-section {index} (mid {mid}, {kind}) has no a=ssrc and no a=rid: with several media m-sections its RTP cannot be demultiplexed (RFC 8843 §9.2); declare its SSRC (a=ssrc) or use RIDs"
    )]
    Undemultiplexable {
        index: usize,
        mid: String,
        kind: String,
    },
    #[error("m-section {index} (mid {mid}) has {count} RIDs; at most {MAX_RIDS} are accepted")]
    TooManyRids {
        index: usize,
        mid: String,
        count: usize,
    },
    #[error(
        "m-section {index} (mid {mid}): an msid id is longer than {MAX_MSID_CHARS} characters or contains control characters"
    )]
    BadMsid { index: usize, mid: String },
    #[error("a=fingerprint {0:?}: {1}")]
    BadFingerprint(String, &'static str),
    #[error("the offer has no a=fingerprint")]
    NoFingerprint,
}

/// Check a subscriber's answer: what [`check_offer`] checks except demultiplexing (the
/// client receives on that connection).
pub fn check_answer(sdp: &str) -> Result<(), SdpError> {
    check(sdp, false)
}

/// Check a publisher's offer.
pub fn check_offer(sdp: &str) -> Result<(), SdpError> {
    check(sdp, true)
}

fn check(sdp: &str, publishing: bool) -> Result<(), SdpError> {
    let mut sections = sdp.split("\nm=");
    let session = sections.next().unwrap_or_default();
    let sections: Vec<&str> = sections.collect();
    if sections.len() > MAX_SECTIONS {
        return Err(SdpError::TooManySections(sections.len()));
    }
    let mut fingerprints = 0;
    for line in session.lines() {
        if let Some(v) = line.trim().strip_prefix("a=fingerprint:") {
            check_fingerprint(v)?;
            fingerprints += 1;
        }
    }
    // Media sections that carry RTP (not rejected, not the data channel). Port 0 with
    // `a=bundle-only` is a live section of the bundle (RFC 8843 §6), not a rejected one.
    let media: Vec<(usize, &str)> = sections
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, s)| {
            let mut f = s.split_whitespace();
            let kind = f.next().unwrap_or_default();
            let port = f.next().unwrap_or_default();
            let live = port != "0" || s.lines().any(|l| l.trim() == "a=bundle-only");
            (kind == "audio" || kind == "video") && live
        })
        .collect();
    for (index, section) in sections.iter().enumerate() {
        let mid = attr_values(section, "a=mid:")
            .next()
            .unwrap_or("?")
            .to_owned();
        for v in attr_values(section, "a=fingerprint:") {
            check_fingerprint(v)?;
            fingerprints += 1;
        }
        let rids = attr_values(section, "a=rid:").count();
        if rids > MAX_RIDS {
            return Err(SdpError::TooManyRids {
                index,
                mid,
                count: rids,
            });
        }
        let msid_ok = |v: &str| {
            v.split_whitespace()
                .all(|id| id.chars().count() <= MAX_MSID_CHARS && !id.chars().any(char::is_control))
        };
        let msid_bad = attr_values(section, "a=msid:").any(|v| !msid_ok(v))
            || attr_values(section, "a=ssrc:").any(|v| {
                v.split_once(' ')
                    .and_then(|(_, a)| a.strip_prefix("msid:"))
                    .is_some_and(|m| !msid_ok(m))
            });
        if msid_bad {
            return Err(SdpError::BadMsid { index, mid });
        }
    }
    if fingerprints == 0 {
        return Err(SdpError::NoFingerprint);
    }
    if publishing && media.len() > 1 {
        for &(index, section) in &media {
            let sends = !section
                .lines()
                .any(|l| matches!(l.trim(), "a=recvonly" | "a=inactive"));
            if !sends {
                continue;
            }
            let has_ssrc = attr_values(section, "a=ssrc:").next().is_some();
            let has_rid =
                attr_values(section, "a=rid:").any(|v| v.split_whitespace().nth(1) == Some("send"));
            if !has_ssrc && !has_rid {
                return Err(SdpError::Undemultiplexable {
                    index,
                    mid: attr_values(section, "a=mid:")
                        .next()
                        .unwrap_or("?")
                        .to_owned(),
                    kind: section.split_whitespace().next().unwrap_or("?").to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// The ICE ufrag of an SDP (`a=ice-ufrag:`, session or first media level: bundled sections
/// share one).
pub fn ice_ufrag(sdp: &str) -> Option<&str> {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
        .map(str::trim)
        .filter(|u| !u.is_empty())
}

/// Candidates (`a=candidate:` lines) in an SDP.
pub fn count_candidates(sdp: &str) -> usize {
    sdp.lines()
        .filter(|l| l.trim_start().starts_with("a=candidate:"))
        .count()
}

fn attr_values<'a>(section: &'a str, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    section
        .lines()
        .filter_map(move |l| l.trim().strip_prefix(prefix))
}

/// `a=fingerprint:<hash> <hex pairs>` (RFC 8122 §5): a hash function DTLS can use and a value
/// of its length.
fn check_fingerprint(v: &str) -> Result<(), SdpError> {
    let bad = |why| Err(SdpError::BadFingerprint(truncate(v), why));
    let mut f = v.split_whitespace();
    let (Some(hash), Some(value), None) = (f.next(), f.next(), f.next()) else {
        return bad("expected `<hash function> <value>`");
    };
    let len = match hash.to_ascii_lowercase().as_str() {
        "sha-1" => 20,
        "sha-224" => 28,
        "sha-256" => 32,
        "sha-384" => 48,
        "sha-512" => 64,
        _ => return bad("unsupported hash function (use sha-256)"),
    };
    let pairs: Vec<&str> = value.split(':').collect();
    if pairs.len() != len
        || !pairs
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return bad("the value is not colon-separated hex of the hash's length");
    }
    Ok(())
}

fn truncate(v: &str) -> String {
    v.chars().take(80).collect()
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;

    const FP: &str = "a=fingerprint:sha-256 AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";

    fn offer(sections: &[&str]) -> String {
        let mut s = format!("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n{FP}\r\n");
        for sec in sections {
            s.push_str("m=");
            s.push_str(sec);
        }
        s
    }

    const AUDIO: &str =
        "audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendonly\r\na=ssrc:1 cname:x\r\n";
    const VIDEO_NO_SSRC: &str = "video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendonly\r\n";
    const VIDEO_RID: &str = "video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendonly\r\na=rid:f send\r\na=rid:h send\r\na=simulcast:send f;h\r\n";

    #[test]
    fn browser_offers_pass() {
        assert_eq!(check_offer(&offer(&[AUDIO, VIDEO_RID])), Ok(()));
        assert_eq!(check_offer(&offer(&[AUDIO])), Ok(()));
        // One media m-section needs no SSRC: `rtc` binds the first one it sees.
        assert_eq!(check_offer(&offer(&[VIDEO_NO_SSRC])), Ok(()));
        // A receive-only m-section sends nothing to demultiplex.
        let recv = "video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=recvonly\r\n";
        assert_eq!(check_offer(&offer(&[AUDIO, recv])), Ok(()));
        // A rejected one neither.
        let rejected = "video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\n";
        assert_eq!(check_offer(&offer(&[AUDIO, rejected])), Ok(()));
    }

    #[test]
    fn an_undemultiplexable_section_is_named() {
        let e = check_offer(&offer(&[AUDIO, VIDEO_NO_SSRC])).unwrap_err();
        assert_eq!(
            e,
            SdpError::Undemultiplexable {
                index: 1,
                mid: "1".into(),
                kind: "video".into()
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("m-section 1") && msg.contains("mid 1") && msg.contains("a=ssrc"),
            "{msg}"
        );
    }

    #[test]
    fn a_bundle_only_section_counts_as_live() {
        // webrtcbin before its caps are known: no SSRC anywhere, the second section
        // bundle-only with port 0.
        let audio =
            "audio 0 UDP/TLS/RTP/SAVPF 111\r\na=mid:audio1\r\na=bundle-only\r\na=sendrecv\r\n";
        let video = "video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:video0\r\na=sendrecv\r\n";
        let e = check_offer(&offer(&[video, audio])).unwrap_err();
        assert!(
            matches!(e, SdpError::Undemultiplexable { index: 0, .. }),
            "{e}"
        );
    }

    #[test]
    fn fingerprints_must_be_usable() {
        let md2 = offer(&[AUDIO]).replace("sha-256", "md2");
        assert!(matches!(
            check_offer(&md2),
            Err(SdpError::BadFingerprint(..))
        ));
        let garbage = offer(&[AUDIO]).replace("AB:CD:EF:01", "zz:CD:EF:01");
        assert!(matches!(
            check_offer(&garbage),
            Err(SdpError::BadFingerprint(..))
        ));
        let short = offer(&[AUDIO]).replace(":67:89\r\n", "\r\n");
        assert!(matches!(
            check_offer(&short),
            Err(SdpError::BadFingerprint(..))
        ));
        let none = offer(&[AUDIO]).replace(FP, "");
        assert_eq!(check_offer(&none), Err(SdpError::NoFingerprint));
        // At media level is fine too.
        let media_level =
            offer(&[&format!("{AUDIO}{FP}\r\n")]).replacen(&format!("{FP}\r\n"), "", 1);
        assert_eq!(check_offer(&media_level), Ok(()));
    }

    #[test]
    fn sizes_are_bounded() {
        let mut many = String::from(VIDEO_RID);
        for i in 0..1000 {
            many.push_str(&format!("a=rid:r{i} send\r\n"));
        }
        assert!(matches!(
            check_offer(&offer(&[AUDIO, &many])),
            Err(SdpError::TooManyRids { count: 1002, .. })
        ));
        let long = format!("{AUDIO}a=msid:s {}\r\n", "x".repeat(5000));
        assert!(matches!(
            check_offer(&offer(&[&long])),
            Err(SdpError::BadMsid { .. })
        ));
        let long_ssrc = format!("{AUDIO}a=ssrc:1 msid:s {}\r\n", "x".repeat(5000));
        assert!(matches!(
            check_offer(&offer(&[&long_ssrc])),
            Err(SdpError::BadMsid { .. })
        ));
        let sections: Vec<&str> = std::iter::repeat_n(AUDIO, MAX_SECTIONS + 1).collect();
        assert!(matches!(
            check_offer(&offer(&sections)),
            Err(SdpError::TooManySections(_))
        ));
    }
}
