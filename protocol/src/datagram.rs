//! UDP datagrams between the coordinator and MCU nodes: a fixed header, then one frame.
//!
//! ```text
//! offset size field
//!  0     2    magic      b"VM"
//!  2     1    version    DATAGRAM_VERSION (1)
//!  3     1    mac        MAC algorithm: 0 = none (the only one today)
//!  4     4    session    u32 BE, the sender's session id (random per boot / session)
//!  8     4    seq        u32 BE, the sender's datagram counter in that session, from 0
//! 12    16    tag        MAC tag; all zero while `mac` is 0
//! 28     …    frame      one protocol frame `[len][major][minor][MessagePack]`, nothing after it
//! ```
//!
//! The 16-byte tag is reserved room for the cluster-key MAC a later release adds (computed
//! over the whole datagram with the tag zeroed); a receiver today refuses any `mac` other
//! than 0 and a non-zero tag, so an authenticated peer is never mistaken for an open one.
//!
//! [`ReplayWindow`] is the receiver side of the sequence number: it drops duplicates and
//! datagrams older than its 64-entry window, accepts reordered ones inside it, and counts all
//! of it ([`RxCounters`]). Both are sans-IO, `no_std` and allocation-free.

use crate::codec::{DecodeError, EncodeError, Frame, MAX_FRAME_LEN, decode_frame, encode_frame};
use crate::msg::{Message, RxCounters};
use core::fmt;

/// First two bytes of every datagram.
pub const DATAGRAM_MAGIC: [u8; 2] = *b"VM";
/// Version of the datagram header (independent of the frame's protocol version).
pub const DATAGRAM_VERSION: u8 = 1;
/// Length of the MAC tag room.
pub const MAC_LEN: usize = 16;
/// Bytes before the frame.
pub const DATAGRAM_HEADER_LEN: usize = 12 + MAC_LEN;
/// Largest datagram: the header and the largest frame (fits a 1500-byte Ethernet MTU).
pub const MAX_DATAGRAM_LEN: usize = DATAGRAM_HEADER_LEN + MAX_FRAME_LEN;
/// `mac` value of an unauthenticated datagram.
pub const MAC_NONE: u8 = 0;

/// The header of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatagramHeader {
    /// The sender's session id.
    pub session: u32,
    /// The sender's datagram counter.
    pub seq: u32,
}

/// Why a datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DatagramError {
    /// Shorter than the header.
    TooShort,
    /// Does not start with [`DATAGRAM_MAGIC`].
    BadMagic,
    /// A header version this build does not know.
    UnsupportedVersion(u8),
    /// A MAC algorithm this build does not know (or a key it does not have).
    UnsupportedMac(u8),
    /// `mac` is 0 but the tag is not all zero.
    NonZeroTag,
    /// The frame inside is bad (including a protocol major version mismatch).
    Frame(DecodeError),
    /// Bytes after the frame.
    TrailingBytes,
}

impl fmt::Display for DatagramError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatagramError::TooShort => write!(f, "datagram shorter than its header"),
            DatagramError::BadMagic => write!(f, "not a VoiceMesh datagram (bad magic)"),
            DatagramError::UnsupportedVersion(v) => {
                write!(f, "datagram header version {v} is not supported")
            }
            DatagramError::UnsupportedMac(m) => {
                write!(f, "datagram MAC algorithm {m} is not supported")
            }
            DatagramError::NonZeroTag => write!(f, "unauthenticated datagram with a MAC tag"),
            DatagramError::Frame(e) => write!(f, "datagram frame: {e}"),
            DatagramError::TrailingBytes => write!(f, "datagram has bytes after its frame"),
        }
    }
}

impl core::error::Error for DatagramError {}

impl From<DecodeError> for DatagramError {
    fn from(e: DecodeError) -> Self {
        DatagramError::Frame(e)
    }
}

/// Checks the header of `buf`; returns it and the frame bytes (exactly one frame's worth is
/// not checked here: see [`decode_datagram`]).
pub fn parse_header(buf: &[u8]) -> Result<(DatagramHeader, &[u8]), DatagramError> {
    if buf.len() < DATAGRAM_HEADER_LEN {
        return Err(DatagramError::TooShort);
    }
    if buf[..2] != DATAGRAM_MAGIC {
        return Err(DatagramError::BadMagic);
    }
    if buf[2] != DATAGRAM_VERSION {
        return Err(DatagramError::UnsupportedVersion(buf[2]));
    }
    if buf[3] != MAC_NONE {
        return Err(DatagramError::UnsupportedMac(buf[3]));
    }
    if buf[12..DATAGRAM_HEADER_LEN].iter().any(|&b| b != 0) {
        return Err(DatagramError::NonZeroTag);
    }
    let session = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let seq = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
    Ok((DatagramHeader { session, seq }, &buf[DATAGRAM_HEADER_LEN..]))
}

/// A frame decoder: [`decode_frame`] or `codec::portable::decode_frame`.
pub type FrameDecoder = fn(&[u8]) -> Result<(Frame, usize), DecodeError>;

/// Decodes a whole datagram with `decode` (one of the frame decoders).
pub fn decode_datagram_with(
    buf: &[u8],
    decode: FrameDecoder,
) -> Result<(DatagramHeader, Frame), DatagramError> {
    let (header, rest) = parse_header(buf)?;
    let (frame, used) = decode(rest)?;
    if used != rest.len() {
        return Err(DatagramError::TrailingBytes);
    }
    Ok((header, frame))
}

/// Decodes a whole datagram (the frame with [`decode_frame`]).
pub fn decode_datagram(buf: &[u8]) -> Result<(DatagramHeader, Frame), DatagramError> {
    decode_datagram_with(buf, decode_frame)
}

/// Writes the header for `header` into `out[..DATAGRAM_HEADER_LEN]` (tag zeroed).
pub fn write_header(header: DatagramHeader, out: &mut [u8]) -> Result<(), EncodeError> {
    let h = out
        .get_mut(..DATAGRAM_HEADER_LEN)
        .ok_or(EncodeError::BufferTooSmall)?;
    h[..2].copy_from_slice(&DATAGRAM_MAGIC);
    h[2] = DATAGRAM_VERSION;
    h[3] = MAC_NONE;
    h[4..8].copy_from_slice(&header.session.to_be_bytes());
    h[8..12].copy_from_slice(&header.seq.to_be_bytes());
    h[12..].fill(0);
    Ok(())
}

/// Encodes `msg` as a datagram into `out` (the frame with [`encode_frame`]); returns its
/// length.
pub fn encode_datagram(
    header: DatagramHeader,
    msg: &Message,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    write_header(header, out)?;
    let n = encode_frame(msg, &mut out[DATAGRAM_HEADER_LEN..])?;
    Ok(DATAGRAM_HEADER_LEN + n)
}

/// Width of the [`ReplayWindow`]: how far back a reordered datagram is still accepted.
pub const REPLAY_WINDOW: u32 = 64;

/// What the [`ReplayWindow`] made of a sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqVerdict {
    /// New and in order (or the first of a session): deliver it.
    Fresh,
    /// New but older than the newest seen, inside the window: deliver it.
    Reordered,
    /// Seen before: drop it.
    Duplicate,
    /// Older than the window: drop it (a replay, or too late to matter).
    TooOld,
}

impl SeqVerdict {
    /// Whether the datagram should be delivered.
    pub const fn accept(self) -> bool {
        matches!(self, SeqVerdict::Fresh | SeqVerdict::Reordered)
    }
}

/// Receiver-side sequence tracking for one peer: duplicate, replay and reorder detection.
///
/// Call [`ReplayWindow::check`] with each datagram's header after it parsed, and deliver the
/// message only if the verdict [accepts](SeqVerdict::accept). A new session id from the peer
/// (it restarted) resets the window; [`ReplayWindow::reset`] forgets the peer entirely.
/// Sequence numbers do not wrap within a session (2³² datagrams at 1 kHz is 49 days); a
/// sender that reaches `u32::MAX` starts a new session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    /// Session id of the peer, once one datagram was accepted.
    session: Option<u32>,
    /// Newest sequence number accepted.
    top: u32,
    /// Bit `i` set: `top − i` was accepted.
    seen: u64,
    counters: RxCounters,
}

impl ReplayWindow {
    /// An empty window.
    pub const fn new() -> Self {
        ReplayWindow {
            session: None,
            top: 0,
            seen: 0,
            counters: RxCounters {
                accepted: 0,
                duplicates: 0,
                replays: 0,
                reordered: 0,
                gaps: 0,
                malformed: 0,
            },
        }
    }

    /// The peer's session id, once known.
    pub const fn session(&self) -> Option<u32> {
        self.session
    }

    /// The counters so far.
    pub const fn counters(&self) -> RxCounters {
        self.counters
    }

    /// Counts a datagram that did not even parse.
    pub fn count_malformed(&mut self) {
        self.counters.malformed = self.counters.malformed.saturating_add(1);
    }

    /// Forgets the peer's session (the counters stay).
    pub fn reset(&mut self) {
        self.session = None;
        self.top = 0;
        self.seen = 0;
    }

    /// Judges `header` and records it when accepted.
    pub fn check(&mut self, header: DatagramHeader) -> SeqVerdict {
        let c = &mut self.counters;
        if self.session != Some(header.session) {
            self.session = Some(header.session);
            self.top = header.seq;
            self.seen = 1;
            c.accepted = c.accepted.saturating_add(1);
            return SeqVerdict::Fresh;
        }
        let verdict = if header.seq > self.top {
            let ahead = header.seq - self.top;
            c.gaps = c.gaps.saturating_add(ahead - 1);
            self.seen = if ahead >= 64 {
                1
            } else {
                (self.seen << ahead) | 1
            };
            self.top = header.seq;
            SeqVerdict::Fresh
        } else {
            let behind = self.top - header.seq;
            if behind >= REPLAY_WINDOW {
                c.replays = c.replays.saturating_add(1);
                return SeqVerdict::TooOld;
            }
            let bit = 1u64 << behind;
            if self.seen & bit != 0 {
                c.duplicates = c.duplicates.saturating_add(1);
                return SeqVerdict::Duplicate;
            }
            self.seen |= bit;
            c.reordered = c.reordered.saturating_add(1);
            // It was counted as a gap when the newer one arrived; it was not lost after all.
            c.gaps = c.gaps.saturating_sub(1);
            SeqVerdict::Reordered
        };
        c.accepted = c.accepted.saturating_add(1);
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(seq: u32) -> DatagramHeader {
        DatagramHeader { session: 7, seq }
    }

    #[test]
    fn window_counts_duplicates_reorder_gaps_and_replays() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.check(h(0)), SeqVerdict::Fresh);
        assert_eq!(w.check(h(1)), SeqVerdict::Fresh);
        assert_eq!(w.check(h(1)), SeqVerdict::Duplicate);
        assert_eq!(w.check(h(4)), SeqVerdict::Fresh);
        assert_eq!(w.counters().gaps, 2);
        assert_eq!(w.check(h(3)), SeqVerdict::Reordered);
        assert_eq!(w.check(h(3)), SeqVerdict::Duplicate);
        assert_eq!(w.counters().gaps, 1);
        assert_eq!(w.check(h(100)), SeqVerdict::Fresh);
        assert_eq!(w.check(h(36)), SeqVerdict::TooOld);
        assert_eq!(w.check(h(37)), SeqVerdict::Reordered);
        let c = w.counters();
        assert_eq!(
            (c.accepted, c.duplicates, c.replays, c.reordered),
            (6, 2, 1, 2)
        );
        // A restarted peer (new session id) starts over at any sequence number.
        assert_eq!(
            w.check(DatagramHeader { session: 8, seq: 0 }),
            SeqVerdict::Fresh
        );
        assert_eq!(w.session(), Some(8));
    }

    #[test]
    fn header_round_trip_and_refusals() {
        let msg = Message::Heartbeat(crate::Heartbeat {
            seq: 0,
            now: crate::ClusterTime(5),
        });
        let mut buf = [0u8; MAX_DATAGRAM_LEN];
        let hd = DatagramHeader {
            session: 0xdead_beef,
            seq: 3,
        };
        let n = encode_datagram(hd, &msg, &mut buf).unwrap();
        let (got, frame) = decode_datagram(&buf[..n]).unwrap();
        assert_eq!((got, frame.message), (hd, msg));
        assert_eq!(
            decode_datagram(&buf[..n - 1]).unwrap_err(),
            DatagramError::Frame(DecodeError::Incomplete { needed: n - 28 })
        );
        let mut extra = buf;
        assert_eq!(
            decode_datagram(&extra[..n + 1]).unwrap_err(),
            DatagramError::TrailingBytes
        );
        extra[20] = 1;
        assert_eq!(
            decode_datagram(&extra[..n]).unwrap_err(),
            DatagramError::NonZeroTag
        );
        let mut bad = buf;
        bad[3] = 1;
        assert_eq!(
            decode_datagram(&bad[..n]).unwrap_err(),
            DatagramError::UnsupportedMac(1)
        );
        bad = buf;
        bad[0] = b'X';
        assert_eq!(
            decode_datagram(&bad[..n]).unwrap_err(),
            DatagramError::BadMagic
        );
        assert_eq!(
            decode_datagram(&buf[..27]).unwrap_err(),
            DatagramError::TooShort
        );
    }
}
