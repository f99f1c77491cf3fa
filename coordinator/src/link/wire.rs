//! Link's wire format: discovery messages (`_asdp_v\x01`), measurement messages
//! (`_link_v\x01`) and the TLV payload entries both carry. See
//! `shared/protocols/ableton-link.md` §2–§5 and docs/link.md.
//!
//! Parsing is checked: a datagram too short, with another magic, with an entry that claims
//! more bytes than remain, or with a known entry of the wrong size is a [`WireError`]; entries
//! with unknown keys are skipped. Encoding never produces more than [`MAX_DATAGRAM`] bytes.

use core::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

/// Discovery magic, the first 8 bytes of ALIVE/RESPONSE/BYEBYE.
pub const DISCOVERY_MAGIC: [u8; 8] = *b"_asdp_v\x01";
/// Measurement magic, the first 8 bytes of PING/PONG.
pub const MEASUREMENT_MAGIC: [u8; 8] = *b"_link_v\x01";
/// Largest datagram Link sends or accepts.
pub const MAX_DATAGRAM: usize = 512;
/// Length of a discovery header.
pub const DISCOVERY_HEADER: usize = 20;
/// Largest PING payload a responder answers (room for `__ht` and `_pgt`).
pub const MAX_PING_PAYLOAD: usize = 32;

const fn fourcc(s: &[u8; 4]) -> u32 {
    u32::from_be_bytes(*s)
}
/// `tmln`: the session timeline.
pub const KEY_TIMELINE: u32 = fourcc(b"tmln");
/// `sess`: the session id.
pub const KEY_SESSION: u32 = fourcc(b"sess");
/// `stst`: the start/stop state.
pub const KEY_START_STOP: u32 = fourcc(b"stst");
/// `mep4`: the IPv4 measurement endpoint.
pub const KEY_MEP4: u32 = fourcc(b"mep4");
/// `__ht`: host time (measurement).
pub const KEY_HOST_TIME: u32 = fourcc(b"__ht");
/// `__gt`: ghost time (measurement).
pub const KEY_GHOST_TIME: u32 = fourcc(b"__gt");
/// `_pgt`: previous ghost time (measurement).
pub const KEY_PREV_GHOST_TIME: u32 = fourcc(b"_pgt");

/// Eight bytes naming a peer instance; a session is named by its founder's NodeId.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(pub [u8; 8]);

/// A session id has the same form as a [`NodeId`].
pub type SessionId = NodeId;

impl NodeId {
    /// An id of 8 printable ASCII characters (33..=126), as Ableton's peers draw them, from
    /// 64 random bits.
    pub fn from_random(mut r: u64) -> Self {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = 33 + (r % 94) as u8;
            r /= 94;
            // 94^8 < 2^64: every byte gets fresh bits.
        }
        NodeId(b)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId(")?;
        for &c in &self.0 {
            if c.is_ascii_graphic() {
                write!(f, "{}", c as char)?;
            } else {
                write!(f, "\\x{c:02x}")?;
            }
        }
        write!(f, ")")
    }
}

/// A session timeline as Link puts it on the wire:
/// `beats(ghost) = beat_origin + (ghost − time_origin) / micros_per_beat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WireTimeline {
    /// Length of a beat in µs (`round(60e6 / bpm)`).
    pub micros_per_beat: i64,
    /// Beat at `time_origin`, in micro-beats.
    pub beat_origin: i64,
    /// Ghost time (µs) at which the beat is `beat_origin`.
    pub time_origin: i64,
}

/// Fastest tempo Link accepts, as µs per beat (999 BPM).
pub const MIN_MICROS_PER_BEAT: i64 = 60_060;
/// Slowest tempo Link accepts, as µs per beat (20 BPM).
pub const MAX_MICROS_PER_BEAT: i64 = 3_000_000;

impl WireTimeline {
    /// `micros_per_beat` for `bpm`, rounded, within 20–999 BPM.
    pub fn micros_per_beat_of(bpm: f64) -> i64 {
        let bpm = if bpm.is_finite() { bpm } else { 120.0 };
        ((60e6 / bpm.clamp(20.0, 999.0)).round() as i64)
            .clamp(MIN_MICROS_PER_BEAT, MAX_MICROS_PER_BEAT)
    }

    /// Tempo in BPM.
    pub fn bpm(&self) -> f64 {
        60e6 / self.micros_per_beat.max(1) as f64
    }

    /// Beat at ghost time `ghost`, in micro-beats (rounded to nearest).
    pub fn beats_at(&self, ghost: i64) -> i64 {
        let dt = i128::from(ghost) - i128::from(self.time_origin);
        let mpb = i128::from(self.micros_per_beat.max(1));
        let num = dt * 1_000_000;
        let db = (2 * num + mpb).div_euclid(2 * mpb);
        clamp64(i128::from(self.beat_origin) + db)
    }

    /// Ghost time (µs) at which the beat is `micro_beats` (rounded to nearest).
    pub fn time_at(&self, micro_beats: i64) -> i64 {
        let db = i128::from(micro_beats) - i128::from(self.beat_origin);
        // Saturating: a hostile timeline may hold any i64s; the result is clamped anyway.
        let num = db.saturating_mul(i128::from(self.micros_per_beat.max(1)));
        let dt = num
            .saturating_mul(2)
            .saturating_add(1_000_000)
            .div_euclid(2_000_000);
        clamp64(i128::from(self.time_origin) + dt)
    }

    /// The same line with the tempo clamped to 20–999 BPM (as received tempos are).
    pub fn clamped(mut self) -> Self {
        self.micros_per_beat = self
            .micros_per_beat
            .clamp(MIN_MICROS_PER_BEAT, MAX_MICROS_PER_BEAT);
        self
    }
}

fn clamp64(v: i128) -> i64 {
    v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// Transport state in session terms: playing from session beat `beats`, decided at ghost
/// time `timestamp`. `(false, 0, 0)` is the unset default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StartStop {
    /// Whether the transport plays.
    pub playing: bool,
    /// Session beat (µbeats) at which the change applies.
    pub beats: i64,
    /// Ghost time (µs) at which the change was made.
    pub timestamp: i64,
}

/// What an ALIVE or RESPONSE carries: the sender's session state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerState {
    /// Session timeline.
    pub timeline: WireTimeline,
    /// Session id.
    pub session: SessionId,
    /// Start/stop state (default when absent).
    pub start_stop: StartStop,
    /// IPv4 measurement endpoint, if announced.
    pub mep4: Option<SocketAddrV4>,
}

/// Discovery message type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscoveryKind {
    /// Periodic multicast announcement.
    Alive,
    /// Unicast answer to an ALIVE.
    Response,
    /// Leaving.
    ByeBye,
}

/// A decoded discovery message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Discovery {
    /// Message type.
    pub kind: DiscoveryKind,
    /// Seconds the state stays valid.
    pub ttl: u8,
    /// Group id (0 for every Link peer).
    pub group: u16,
    /// Sender.
    pub node: NodeId,
    /// Sender's state (ALIVE and RESPONSE).
    pub state: Option<PeerState>,
}

/// Measurement message type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeasurementKind {
    /// Initiator → responder.
    Ping,
    /// Responder → initiator.
    Pong,
}

/// A decoded PING or PONG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measurement<'a> {
    /// PING or PONG.
    pub kind: MeasurementKind,
    /// `sess` (PONG).
    pub session: Option<SessionId>,
    /// `__gt` (PONG).
    pub ghost_time: Option<i64>,
    /// `__ht`.
    pub host_time: Option<i64>,
    /// `_pgt`.
    pub prev_ghost_time: Option<i64>,
    /// The payload bytes after the type byte (a PONG echoes a PING's verbatim).
    pub payload: &'a [u8],
}

/// Why a datagram was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// Shorter than its header.
    Truncated,
    /// Longer than 512 bytes.
    TooLong,
    /// Another protocol's magic.
    BadMagic,
    /// A message type this peer does not know.
    UnknownType(u8),
    /// An entry claims more bytes than remain.
    EntryOverrun,
    /// A known entry whose size is not the size its type has.
    BadEntrySize {
        /// The entry's key.
        key: u32,
        /// The size it claimed.
        size: u32,
    },
    /// ALIVE/RESPONSE without `tmln` or `sess`.
    MissingEntry(u32),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated => write!(f, "datagram shorter than its header"),
            WireError::TooLong => write!(f, "datagram longer than {MAX_DATAGRAM} bytes"),
            WireError::BadMagic => write!(f, "not a Link datagram (magic)"),
            WireError::UnknownType(t) => write!(f, "unknown message type {t}"),
            WireError::EntryOverrun => write!(f, "payload entry longer than the datagram"),
            WireError::BadEntrySize { key, size } => write!(
                f,
                "entry {} has size {size}",
                String::from_utf8_lossy(&key.to_be_bytes())
            ),
            WireError::MissingEntry(key) => write!(
                f,
                "entry {} missing",
                String::from_utf8_lossy(&key.to_be_bytes())
            ),
        }
    }
}

impl core::error::Error for WireError {}

/// Walks the TLV entries of `payload`, calling `f(key, value)` for each; unknown keys are
/// the callee's to skip.
fn entries(
    payload: &[u8],
    mut f: impl FnMut(u32, &[u8]) -> Result<(), WireError>,
) -> Result<(), WireError> {
    let mut rest = payload;
    while !rest.is_empty() {
        if rest.len() < 8 {
            return Err(WireError::EntryOverrun);
        }
        let key = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let size = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let body = &rest[8..];
        let size_us = usize::try_from(size).map_err(|_| WireError::EntryOverrun)?;
        if size_us > body.len() {
            return Err(WireError::EntryOverrun);
        }
        f(key, &body[..size_us])?;
        rest = &body[size_us..];
    }
    Ok(())
}

fn i64_at(v: &[u8], at: usize) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[at..at + 8]);
    i64::from_be_bytes(b)
}

fn need(key: u32, v: &[u8], size: usize) -> Result<(), WireError> {
    if v.len() == size {
        Ok(())
    } else {
        Err(WireError::BadEntrySize {
            key,
            size: v.len() as u32,
        })
    }
}

fn node_of(v: &[u8]) -> NodeId {
    let mut b = [0u8; 8];
    b.copy_from_slice(v);
    NodeId(b)
}

/// Parses a discovery datagram.
pub fn parse_discovery(d: &[u8]) -> Result<Discovery, WireError> {
    if d.len() > MAX_DATAGRAM {
        return Err(WireError::TooLong);
    }
    if d.len() < DISCOVERY_HEADER {
        return Err(if d.len() >= 8 && d[..8] != DISCOVERY_MAGIC {
            WireError::BadMagic
        } else {
            WireError::Truncated
        });
    }
    if d[..8] != DISCOVERY_MAGIC {
        return Err(WireError::BadMagic);
    }
    let kind = match d[8] {
        1 => DiscoveryKind::Alive,
        2 => DiscoveryKind::Response,
        3 => DiscoveryKind::ByeBye,
        t => return Err(WireError::UnknownType(t)),
    };
    let ttl = d[9];
    let group = u16::from_be_bytes([d[10], d[11]]);
    let node = node_of(&d[12..20]);
    let state = match kind {
        DiscoveryKind::ByeBye => None,
        _ => Some(parse_state(&d[DISCOVERY_HEADER..])?),
    };
    Ok(Discovery {
        kind,
        ttl,
        group,
        node,
        state,
    })
}

fn parse_state(payload: &[u8]) -> Result<PeerState, WireError> {
    let (mut tl, mut sess, mut stst, mut mep4) = (None, None, StartStop::default(), None);
    entries(payload, |key, v| {
        match key {
            KEY_TIMELINE => {
                need(key, v, 24)?;
                tl = Some(WireTimeline {
                    micros_per_beat: i64_at(v, 0),
                    beat_origin: i64_at(v, 8),
                    time_origin: i64_at(v, 16),
                });
            }
            KEY_SESSION => {
                need(key, v, 8)?;
                sess = Some(node_of(v));
            }
            KEY_START_STOP => {
                need(key, v, 17)?;
                stst = StartStop {
                    playing: v[0] != 0,
                    beats: i64_at(v, 1),
                    timestamp: i64_at(v, 9),
                };
            }
            KEY_MEP4 => {
                need(key, v, 6)?;
                mep4 = Some(SocketAddrV4::new(
                    Ipv4Addr::new(v[0], v[1], v[2], v[3]),
                    u16::from_be_bytes([v[4], v[5]]),
                ));
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(PeerState {
        timeline: tl.ok_or(WireError::MissingEntry(KEY_TIMELINE))?,
        session: sess.ok_or(WireError::MissingEntry(KEY_SESSION))?,
        start_stop: stst,
        mep4,
    })
}

/// Parses a measurement datagram. The payload's entries are checked even where not needed,
/// so a malformed PING is never answered.
pub fn parse_measurement(d: &[u8]) -> Result<Measurement<'_>, WireError> {
    if d.len() > MAX_DATAGRAM {
        return Err(WireError::TooLong);
    }
    if d.len() < 9 {
        return Err(WireError::Truncated);
    }
    if d[..8] != MEASUREMENT_MAGIC {
        return Err(WireError::BadMagic);
    }
    let kind = match d[8] {
        1 => MeasurementKind::Ping,
        2 => MeasurementKind::Pong,
        t => return Err(WireError::UnknownType(t)),
    };
    let payload = &d[9..];
    let mut m = Measurement {
        kind,
        session: None,
        ghost_time: None,
        host_time: None,
        prev_ghost_time: None,
        payload,
    };
    entries(payload, |key, v| {
        match key {
            KEY_SESSION => {
                need(key, v, 8)?;
                m.session = Some(node_of(v));
            }
            KEY_GHOST_TIME => {
                need(key, v, 8)?;
                m.ghost_time = Some(i64_at(v, 0));
            }
            KEY_HOST_TIME => {
                need(key, v, 8)?;
                m.host_time = Some(i64_at(v, 0));
            }
            KEY_PREV_GHOST_TIME => {
                need(key, v, 8)?;
                m.prev_ghost_time = Some(i64_at(v, 0));
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(m)
}

fn put_entry(out: &mut Vec<u8>, key: u32, value: &[u8]) {
    if value.is_empty() {
        return;
    }
    out.extend_from_slice(&key.to_be_bytes());
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

fn put_i64(out: &mut Vec<u8>, key: u32, v: i64) {
    put_entry(out, key, &v.to_be_bytes());
}

/// Encodes an ALIVE, RESPONSE or BYEBYE (the state is left out of a BYEBYE).
pub fn encode_discovery(kind: DiscoveryKind, ttl: u8, node: NodeId, state: &PeerState) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&DISCOVERY_MAGIC);
    out.push(match kind {
        DiscoveryKind::Alive => 1,
        DiscoveryKind::Response => 2,
        DiscoveryKind::ByeBye => 3,
    });
    out.push(ttl);
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&node.0);
    if kind == DiscoveryKind::ByeBye {
        return out;
    }
    let tl = &state.timeline;
    let mut v = [0u8; 24];
    v[..8].copy_from_slice(&tl.micros_per_beat.to_be_bytes());
    v[8..16].copy_from_slice(&tl.beat_origin.to_be_bytes());
    v[16..].copy_from_slice(&tl.time_origin.to_be_bytes());
    put_entry(&mut out, KEY_TIMELINE, &v);
    put_entry(&mut out, KEY_SESSION, &state.session.0);
    let s = &state.start_stop;
    let mut v = [0u8; 17];
    v[0] = u8::from(s.playing);
    v[1..9].copy_from_slice(&s.beats.to_be_bytes());
    v[9..].copy_from_slice(&s.timestamp.to_be_bytes());
    put_entry(&mut out, KEY_START_STOP, &v);
    if let Some(m) = state.mep4 {
        let mut v = [0u8; 6];
        v[..4].copy_from_slice(&m.ip().octets());
        v[4..].copy_from_slice(&m.port().to_be_bytes());
        put_entry(&mut out, KEY_MEP4, &v);
    }
    debug_assert!(out.len() <= MAX_DATAGRAM);
    out
}

/// Encodes a PING carrying our host time and, after the first PONG, the previous ghost time.
pub fn encode_ping(host_time: i64, prev_ghost_time: Option<i64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + 32);
    out.extend_from_slice(&MEASUREMENT_MAGIC);
    out.push(1);
    put_i64(&mut out, KEY_HOST_TIME, host_time);
    if let Some(p) = prev_ghost_time {
        put_i64(&mut out, KEY_PREV_GHOST_TIME, p);
    }
    out
}

/// Encodes a PONG: our session, our ghost time, then the PING's payload verbatim.
pub fn encode_pong(session: SessionId, ghost_time: i64, ping_payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + 32 + ping_payload.len());
    out.extend_from_slice(&MEASUREMENT_MAGIC);
    out.push(2);
    put_entry(&mut out, KEY_SESSION, &session.0);
    put_i64(&mut out, KEY_GHOST_TIME, ghost_time);
    out.extend_from_slice(ping_payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The ALIVE LinkHut (Link 3.0.6) sent, captured (protocol notes §3).
    const LINKHUT_ALIVE: &str = "5f617364705f7601 01 05 0000 604e7a2758233a43
        746d6c6e 00000018 0000000000 07a120 0000000000b34962 0000000000000000
        73657373 00000008 604e7a2758233a43
        73747374 00000011 00 0000000000000000 0000000000000000
        6d657034 00000006 7f000001 8dee";

    #[test]
    fn golden_linkhut_alive_decodes_and_reencodes_byte_for_byte() {
        let bytes = hex(LINKHUT_ALIVE);
        assert_eq!(bytes.len(), 107);
        let d = parse_discovery(&bytes).unwrap();
        let node = NodeId(*b"`Nz'X#:C");
        assert_eq!(d.kind, DiscoveryKind::Alive);
        assert_eq!((d.ttl, d.group, d.node), (5, 0, node));
        let st = d.state.unwrap();
        assert_eq!(
            st.timeline,
            WireTimeline {
                micros_per_beat: 500_000,
                beat_origin: 11_749_730,
                time_origin: 0
            }
        );
        assert_eq!(st.timeline.bpm(), 120.0);
        assert_eq!(st.session, node);
        assert_eq!(st.start_stop, StartStop::default());
        assert_eq!(st.mep4, Some("127.0.0.1:36334".parse().unwrap()));
        assert_eq!(encode_discovery(DiscoveryKind::Alive, 5, node, &st), bytes);
        let bye = encode_discovery(DiscoveryKind::ByeBye, 0, node, &st);
        assert_eq!(bye, hex("5f617364705f7601 03 00 0000 604e7a2758233a43"));
    }

    #[test]
    fn golden_ping_and_pong() {
        let ping = hex("5f6c696e6b5f7601 01 5f5f6874 00000008 000000002cf79893");
        assert_eq!(encode_ping(0x2cf7_9893, None), ping);
        let m = parse_measurement(&ping).unwrap();
        assert_eq!(m.kind, MeasurementKind::Ping);
        assert_eq!(m.host_time, Some(0x2cf7_9893));
        let sid = NodeId(*b"abcdefgh");
        let pong = encode_pong(sid, 77, m.payload);
        let mut want = hex("5f6c696e6b5f7601 02 73657373 00000008");
        want.extend_from_slice(b"abcdefgh");
        want.extend(hex("5f5f6774 00000008 000000000000004d"));
        want.extend(hex("5f5f6874 00000008 000000002cf79893"));
        assert_eq!(pong, want);
        let p = parse_measurement(&pong).unwrap();
        assert_eq!(
            (
                p.kind,
                p.session,
                p.ghost_time,
                p.host_time,
                p.prev_ghost_time
            ),
            (
                MeasurementKind::Pong,
                Some(sid),
                Some(77),
                Some(0x2cf7_9893),
                None
            )
        );
        let ping2 = encode_ping(5, Some(-9));
        let p2 = parse_measurement(&ping2).unwrap();
        assert_eq!((p2.host_time, p2.prev_ghost_time), (Some(5), Some(-9)));
    }

    #[test]
    fn unknown_entries_are_skipped_bad_ones_rejected() {
        let mut bytes = hex(LINKHUT_ALIVE);
        // An aep4 entry (Link 4 with Link Audio) and an unknown key are skipped.
        bytes.extend(hex("61657034 00000006 7f000001 1234"));
        bytes.extend(hex("7a7a7a7a 00000000"));
        assert!(parse_discovery(&bytes).is_ok());
        // An entry that claims more than remains.
        let mut over = hex(LINKHUT_ALIVE);
        over.extend(hex("7a7a7a7a 00000009 00"));
        assert_eq!(parse_discovery(&over), Err(WireError::EntryOverrun));
        // A known entry of the wrong size.
        let mut bad = hex(LINKHUT_ALIVE);
        bad[20 + 7] = 0x17;
        assert_eq!(
            parse_discovery(&bad),
            Err(WireError::BadEntrySize {
                key: KEY_TIMELINE,
                size: 23
            })
        );
        assert_eq!(parse_discovery(&bytes[..19]), Err(WireError::Truncated));
        let mut other = bytes.clone();
        other[0] = b'X';
        assert_eq!(parse_discovery(&other), Err(WireError::BadMagic));
        assert_eq!(
            parse_discovery(&hex("5f617364705f7601 01 05 0000 604e7a2758233a43")),
            Err(WireError::MissingEntry(KEY_TIMELINE))
        );
        assert_eq!(parse_measurement(&[0u8; 600]), Err(WireError::TooLong));
    }

    #[test]
    fn timeline_maths_round_trips() {
        let tl = WireTimeline {
            micros_per_beat: 535_714,
            beat_origin: 21_811_448,
            time_origin: 5_030_859,
        };
        assert_eq!(tl.beats_at(tl.time_origin), tl.beat_origin);
        for b in [-3_000_000, 0, 21_811_448, 99_000_001] {
            assert!((tl.beats_at(tl.time_at(b)) - b).abs() <= 1);
        }
        assert_eq!(WireTimeline::micros_per_beat_of(112.0), 535_714);
        assert_eq!(
            WireTimeline::micros_per_beat_of(5000.0),
            MIN_MICROS_PER_BEAT
        );
    }

    #[test]
    fn node_ids_are_printable() {
        for r in [0, 1, u64::MAX, 0x1234_5678_9abc_def0] {
            assert!(
                NodeId::from_random(r)
                    .0
                    .iter()
                    .all(|c| (33..=126).contains(c))
            );
        }
    }
}
