//! The SDP a WHIP session reads: the ICE credentials of an offer, and trickle-ICE SDP
//! fragments (`application/trickle-ice-sdpfrag`, RFC 8840) from `PATCH`.

use crate::signal::IceCandidate;

/// The first `a=ice-ufrag:` of an SDP (session or media level).
pub fn ice_ufrag(sdp: &str) -> Option<&str> {
    attr(sdp, "a=ice-ufrag:").next()
}

fn attr<'a>(sdp: &'a str, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    sdp.lines()
        .filter_map(move |l| l.trim().strip_prefix(prefix))
        .map(str::trim)
}

/// A parsed trickle-ICE fragment.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fragment {
    /// The fragment's ICE credentials, if it names them (an ICE restart when they differ
    /// from the session's).
    pub ufrag: Option<String>,
    pub pwd: Option<String>,
    /// The candidates, with the `a=mid` and m-line index of their section.
    pub candidates: Vec<IceCandidate>,
    /// It said `a=end-of-candidates`.
    pub end_of_candidates: bool,
}

/// Why a fragment was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    #[error("the fragment is not text")]
    NotText,
    #[error("line {0} is not an SDP line (`x=...`)")]
    BadLine(usize),
    #[error("line {0}: a candidate outside any `m=` section")]
    CandidateOutsideSection(usize),
    #[error("more than {0} candidates in one fragment")]
    TooManyCandidates(usize),
}

/// Candidates one fragment may carry (the core holds each connection to its own limit too).
pub const MAX_FRAGMENT_CANDIDATES: usize = 64;

/// Parse a fragment: `a=ice-ufrag`, `a=ice-pwd`, then per `m=` section its `a=mid` and
/// `a=candidate` lines, and `a=end-of-candidates`. Lines of other kinds are ignored.
pub fn parse(body: &[u8]) -> Result<Fragment, FragmentError> {
    let text = std::str::from_utf8(body).map_err(|_| FragmentError::NotText)?;
    let mut out = Fragment::default();
    // (m-line index, its mid) of the current section.
    let mut section: Option<(u16, Option<String>)> = None;
    let mut sections: u16 = 0;
    // Candidates of the current section, given their mid once the section ends (a=mid may
    // follow the candidates).
    let mut pending: Vec<String> = Vec::new();
    let flush =
        |section: &Option<(u16, Option<String>)>, pending: &mut Vec<String>, out: &mut Fragment| {
            let ufrag = out.ufrag.clone();
            if let Some((index, mid)) = section {
                for candidate in pending.drain(..) {
                    out.candidates.push(IceCandidate {
                        candidate,
                        sdp_mid: mid.clone(),
                        sdp_mline_index: Some(*index),
                        username_fragment: ufrag.clone(),
                    });
                }
            }
        };
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let b = line.as_bytes();
        if b.len() < 2 || b[1] != b'=' {
            return Err(FragmentError::BadLine(n + 1));
        }
        if line.starts_with("m=") {
            flush(&section, &mut pending, &mut out);
            section = Some((sections, None));
            sections = sections.saturating_add(1);
        } else if let Some(v) = line.strip_prefix("a=ice-ufrag:") {
            out.ufrag = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("a=ice-pwd:") {
            out.pwd = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("a=mid:") {
            if let Some((_, mid)) = section.as_mut() {
                *mid = Some(v.trim().to_owned());
            }
        } else if let Some(v) = line.strip_prefix("a=") {
            if v.starts_with("candidate:") {
                if section.is_none() {
                    return Err(FragmentError::CandidateOutsideSection(n + 1));
                }
                if out.candidates.len() + pending.len() >= MAX_FRAGMENT_CANDIDATES {
                    return Err(FragmentError::TooManyCandidates(MAX_FRAGMENT_CANDIDATES));
                }
                pending.push(v.to_owned());
            } else if v == "end-of-candidates" {
                out.end_of_candidates = true;
            }
        }
    }
    flush(&section, &mut pending, &mut out);
    Ok(out)
}

/// `offer` with new ICE credentials (an ICE restart as RFC 9725 has it: the rest of the
/// offer still applies), its candidates left out (the fragment's are trickled after) and its
/// `o=` session version one higher.
pub fn restart_offer(offer: &str, ufrag: &str, pwd: &str) -> String {
    let mut out = String::with_capacity(offer.len());
    for line in offer.lines().map(str::trim_end) {
        let line = if line.starts_with("a=ice-ufrag:") {
            format!("a=ice-ufrag:{ufrag}")
        } else if line.starts_with("a=ice-pwd:") {
            format!("a=ice-pwd:{pwd}")
        } else if line.starts_with("a=candidate:") || line == "a=end-of-candidates" {
            continue;
        } else if let Some(origin) = line.strip_prefix("o=") {
            let mut f: Vec<String> = origin.split(' ').map(str::to_owned).collect();
            if let Some(n) = f.get(2).and_then(|v| v.parse::<u64>().ok()) {
                f[2] = n.wrapping_add(1).to_string();
            }
            format!("o={}", f.join(" "))
        } else {
            line.to_owned()
        };
        out.push_str(&line);
        out.push_str("\r\n");
    }
    out
}

/// The server's side of an ICE restart as a fragment (RFC 8840, the `200` of a restart
/// `PATCH`): `a=ice-lite` if the answer says so, its new credentials, its first `m=` line and
/// `a=mid`, its candidates and `a=end-of-candidates`.
pub fn answer_fragment(answer: &str) -> String {
    let mut out = String::new();
    let mut push = |l: &str| {
        out.push_str(l);
        out.push_str("\r\n");
    };
    let lines: Vec<&str> = answer.lines().map(str::trim).collect();
    if lines.contains(&"a=ice-lite") {
        push("a=ice-lite");
    }
    for prefix in ["a=ice-ufrag:", "a=ice-pwd:"] {
        if let Some(l) = lines.iter().find(|l| l.starts_with(prefix)) {
            push(l);
        }
    }
    let mut first = lines.iter().skip_while(|l| !l.starts_with("m="));
    if let Some(m) = first.next() {
        push(m);
        if let Some(mid) = first
            .take_while(|l| !l.starts_with("m="))
            .find(|l| l.starts_with("a=mid:"))
        {
            push(mid);
        }
    }
    let mut seen: Vec<&str> = Vec::new();
    for c in lines.iter().filter(|l| l.starts_with("a=candidate:")) {
        if !seen.contains(c) {
            seen.push(c);
            push(c);
        }
    }
    push("a=end-of-candidates");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trickle_fragment() {
        let f = parse(
            b"a=ice-ufrag:EsAw\r\na=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\n\
              m=audio 9 RTP/AVP 0\r\na=mid:0\r\n\
              a=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0\r\n\
              a=candidate:3471623853 1 udp 2122194687 198.51.100.2 61765 typ host\r\n\
              a=end-of-candidates\r\n",
        )
        .unwrap();
        assert_eq!(f.ufrag.as_deref(), Some("EsAw"));
        assert_eq!(f.pwd.as_deref(), Some("P2uYro0UCOQ4zxjKXaWCBui1"));
        assert!(f.end_of_candidates);
        assert_eq!(f.candidates.len(), 2);
        let c = &f.candidates[0];
        assert!(c.candidate.starts_with("candidate:1387637174 1 udp"));
        assert_eq!(c.sdp_mid.as_deref(), Some("0"));
        assert_eq!(c.sdp_mline_index, Some(0));
        assert_eq!(c.username_fragment.as_deref(), Some("EsAw"));
    }

    #[test]
    fn mid_after_candidates_and_several_sections() {
        let f = parse(
            b"m=audio 9 RTP/AVP 0\na=candidate:1 1 udp 1 10.0.0.1 1 typ host\na=mid:a\n\
              m=video 9 RTP/AVP 96\na=mid:v\na=candidate:2 1 udp 1 10.0.0.1 2 typ host\n",
        )
        .unwrap();
        let got: Vec<_> = f
            .candidates
            .iter()
            .map(|c| (c.sdp_mid.clone().unwrap(), c.sdp_mline_index.unwrap()))
            .collect();
        assert_eq!(got, vec![("a".to_owned(), 0), ("v".to_owned(), 1)]);
        assert_eq!(f.ufrag, None);
        assert!(!f.end_of_candidates);
    }

    #[test]
    fn refused_fragments() {
        assert_eq!(parse(b"\xff\xfe"), Err(FragmentError::NotText));
        assert_eq!(parse(b"hello"), Err(FragmentError::BadLine(1)));
        assert_eq!(
            parse(b"a=candidate:1 1 udp 1 10.0.0.1 1 typ host"),
            Err(FragmentError::CandidateOutsideSection(1))
        );
        let mut many = String::from("m=audio 9 RTP/AVP 0\n");
        for i in 0..=MAX_FRAGMENT_CANDIDATES {
            many.push_str(&format!("a=candidate:{i} 1 udp 1 10.0.0.1 {i} typ host\n"));
        }
        assert_eq!(
            parse(many.as_bytes()),
            Err(FragmentError::TooManyCandidates(MAX_FRAGMENT_CANDIDATES))
        );
        // An empty fragment (nothing new) is fine.
        assert_eq!(parse(b""), Ok(Fragment::default()));
    }

    #[test]
    fn a_restart_offer_has_the_new_credentials_and_no_candidates() {
        let offer = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\n\
                     m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ice-ufrag:old\r\na=ice-pwd:oldpwd\r\n\
                     a=mid:0\r\na=candidate:1 1 udp 1 10.0.0.1 1 typ host\r\na=end-of-candidates\r\n\
                     m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=ice-ufrag:old\r\na=ice-pwd:oldpwd\r\na=mid:1\r\n";
        let r = restart_offer(offer, "new", "newpwd");
        assert!(
            r.contains("o=- 4611731400430051336 3 IN IP4 127.0.0.1\r\n"),
            "{r}"
        );
        assert_eq!(r.matches("a=ice-ufrag:new\r\n").count(), 2, "{r}");
        assert_eq!(r.matches("a=ice-pwd:newpwd\r\n").count(), 2, "{r}");
        assert!(!r.contains("old") && !r.contains("candidate"), "{r}");
        assert!(r.contains("a=mid:1\r\n"));
    }

    #[test]
    fn the_answer_as_a_fragment() {
        let answer = "v=0\r\ns=-\r\na=ice-lite\r\na=group:BUNDLE 0 1\r\n\
                      m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ice-ufrag:u\r\na=ice-pwd:p\r\na=mid:0\r\n\
                      a=candidate:1 1 udp 1 127.0.0.1 7882 typ host\r\na=end-of-candidates\r\n\
                      m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\n\
                      a=candidate:1 1 udp 1 127.0.0.1 7882 typ host\r\n";
        assert_eq!(
            answer_fragment(answer),
            "a=ice-lite\r\na=ice-ufrag:u\r\na=ice-pwd:p\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
             a=mid:0\r\na=candidate:1 1 udp 1 127.0.0.1 7882 typ host\r\na=end-of-candidates\r\n"
        );
        // and it parses as one
        let f = parse(answer_fragment(answer).as_bytes()).unwrap();
        assert_eq!(f.ufrag.as_deref(), Some("u"));
        assert_eq!(f.candidates.len(), 1);
    }

    #[test]
    fn offer_ufrag() {
        assert_eq!(
            ice_ufrag("v=0\r\nm=audio 9 x 0\r\na=ice-ufrag:abcd\r\na=ice-pwd:x\r\n"),
            Some("abcd")
        );
        assert_eq!(ice_ufrag("v=0\r\n"), None);
    }
}
