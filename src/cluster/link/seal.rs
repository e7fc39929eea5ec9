//! Sealed datagrams: ChaCha20-Poly1305 (`ring::aead`) under the sending node's key.
//!
//! ```text
//! version u8 | node u32 | salt u32 | counter u64 | ciphertext | tag (16)
//! ```
//!
//! The 17-byte header is the AEAD's associated data (authenticated, not encrypted). The
//! nonce is `salt ‖ counter` (12 bytes): `salt` is drawn at random when the sender starts,
//! `counter` counts the sender's datagrams from 0 and is never reused (a sender whose
//! counter would wrap refuses to seal). The receiver keeps, per sending node, the salt of
//! the first datagram that authenticated under the node's current key and a sliding window of
//! the last [`REPLAY_WINDOW`] counters: a datagram with another salt, a counter already seen
//! or one older than the window is dropped. The window moves only for datagrams that
//! authenticated, so forged datagrams cannot push real ones out of it.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

/// The header's version byte.
pub const VERSION: u8 = 1;
/// Bytes of the header.
pub const HEADER_LEN: usize = 1 + 4 + 4 + 8;
/// Bytes of the authentication tag.
pub const TAG_LEN: usize = 16;
/// Counters the receiver remembers behind the newest one.
pub const REPLAY_WINDOW: u64 = 1024;

/// A node's 32-byte link key.
pub type Key = [u8; 32];

/// Why a datagram was not opened (or not sealed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("datagram too short")]
    Truncated,
    #[error("unknown version {0}")]
    Version(u8),
    #[error("authentication failed")]
    Auth,
    #[error("replayed or too old")]
    Replay,
    #[error("salt of another start of the sender")]
    StaleSalt,
    #[error("nonce counter exhausted")]
    Exhausted,
}

/// A datagram's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub node: u32,
    pub salt: u32,
    pub counter: u64,
}

impl Header {
    /// The header of a datagram (not yet authenticated).
    pub fn parse(d: &[u8]) -> Result<Header, SealError> {
        if d.len() < HEADER_LEN + TAG_LEN {
            return Err(SealError::Truncated);
        }
        if d[0] != VERSION {
            return Err(SealError::Version(d[0]));
        }
        let mut node = [0; 4];
        node.copy_from_slice(&d[1..5]);
        let mut salt = [0; 4];
        salt.copy_from_slice(&d[5..9]);
        let mut counter = [0; 8];
        counter.copy_from_slice(&d[9..17]);
        Ok(Header {
            node: u32::from_be_bytes(node),
            salt: u32::from_be_bytes(salt),
            counter: u64::from_be_bytes(counter),
        })
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        out.extend_from_slice(&self.node.to_be_bytes());
        out.extend_from_slice(&self.salt.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
    }

    fn nonce(&self) -> Nonce {
        let mut n = [0; 12];
        n[..4].copy_from_slice(&self.salt.to_be_bytes());
        n[4..].copy_from_slice(&self.counter.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }
}

fn aead_key(key: &Key) -> LessSafeKey {
    // A 32-byte key is the length ChaCha20-Poly1305 takes: this cannot fail.
    LessSafeKey::new(
        UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte ChaCha20-Poly1305 key"),
    )
}

/// Seals this node's datagrams.
pub struct Sealer {
    key: LessSafeKey,
    node: u32,
    salt: u32,
    counter: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("node", &self.node)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    pub fn new(node: u32, key: &Key, salt: u32) -> Sealer {
        Sealer {
            key: aead_key(key),
            node,
            salt,
            counter: 0,
        }
    }

    /// Seals `plaintext` into `out` (cleared first).
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        if self.counter == u64::MAX {
            return Err(SealError::Exhausted);
        }
        let h = Header {
            node: self.node,
            salt: self.salt,
            counter: self.counter,
        };
        self.counter += 1;
        out.clear();
        h.write(out);
        out.extend_from_slice(plaintext);
        let (aad, body) = out.split_at_mut(HEADER_LEN);
        let tag = self
            .key
            .seal_in_place_separate_tag(h.nonce(), Aad::from(&*aad), body)
            .map_err(|_| SealError::Exhausted)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// Opens one peer's datagrams: its key, the salt it started with, the replay window.
pub struct Opener {
    key: LessSafeKey,
    salt: Option<u32>,
    /// The newest counter accepted (`None`: none yet).
    newest: Option<u64>,
    /// Bit `i`: counter `newest - i` was accepted.
    seen: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("salt", &self.salt)
            .field("newest", &self.newest)
            .finish_non_exhaustive()
    }
}

impl Opener {
    pub fn new(key: &Key) -> Opener {
        Opener {
            key: aead_key(key),
            salt: None,
            newest: None,
            seen: [0; (REPLAY_WINDOW / 64) as usize],
        }
    }

    fn bit(&self, back: u64) -> bool {
        self.seen[(back / 64) as usize] & (1 << (back % 64)) != 0
    }

    /// Whether `counter` is new (not yet accepted, not too old).
    fn fresh(&self, counter: u64) -> bool {
        match self.newest {
            None => true,
            Some(n) if counter > n => true,
            Some(n) => n - counter < REPLAY_WINDOW && !self.bit(n - counter),
        }
    }

    fn accept(&mut self, counter: u64) {
        let n = self.newest.unwrap_or(counter);
        if self.newest.is_none() || counter > n {
            let shift = if self.newest.is_none() {
                0
            } else {
                counter - n
            };
            self.shift(shift);
            self.newest = Some(counter);
        }
        let back = self.newest.map_or(0, |n| n - counter);
        self.seen[(back / 64) as usize] |= 1 << (back % 64);
    }

    /// Moves the window `by` counters forward (older bits shift towards the end).
    fn shift(&mut self, by: u64) {
        if by >= REPLAY_WINDOW {
            self.seen = [0; (REPLAY_WINDOW / 64) as usize];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        let len = self.seen.len();
        for i in (0..len).rev() {
            let hi = if i >= words { self.seen[i - words] } else { 0 };
            let lo = if bits > 0 && i > words {
                self.seen[i - words - 1] >> (64 - bits)
            } else {
                0
            };
            self.seen[i] = if bits > 0 { (hi << bits) | lo } else { hi };
        }
    }

    /// The plaintext of `datagram` (whose header is `h`), if it authenticates and is fresh.
    pub fn open<'a>(
        &mut self,
        h: &Header,
        datagram: &[u8],
        buf: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], SealError> {
        if self.salt.is_some_and(|s| s != h.salt) {
            return Err(SealError::StaleSalt);
        }
        if !self.fresh(h.counter) {
            return Err(SealError::Replay);
        }
        if datagram.len() < HEADER_LEN + TAG_LEN {
            return Err(SealError::Truncated);
        }
        buf.clear();
        buf.extend_from_slice(&datagram[HEADER_LEN..]);
        let plain = self
            .key
            .open_in_place(h.nonce(), Aad::from(&datagram[..HEADER_LEN]), buf)
            .map_err(|_| SealError::Auth)?;
        let len = plain.len();
        self.salt = Some(h.salt);
        self.accept(h.counter);
        Ok(&buf[..len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(o: &mut Opener, d: &[u8]) -> Result<Vec<u8>, SealError> {
        let h = Header::parse(d)?;
        let mut buf = Vec::new();
        o.open(&h, d, &mut buf).map(<[u8]>::to_vec)
    }

    #[test]
    fn sealed_datagrams_open_once() {
        let key = [7; 32];
        let mut s = Sealer::new(3, &key, 0xabcd);
        let mut o = Opener::new(&key);
        let mut d = Vec::new();
        s.seal(b"hello", &mut d).unwrap();
        assert_eq!(Header::parse(&d).unwrap().node, 3);
        assert_eq!(d.len(), HEADER_LEN + 5 + TAG_LEN);
        assert!(!d.windows(5).any(|w| w == b"hello"), "encrypted");
        assert_eq!(open(&mut o, &d).unwrap(), b"hello");
        assert_eq!(open(&mut o, &d), Err(SealError::Replay));
    }

    #[test]
    fn tampering_and_wrong_keys_fail() {
        let key = [7; 32];
        let mut s = Sealer::new(3, &key, 1);
        let mut d = Vec::new();
        s.seal(b"hello world", &mut d).unwrap();
        for i in 0..d.len() {
            let mut t = d.clone();
            t[i] ^= 0x40;
            let mut o = Opener::new(&key);
            assert!(open(&mut o, &t).is_err(), "byte {i} flipped");
        }
        let mut o = Opener::new(&[8; 32]);
        assert_eq!(open(&mut o, &d), Err(SealError::Auth));
        // A forged datagram does not move the window: the real one still opens.
        let mut o = Opener::new(&key);
        let mut forged = d.clone();
        forged[9..17].copy_from_slice(&100u64.to_be_bytes());
        assert_eq!(open(&mut o, &forged), Err(SealError::Auth));
        assert!(open(&mut o, &d).is_ok());
        for n in 0..HEADER_LEN + TAG_LEN {
            assert_eq!(open(&mut o, &d[..n]), Err(SealError::Truncated));
        }
    }

    #[test]
    fn replay_window_accepts_reordering_and_rejects_repeats() {
        let key = [1; 32];
        let mut s = Sealer::new(1, &key, 9);
        let ds: Vec<Vec<u8>> = (0..3000)
            .map(|i| {
                let mut d = Vec::new();
                s.seal(&[i as u8], &mut d).unwrap();
                d
            })
            .collect();
        let mut o = Opener::new(&key);
        // Newest first within blocks of 100: every one opens once.
        for block in ds.chunks(100) {
            for d in block.iter().rev() {
                assert!(open(&mut o, d).is_ok());
            }
            for d in block {
                assert_eq!(open(&mut o, d), Err(SealError::Replay));
            }
        }
        // Skip far ahead: what fell out of the window is refused even though never seen.
        let mut o = Opener::new(&key);
        assert!(open(&mut o, &ds[0]).is_ok());
        assert!(open(&mut o, &ds[2000]).is_ok());
        assert_eq!(open(&mut o, &ds[1]), Err(SealError::Replay));
        assert!(open(&mut o, &ds[1500]).is_ok());
        assert!(open(&mut o, &ds[1999]).is_ok());
        assert_eq!(open(&mut o, &ds[1500]), Err(SealError::Replay));
        // Another start of the sender (same key, new salt) is refused.
        let mut s2 = Sealer::new(1, &key, 10);
        let mut d = Vec::new();
        s2.seal(b"x", &mut d).unwrap();
        assert_eq!(open(&mut o, &d), Err(SealError::StaleSalt));
    }
}
