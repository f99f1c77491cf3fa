//! AppleMIDI session packets and the RTP-MIDI payload (RFC 6295), parsed and written.
//!
//! Checked parsing only: every function takes a byte slice of any length and content and
//! returns a small error instead of panicking. Layouts are in `docs/midi.md` and
//! `shared/protocols/rtp-midi.md`; all integers are big-endian.

use core::fmt;

/// RTP payload type AppleMIDI uses (dynamic, 97).
pub const PAYLOAD_TYPE: u8 = 0x61;
/// AppleMIDI session protocol version.
pub const PROTOCOL_VERSION: u32 = 2;
/// Longest session name we send or keep, in bytes.
pub const MAX_NAME: usize = 64;
/// Longest MIDI list we put in one packet (fits one Ethernet frame with headers).
pub const MAX_LIST: usize = 1400;

/// Why bytes were not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum WireError {
    /// Shorter than the packet's fixed part.
    Truncated,
    /// Not `FF FF` + a known two-letter command.
    UnknownCommand,
    /// Not RTP version 2.
    NotRtp,
    /// The MIDI list is longer than the datagram.
    BadLength,
    /// A command in the MIDI list is malformed (data byte without status, cut short, …).
    BadCommand,
    /// A delta time longer than 4 bytes.
    BadDelta,
    /// The journal's lengths do not fit the datagram.
    BadJournal,
    /// A clock-sync count other than 0, 1 or 2.
    BadSyncCount,
}

impl WireError {
    /// Every error, for listing counters.
    pub const ALL: [WireError; 8] = [
        WireError::Truncated,
        WireError::UnknownCommand,
        WireError::NotRtp,
        WireError::BadLength,
        WireError::BadCommand,
        WireError::BadDelta,
        WireError::BadJournal,
        WireError::BadSyncCount,
    ];

    /// Name used in counters.
    pub const fn as_str(self) -> &'static str {
        match self {
            WireError::Truncated => "truncated",
            WireError::UnknownCommand => "unknown_command",
            WireError::NotRtp => "not_rtp",
            WireError::BadLength => "bad_length",
            WireError::BadCommand => "bad_command",
            WireError::BadDelta => "bad_delta",
            WireError::BadJournal => "bad_journal",
            WireError::BadSyncCount => "bad_sync_count",
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl core::error::Error for WireError {}

/// The body of IN, OK, NO and BY.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// Protocol version (2; others are accepted and echoed as 2).
    pub version: u32,
    /// The initiator's token.
    pub token: u32,
    /// The sender's SSRC.
    pub ssrc: u32,
    /// The sender's session name (NUL-terminated UTF-8 on the wire; optional).
    pub name: Option<String>,
}

/// A clock-synchronisation exchange step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sync {
    /// The sender's SSRC.
    pub ssrc: u32,
    /// 0, 1 or 2.
    pub count: u8,
    /// Timestamps in 100 µs units.
    pub ts: [u64; 3],
}

/// An AppleMIDI control packet (starts with `FF FF`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// `IN`: invitation.
    Invitation(Exchange),
    /// `OK`: invitation accepted.
    Accepted(Exchange),
    /// `NO`: invitation rejected.
    Rejected(Exchange),
    /// `BY`: end of session.
    End(Exchange),
    /// `CK`: clock synchronisation.
    Sync(Sync),
    /// `RS`: receiver feedback, the highest sequence number received.
    Feedback {
        /// The receiver's SSRC.
        ssrc: u32,
        /// Highest RTP sequence number it received.
        seq: u16,
    },
    /// `RL`: receive bit-rate limit (no tested peer sends it; ignored).
    Limit,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Whether a datagram is an AppleMIDI control packet rather than RTP.
pub fn is_control(b: &[u8]) -> bool {
    b.len() >= 2 && b[0] == 0xFF && b[1] == 0xFF
}

impl Control {
    /// Parses a control packet.
    pub fn parse(b: &[u8]) -> Result<Control, WireError> {
        if b.len() < 4 {
            return Err(WireError::Truncated);
        }
        if !is_control(b) {
            return Err(WireError::UnknownCommand);
        }
        let exchange = || -> Result<Exchange, WireError> {
            let (version, token, ssrc) = match (be32(b, 4), be32(b, 8), be32(b, 12)) {
                (Some(v), Some(t), Some(s)) => (v, t, s),
                _ => return Err(WireError::Truncated),
            };
            let rest = &b[16..];
            let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
            let raw = &rest[..end.min(MAX_NAME)];
            let name = core::str::from_utf8(raw)
                .ok()
                .filter(|s| !s.is_empty())
                .map(str::to_owned);
            Ok(Exchange {
                version,
                token,
                ssrc,
                name,
            })
        };
        match &b[2..4] {
            b"IN" => exchange().map(Control::Invitation),
            b"OK" => exchange().map(Control::Accepted),
            b"NO" => exchange().map(Control::Rejected),
            b"BY" => exchange().map(Control::End),
            b"CK" => {
                let (Some(ssrc), Some(t1), Some(t2), Some(t3)) =
                    (be32(b, 4), be64(b, 12), be64(b, 20), be64(b, 28))
                else {
                    return Err(WireError::Truncated);
                };
                let count = b[8];
                if count > 2 {
                    return Err(WireError::BadSyncCount);
                }
                Ok(Control::Sync(Sync {
                    ssrc,
                    count,
                    ts: [t1, t2, t3],
                }))
            }
            b"RS" => {
                let (Some(ssrc), Some(seq)) = (be32(b, 4), b.get(8..10)) else {
                    return Err(WireError::Truncated);
                };
                Ok(Control::Feedback {
                    ssrc,
                    seq: u16::from_be_bytes([seq[0], seq[1]]),
                })
            }
            b"RL" => Ok(Control::Limit),
            _ => Err(WireError::UnknownCommand),
        }
    }

    /// Writes the packet.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[0xFF, 0xFF]);
        let exchange = |out: &mut Vec<u8>, cmd: &[u8; 2], e: &Exchange, with_name: bool| {
            out.extend_from_slice(cmd);
            out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
            out.extend_from_slice(&e.token.to_be_bytes());
            out.extend_from_slice(&e.ssrc.to_be_bytes());
            if with_name && let Some(n) = &e.name {
                let mut end = n.len().min(MAX_NAME);
                while !n.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend(n.as_bytes()[..end].iter().filter(|&&c| c != 0));
                out.push(0);
            }
        };
        match self {
            Control::Invitation(e) => exchange(out, b"IN", e, true),
            Control::Accepted(e) => exchange(out, b"OK", e, true),
            Control::Rejected(e) => exchange(out, b"NO", e, false),
            Control::End(e) => exchange(out, b"BY", e, false),
            Control::Sync(s) => {
                out.extend_from_slice(b"CK");
                out.extend_from_slice(&s.ssrc.to_be_bytes());
                out.extend_from_slice(&[s.count, 0, 0, 0]);
                for t in s.ts {
                    out.extend_from_slice(&t.to_be_bytes());
                }
            }
            Control::Feedback { ssrc, seq } => {
                out.extend_from_slice(b"RS");
                out.extend_from_slice(&ssrc.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
            }
            Control::Limit => out.extend_from_slice(b"RL\0\0\0\0\0\0\0\0"),
        }
    }

    /// The packet as a new byte vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(36);
        self.emit(&mut v);
        v
    }
}

/// An RTP-MIDI packet, split into its parts. The MIDI list is still raw: decode it with
/// [`crate::rtpmidi::midi::CommandDecoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtpMidi<'a> {
    /// RTP sequence number.
    pub seq: u16,
    /// RTP timestamp (10 kHz session clock).
    pub timestamp: u32,
    /// Sender SSRC.
    pub ssrc: u32,
    /// Z flag: the first command has a delta time too.
    pub z: bool,
    /// P flag: the first command's status byte is a phantom (running status from the previous
    /// packet).
    pub p: bool,
    /// The MIDI list.
    pub list: &'a [u8],
    /// Bytes of the recovery journal, when J was set (validated, not interpreted).
    pub journal: Option<&'a [u8]>,
}

impl<'a> RtpMidi<'a> {
    /// Parses an RTP-MIDI datagram. Padding, CSRCs and a header extension are skipped; the
    /// marker bit and the payload type are not checked (peers differ on both).
    pub fn parse(b: &'a [u8]) -> Result<RtpMidi<'a>, WireError> {
        if b.len() < 12 {
            return Err(WireError::Truncated);
        }
        if b[0] >> 6 != 2 {
            return Err(WireError::NotRtp);
        }
        let mut end = b.len();
        if b[0] & 0x20 != 0 {
            let pad = usize::from(b[end - 1]);
            if pad == 0 || pad > end - 12 {
                return Err(WireError::BadLength);
            }
            end -= pad;
        }
        let mut pos = 12 + 4 * usize::from(b[0] & 0x0F);
        if b[0] & 0x10 != 0 {
            let words = b
                .get(pos + 2..pos + 4)
                .map(|w| usize::from(u16::from_be_bytes([w[0], w[1]])))
                .ok_or(WireError::Truncated)?;
            pos += 4 + 4 * words;
        }
        if pos >= end {
            return Err(WireError::Truncated);
        }
        let flags = b[pos];
        let (len, start) = if flags & 0x80 != 0 {
            let lo = *b
                .get(pos + 1)
                .filter(|_| pos + 1 < end)
                .ok_or(WireError::Truncated)?;
            ((usize::from(flags & 0x0F) << 8) | usize::from(lo), pos + 2)
        } else {
            (usize::from(flags & 0x0F), pos + 1)
        };
        if start + len > end {
            return Err(WireError::BadLength);
        }
        let journal = if flags & 0x40 != 0 {
            let j = &b[start + len..end];
            check_journal(j)?;
            Some(j)
        } else {
            None
        };
        Ok(RtpMidi {
            seq: u16::from_be_bytes([b[2], b[3]]),
            timestamp: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            ssrc: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            z: flags & 0x20 != 0,
            p: flags & 0x10 != 0,
            list: &b[start..start + len],
            journal,
        })
    }
}

/// Walks a recovery journal's structure and checks that every length fits (RFC 6295 §5):
/// a 3-byte header `S Y A H TOTCHAN(4)` and checkpoint; a system journal `S D V Q F X
/// LENGTH(10)` whose length counts its own header; TOTCHAN plus one channel journals
/// `S CHAN(4) H LENGTH(10) TOC(8)` whose length counts their 3-byte header. The chapters are
/// not interpreted: we do no loss recovery.
pub fn check_journal(j: &[u8]) -> Result<(), WireError> {
    if j.len() < 3 {
        return Err(WireError::BadJournal);
    }
    let (y, a) = (j[0] & 0x40 != 0, j[0] & 0x20 != 0);
    let totchan = usize::from(j[0] & 0x0F) + 1;
    let mut pos = 3;
    if y {
        let h = j.get(pos..pos + 2).ok_or(WireError::BadJournal)?;
        let len = usize::from(u16::from_be_bytes([h[0] & 0x03, h[1]]));
        if len < 2 || pos + len > j.len() {
            return Err(WireError::BadJournal);
        }
        pos += len;
    }
    if a {
        for _ in 0..totchan {
            let h = j.get(pos..pos + 3).ok_or(WireError::BadJournal)?;
            let len = usize::from(u16::from_be_bytes([h[0] & 0x03, h[1]]));
            if len < 3 || pos + len > j.len() {
                return Err(WireError::BadJournal);
            }
            pos += len;
        }
    }
    Ok(())
}

/// Writes an RTP-MIDI packet: M=0 (rtpMIDI for Windows drops M=1), J=0, Z=0 (the first
/// command has no delta time), the long length form when the list is over 15 bytes. `list`
/// is a MIDI list as written by [`push_command`]; it must be at most 4095 bytes.
pub fn emit_rtp(out: &mut Vec<u8>, seq: u16, timestamp: u32, ssrc: u32, list: &[u8]) {
    out.push(0x80);
    out.push(PAYLOAD_TYPE);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&timestamp.to_be_bytes());
    out.extend_from_slice(&ssrc.to_be_bytes());
    let len = list.len().min(0x0FFF);
    if len > 15 {
        out.push(0x80 | (len >> 8) as u8);
        out.push(len as u8);
    } else {
        out.push(len as u8);
    }
    out.extend_from_slice(&list[..len]);
}

/// Appends one command to a MIDI list: its delta time (omitted for the first command of the
/// list) and its bytes, status included.
pub fn push_command(list: &mut Vec<u8>, delta: u32, bytes: &[u8]) {
    if !list.is_empty() {
        push_delta(list, delta);
    }
    list.extend_from_slice(bytes);
}

/// Appends a delta time (1–4 bytes, 7 bits each, most significant first; capped at 2²⁸ − 1).
pub fn push_delta(list: &mut Vec<u8>, delta: u32) {
    let d = delta.min(0x0FFF_FFFF);
    let mut started = false;
    for shift in [21u32, 14, 7] {
        let part = ((d >> shift) & 0x7F) as u8;
        if started || part != 0 {
            list.push(0x80 | part);
            started = true;
        }
    }
    list.push((d & 0x7F) as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invitation_round_trips_and_matches_the_layout() {
        let c = Control::Invitation(Exchange {
            version: 2,
            token: 0x0102_0304,
            ssrc: 0xAABB_CCDD,
            name: Some("VoiceMesh".into()),
        });
        let b = c.to_vec();
        assert_eq!(
            &b[..16],
            &[
                0xFF, 0xFF, b'I', b'N', 0, 0, 0, 2, 1, 2, 3, 4, 0xAA, 0xBB, 0xCC, 0xDD
            ]
        );
        assert_eq!(&b[16..], b"VoiceMesh\0");
        assert_eq!(Control::parse(&b), Ok(c));
    }

    #[test]
    fn a_name_without_nul_or_with_bad_utf8_is_tolerated() {
        let mut b = Control::End(Exchange {
            version: 2,
            token: 7,
            ssrc: 9,
            name: None,
        })
        .to_vec();
        assert_eq!(b.len(), 16);
        b.extend_from_slice(b"abc");
        let Ok(Control::End(e)) = Control::parse(&b) else {
            panic!()
        };
        assert_eq!(e.name.as_deref(), Some("abc"));
        b.truncate(16);
        b.extend_from_slice(&[0xC3, 0x28, 0]);
        let Ok(Control::End(e)) = Control::parse(&b) else {
            panic!()
        };
        assert_eq!(e.name, None);
    }

    #[test]
    fn sync_is_36_bytes_and_round_trips() {
        let c = Control::Sync(Sync {
            ssrc: 5,
            count: 1,
            ts: [1, 2, u64::MAX],
        });
        let b = c.to_vec();
        assert_eq!(b.len(), 36);
        assert_eq!(Control::parse(&b), Ok(c));
        let mut bad = b.clone();
        bad[8] = 3;
        assert_eq!(Control::parse(&bad), Err(WireError::BadSyncCount));
        assert_eq!(Control::parse(&b[..35]), Err(WireError::Truncated));
    }

    #[test]
    fn feedback_is_12_bytes() {
        let c = Control::Feedback {
            ssrc: 0x0A0B_0C0D,
            seq: 0x1234,
        };
        let b = c.to_vec();
        assert_eq!(
            b,
            [
                0xFF, 0xFF, b'R', b'S', 0x0A, 0x0B, 0x0C, 0x0D, 0x12, 0x34, 0, 0
            ]
        );
        assert_eq!(Control::parse(&b), Ok(c));
    }

    #[test]
    fn the_notes_example_packet_parses() {
        // From the protocol notes: note-on, then note-off 1 ms later (M=1 accepted).
        let b = [
            0x80, 0xe1, 0xef, 0xba, 0x00, 0x00, 0x18, 0x1c, 0xe8, 0x9b, 0x58, 0x3a, 0x07, 0x90,
            0x3c, 0x64, 0x0a, 0x80, 0x3c, 0x00,
        ];
        let p = RtpMidi::parse(&b).unwrap();
        assert_eq!(p.seq, 0xefba);
        assert_eq!(p.timestamp, 0x181c);
        assert_eq!(p.ssrc, 0xe89b_583a);
        assert!(!p.z && !p.p && p.journal.is_none());
        assert_eq!(p.list, &[0x90, 0x3c, 0x64, 0x0a, 0x80, 0x3c, 0x00]);
    }

    #[test]
    fn long_lists_use_the_12_bit_length() {
        let list: Vec<u8> = (0..100).flat_map(|i| [0x90, i, 1]).collect();
        let mut b = Vec::new();
        emit_rtp(&mut b, 1, 2, 3, &list);
        assert_eq!(b[1], PAYLOAD_TYPE, "M=0");
        assert_eq!(b[12] & 0xF0, 0x80);
        let p = RtpMidi::parse(&b).unwrap();
        assert_eq!(p.list, &list[..]);
        assert_eq!(RtpMidi::parse(&b[..b.len() - 1]), Err(WireError::BadLength));
    }

    #[test]
    fn a_journal_is_walked_and_skipped() {
        let mut b = Vec::new();
        emit_rtp(&mut b, 1, 2, 3, &[0x90, 60, 100]);
        b[12] |= 0x40;
        // Journal header: A=1, TOTCHAN=0 (one channel), checkpoint 0x0001; one channel
        // journal of 5 bytes (2 header + TOC + 2 chapter bytes).
        b.extend_from_slice(&[0x20, 0x00, 0x01, 0x00, 0x05, 0x00, 0xAA, 0xBB]);
        let p = RtpMidi::parse(&b).unwrap();
        assert_eq!(p.list, &[0x90, 60, 100]);
        assert_eq!(p.journal.map(<[u8]>::len), Some(8));
        // A channel journal claiming more than there is.
        let n = b.len();
        b[n - 4] = 0x09;
        assert_eq!(RtpMidi::parse(&b), Err(WireError::BadJournal));
    }

    #[test]
    fn delta_times_are_midi_vlq() {
        for (d, bytes) in [
            (0u32, vec![0x00]),
            (0x7F, vec![0x7F]),
            (0x80, vec![0x81, 0x00]),
            (100, vec![0x64]),
            (0x3FFF, vec![0xFF, 0x7F]),
            (0x0FFF_FFFF, vec![0xFF, 0xFF, 0xFF, 0x7F]),
        ] {
            let mut v = Vec::new();
            push_delta(&mut v, d);
            assert_eq!(v, bytes, "{d}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        for len in 0..64 {
            for seed in 0..64u8 {
                let b: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                    .collect();
                let _ = Control::parse(&b);
                let _ = RtpMidi::parse(&b);
            }
        }
    }
}
