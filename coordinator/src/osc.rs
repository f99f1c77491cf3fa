//! OSC input: the address space, and turning packets into commands.
//!
//! One table ([`table`]) describes every address the coordinator serves: its path, argument
//! types and ranges, access and description. The dispatcher ([`parse_packet`]) checks each
//! message against it, and the OSCQuery server (`crate::oscquery`) serves the same table as its
//! JSON tree, so the two cannot disagree. The address space is documented in `docs/osc.md`.
//!
//! Parsing is a pure function of the bytes, so hostile input is tested without a socket
//! (property tests over random bytes below). Before rosc sees a packet its bundle nesting and
//! array nesting are checked against small limits, so a crafted packet cannot drive the decoder
//! into deep recursion. Every message keeps the timetag of the innermost bundle around it
//! ([`When`]); [`ntp_to_cluster`] maps a timetag to cluster time. The sockets, the timetag
//! scheduler, rate limiting and feedback live in `osc/server.rs`; framing of OSC over TCP in
//! [`slip`].

pub mod limit;
pub mod schedule;
pub(crate) mod server;
pub mod slip;

use std::collections::HashMap;
use std::sync::LazyLock;

use rosc::{OscMessage, OscPacket, OscType};
use voicemesh_node::clock::TAI_OFFSET_NS;
use voicemesh_node::engine::subtractive;
use voicemesh_protocol::ClusterTime;

use crate::allocator::MidiEvent;

/// Address of a note message: `note velocity [channel]`.
pub const NOTE_ADDR: &str = "/voicemesh/note";
/// Address of the panic message: releases every voice.
pub const PANIC_ADDR: &str = "/voicemesh/panic";
/// Address of a control change: `controller value [channel]`.
pub const CC_ADDR: &str = "/voicemesh/cc";
/// Address of a pitch bend: `value [channel]`, value −8192..=8191.
pub const BEND_ADDR: &str = "/voicemesh/bend";
/// Address of channel aftertouch: `value [channel]`.
pub const PRESSURE_ADDR: &str = "/voicemesh/pressure";
/// Prefix of the global engine parameters: `/voicemesh/param/<name> value`.
pub const PARAM_PREFIX: &str = "/voicemesh/param/";
/// Prefix of the per-voice engine parameters: `/voicemesh/voice/<name> note value [channel]`.
pub const VOICE_PREFIX: &str = "/voicemesh/voice/";
/// Address of a direct CV output: `node channel volts`.
pub const CV_ADDR: &str = "/voicemesh/cv";
/// Address of the tempo: `bpm`.
pub const TEMPO_ADDR: &str = "/voicemesh/tempo";
/// Address of the transport: `playing` (1 start, 0 stop).
pub const TRANSPORT_ADDR: &str = "/voicemesh/transport";
/// Address a controller sends to receive state messages: `[port]`.
pub const SUBSCRIBE_ADDR: &str = "/voicemesh/subscribe";
/// Address a controller sends to stop receiving state messages.
pub const UNSUBSCRIBE_ADDR: &str = "/voicemesh/unsubscribe";
/// Prefix of the state messages the coordinator sends to subscribers.
pub const STATE_PREFIX: &str = "/voicemesh/state/";
/// Deepest bundle nesting accepted.
pub const MAX_BUNDLE_DEPTH: usize = 4;
/// Deepest OSC array nesting accepted in a type tag string.
pub const MAX_ARRAY_DEPTH: usize = 2;
/// Seconds from the NTP epoch (1900-01-01) to the Unix epoch (1970-01-01).
pub const NTP_UNIX_OFFSET_S: u64 = 2_208_988_800;
/// Largest volt value a `/voicemesh/cv` message may ask for.
pub const MAX_CV_VOLTS: f64 = crate::cv::MAX_VOLTS;

/// What an OSC message asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum OscCommand {
    /// Start (velocity > 0) or stop (velocity 0) a note.
    Note {
        /// MIDI note number, 0–127.
        note: u8,
        /// MIDI velocity, 0–127; 0 is a note-off.
        velocity: u8,
        /// MIDI channel, 0–15.
        channel: u8,
    },
    /// Release every voice.
    Panic,
    /// A controller message (`/voicemesh/cc`, `/voicemesh/bend`, `/voicemesh/pressure`) for
    /// the allocator and the CV router.
    Midi(MidiEvent),
    /// Set an engine parameter on every voice, now and for voices started later.
    Param {
        /// Engine parameter number.
        param: u16,
        /// Value in the parameter's unit.
        value: f32,
    },
    /// Set an engine parameter on the voices playing one note.
    VoiceParam {
        /// MIDI note number.
        note: u8,
        /// MIDI channel.
        channel: u8,
        /// Engine parameter number.
        param: u16,
        /// Value in the parameter's unit.
        value: f32,
    },
    /// Set one CV output of an MCU node directly.
    Cv {
        /// Node id.
        node: String,
        /// CV channel on the node.
        channel: u16,
        /// Output voltage in microvolts.
        microvolts: i32,
    },
    /// Change the tempo.
    Tempo {
        /// Beats per minute.
        bpm: f64,
    },
    /// Start or stop the transport.
    Transport {
        /// Whether it plays.
        playing: bool,
    },
    /// Send state messages to the sender (at `port` on its address, if given).
    Subscribe {
        /// Reply port; `None` replies to the sender's own port.
        port: Option<u16>,
    },
    /// Stop sending state messages to the sender.
    Unsubscribe,
}

/// When a command should take effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// A bare message, or a bundle with the "immediately" timetag (0 s, fraction 1).
    Now,
    /// A bundle's NTP timetag: seconds since 1900 in the high 32 bits, fraction in the low.
    At(u64),
}

/// Why an OSC packet or message was dropped. Each reason has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// The bytes are not an OSC packet.
    Malformed,
    /// Bundles or arrays nested deeper than the limits.
    TooDeep,
    /// An address this coordinator does not serve.
    UnknownAddress,
    /// Wrong number or types of arguments.
    BadArgs,
    /// A number outside its range or not finite.
    OutOfRange,
    /// The sender exceeded its packet rate.
    RateLimited,
    /// A bundle timetag further ahead than the scheduler accepts.
    TooFarAhead,
    /// The scheduler's queue of future bundles is full.
    QueueFull,
    /// A TCP frame longer than the largest packet.
    Oversize,
    /// A `/voicemesh/cv` message for a node without a session.
    UnknownNode,
}

impl DropReason {
    /// Every reason, for listing counters.
    pub const ALL: [DropReason; 10] = [
        DropReason::Malformed,
        DropReason::TooDeep,
        DropReason::UnknownAddress,
        DropReason::BadArgs,
        DropReason::OutOfRange,
        DropReason::RateLimited,
        DropReason::TooFarAhead,
        DropReason::QueueFull,
        DropReason::Oversize,
        DropReason::UnknownNode,
    ];

    /// Name used in the snapshot and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::TooDeep => "too_deep",
            DropReason::UnknownAddress => "unknown_address",
            DropReason::BadArgs => "bad_args",
            DropReason::OutOfRange => "out_of_range",
            DropReason::RateLimited => "rate_limited",
            DropReason::TooFarAhead => "too_far_ahead",
            DropReason::QueueFull => "queue_full",
            DropReason::Oversize => "oversize",
            DropReason::UnknownNode => "unknown_node",
        }
    }
}

/// What a handler does with a message (the dispatcher's side of the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/voicemesh/note`.
    Note,
    /// `/voicemesh/panic`.
    Panic,
    /// `/voicemesh/cc`.
    Cc,
    /// `/voicemesh/bend`.
    Bend,
    /// `/voicemesh/pressure`.
    Pressure,
    /// `/voicemesh/param/<name>`: the engine parameter with this number.
    Param(u16),
    /// `/voicemesh/voice/<name>`: the engine parameter with this number.
    VoiceParam(u16),
    /// `/voicemesh/cv`.
    Cv,
    /// `/voicemesh/tempo`.
    Tempo,
    /// `/voicemesh/transport`.
    Transport,
    /// `/voicemesh/subscribe`.
    Subscribe,
    /// `/voicemesh/unsubscribe`.
    Unsubscribe,
}

/// OSCQuery access of an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No value (a method without arguments).
    None = 0,
    /// Write only: arguments are sent, nothing is read back.
    Write = 2,
    /// The current value can be read (OSCQuery `VALUE`, and `/voicemesh/state/…`).
    ReadWrite = 3,
}

/// One argument of an address.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Arg {
    /// OSC type tag of the argument as the table lists it: `i`, `f` or `s`. Numbers are
    /// accepted as any of `i`, `h`, `f`, `d` (and `T`/`F` as 1/0) and converted.
    pub tag: char,
    /// Smallest value (numbers).
    pub min: f64,
    /// Largest value (numbers).
    pub max: f64,
    /// The value OSCQuery reports for a write-only argument (a neutral one).
    pub neutral: f64,
    /// What the argument is.
    pub name: &'static str,
}

const fn int(name: &'static str, min: f64, max: f64, neutral: f64) -> Arg {
    Arg {
        tag: 'i',
        min,
        max,
        neutral,
        name,
    }
}

const fn float(name: &'static str, min: f64, max: f64, neutral: f64) -> Arg {
    Arg {
        tag: 'f',
        min,
        max,
        neutral,
        name,
    }
}

const NOTE: Arg = int("note", 0.0, 127.0, 60.0);
const VELOCITY: Arg = int("velocity", 0.0, 127.0, 0.0);
const CHANNEL: Arg = int("channel", 0.0, 15.0, 0.0);
const SEVEN_BIT: Arg = int("value", 0.0, 127.0, 0.0);

/// One address of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct AddressInfo {
    /// Full OSC path.
    pub path: String,
    /// What the dispatcher does with it.
    pub kind: Kind,
    /// Arguments of the full form, in order.
    pub args: Vec<Arg>,
    /// How many of `args` must be present (the rest are optional, trailing).
    pub required: usize,
    /// OSCQuery access.
    pub access: Access,
    /// Human-readable description (OSCQuery `DESCRIPTION`).
    pub description: String,
}

impl AddressInfo {
    /// The OSC type tag string of the full form, e.g. `iii`.
    pub fn type_tags(&self) -> String {
        self.args.iter().map(|a| a.tag).collect()
    }
}

/// Every address the coordinator serves, with a lookup by path.
#[derive(Debug)]
pub struct AddressTable {
    entries: Vec<AddressInfo>,
    by_path: HashMap<String, usize>,
}

impl AddressTable {
    /// The entry for `path`.
    pub fn get(&self, path: &str) -> Option<&AddressInfo> {
        self.by_path.get(path).map(|&i| &self.entries[i])
    }

    /// Every entry, in the order `docs/osc.md` lists them.
    pub fn entries(&self) -> &[AddressInfo] {
        &self.entries
    }
}

/// The engine parameters addressable over OSC: the default engine's (`subtractive`). Other
/// engines receive the same parameter numbers.
pub fn engine_params() -> &'static [voicemesh_node::engine::ParamInfo] {
    subtractive::PARAMS
}

fn build_table() -> AddressTable {
    let e = |path: &str, kind, args: Vec<Arg>, required, access, description: &str| AddressInfo {
        path: path.to_owned(),
        kind,
        args,
        required,
        access,
        description: description.to_owned(),
    };
    let mut entries = vec![
        e(
            NOTE_ADDR,
            Kind::Note,
            vec![NOTE, VELOCITY, CHANNEL],
            2,
            Access::Write,
            "note velocity [channel]: velocity > 0 starts the note, 0 releases it",
        ),
        e(
            PANIC_ADDR,
            Kind::Panic,
            vec![],
            0,
            Access::None,
            "releases every voice on every node",
        ),
        e(
            CC_ADDR,
            Kind::Cc,
            vec![int("controller", 0.0, 127.0, 0.0), SEVEN_BIT, CHANNEL],
            2,
            Access::Write,
            "controller value [channel]: a MIDI control change",
        ),
        e(
            BEND_ADDR,
            Kind::Bend,
            vec![int("value", -8192.0, 8191.0, 0.0), CHANNEL],
            1,
            Access::Write,
            "value [channel]: pitch bend, 0 = centre",
        ),
        e(
            PRESSURE_ADDR,
            Kind::Pressure,
            vec![SEVEN_BIT, CHANNEL],
            1,
            Access::Write,
            "value [channel]: channel aftertouch",
        ),
        e(
            CV_ADDR,
            Kind::Cv,
            vec![
                Arg {
                    tag: 's',
                    min: 0.0,
                    max: 0.0,
                    neutral: 0.0,
                    name: "node",
                },
                int("channel", 0.0, 65535.0, 0.0),
                float("volts", -MAX_CV_VOLTS, MAX_CV_VOLTS, 0.0),
            ],
            3,
            Access::Write,
            "node channel volts: sets one CV output of an MCU node",
        ),
        e(
            TEMPO_ADDR,
            Kind::Tempo,
            vec![float(
                "bpm",
                f64::from(voicemesh_protocol::MIN_BPM),
                f64::from(voicemesh_protocol::MAX_BPM),
                120.0,
            )],
            1,
            Access::ReadWrite,
            "bpm: the cluster tempo",
        ),
        e(
            TRANSPORT_ADDR,
            Kind::Transport,
            vec![int("playing", 0.0, 1.0, 0.0)],
            1,
            Access::ReadWrite,
            "playing: 1 starts the transport, 0 stops it",
        ),
        e(
            SUBSCRIBE_ADDR,
            Kind::Subscribe,
            vec![int("port", 1.0, 65535.0, 1.0)],
            0,
            Access::None,
            "[port]: send /voicemesh/state/* messages to the sender (to this port of its address if given) for 60 s",
        ),
        e(
            UNSUBSCRIBE_ADDR,
            Kind::Unsubscribe,
            vec![],
            0,
            Access::None,
            "stop sending state messages to the sender",
        ),
    ];
    for p in engine_params() {
        let (min, max, def) = (f64::from(p.min), f64::from(p.max), f64::from(p.default));
        entries.push(e(
            &format!("{PARAM_PREFIX}{}", p.name),
            Kind::Param(p.id),
            vec![float("value", min, max, def)],
            1,
            Access::ReadWrite,
            &format!("{}: every voice, now and later", p.unit),
        ));
    }
    for p in engine_params() {
        let (min, max, def) = (f64::from(p.min), f64::from(p.max), f64::from(p.default));
        entries.push(e(
            &format!("{VOICE_PREFIX}{}", p.name),
            Kind::VoiceParam(p.id),
            vec![NOTE, float("value", min, max, def), CHANNEL],
            2,
            Access::Write,
            &format!(
                "note value [channel]: {} on the voices playing the note",
                p.unit
            ),
        ));
    }
    let by_path = entries
        .iter()
        .enumerate()
        .map(|(i, a)| (a.path.clone(), i))
        .collect();
    AddressTable { entries, by_path }
}

static TABLE: LazyLock<AddressTable> = LazyLock::new(build_table);

/// The address table.
pub fn table() -> &'static AddressTable {
    &TABLE
}

/// What came out of one packet.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    /// The commands, in order, each with its bundle's timetag.
    pub cmds: Vec<(When, OscCommand)>,
    /// Why each dropped part was dropped.
    pub drops: Vec<DropReason>,
}

/// Parses one OSC packet (a UDP datagram or a TCP frame): the commands it carries, in order,
/// and the reasons for whatever in it was dropped. Never panics.
pub fn parse_packet(buf: &[u8]) -> Parsed {
    let mut out = Parsed::default();
    if let Err(r) = precheck(buf, 0) {
        out.drops.push(r);
        return out;
    }
    match rosc::decoder::decode_udp(buf) {
        Ok((_, packet)) => walk(packet, &mut out),
        Err(_) => out.drops.push(DropReason::Malformed),
    }
    out
}

fn walk(packet: OscPacket, out: &mut Parsed) {
    // Iterative, so the nesting the precheck allowed costs no stack.
    let mut stack = vec![(When::Now, packet)];
    while let Some((when, p)) = stack.pop() {
        match p {
            OscPacket::Message(m) => match message(&m) {
                Ok(c) => out.cmds.push((when, c)),
                Err(r) => out.drops.push(r),
            },
            OscPacket::Bundle(b) => {
                let tt = (u64::from(b.timetag.seconds) << 32) | u64::from(b.timetag.fractional);
                let w = if tt == 1 { When::Now } else { When::At(tt) };
                stack.extend(b.content.into_iter().rev().map(|p| (w, p)));
            }
        }
    }
}

/// A number from an int, long, float, double or boolean argument.
fn number(a: &OscType) -> Option<f64> {
    Some(match a {
        OscType::Int(i) => f64::from(*i),
        OscType::Long(l) => *l as f64,
        OscType::Float(f) => f64::from(*f),
        OscType::Double(d) => *d,
        OscType::Bool(b) => f64::from(u8::from(*b)),
        _ => return None,
    })
}

/// An argument checked against its table entry: integers rounded, then range-checked.
enum Val<'a> {
    Num(f64),
    Str(&'a str),
}

fn check<'a>(spec: &Arg, a: &'a OscType) -> Result<Val<'a>, DropReason> {
    if spec.tag == 's' {
        return match a {
            OscType::String(s) => Ok(Val::Str(s)),
            _ => Err(DropReason::BadArgs),
        };
    }
    let v = number(a).ok_or(DropReason::BadArgs)?;
    let v = if spec.tag == 'i' { v.round() } else { v };
    if v.is_finite() && (spec.min..=spec.max).contains(&v) {
        Ok(Val::Num(v))
    } else {
        Err(DropReason::OutOfRange)
    }
}

fn message(m: &OscMessage) -> Result<OscCommand, DropReason> {
    let info = table().get(&m.addr).ok_or(DropReason::UnknownAddress)?;
    if !(info.required..=info.args.len()).contains(&m.args.len()) {
        return Err(DropReason::BadArgs);
    }
    let mut nums = [0f64; 3];
    let mut text = "";
    for (i, (spec, a)) in info.args.iter().zip(&m.args).enumerate() {
        match check(spec, a)? {
            Val::Num(v) => nums[i] = v,
            Val::Str(s) => text = s,
        }
    }
    // Absent optional arguments read as 0 (channel 0; "no port").
    let [a, b, c] = nums;
    let u8_ = |v: f64| v as u8;
    Ok(match info.kind {
        Kind::Note => OscCommand::Note {
            note: u8_(a),
            velocity: u8_(b),
            channel: u8_(c),
        },
        Kind::Panic => OscCommand::Panic,
        Kind::Cc => OscCommand::Midi(MidiEvent::ControlChange {
            controller: u8_(a),
            value: u8_(b),
            channel: u8_(c),
        }),
        Kind::Bend => OscCommand::Midi(MidiEvent::PitchBend {
            value: a as i16,
            channel: u8_(b),
        }),
        Kind::Pressure => OscCommand::Midi(MidiEvent::ChannelPressure {
            value: u8_(a),
            channel: u8_(b),
        }),
        Kind::Param(param) => OscCommand::Param {
            param,
            value: a as f32,
        },
        Kind::VoiceParam(param) => OscCommand::VoiceParam {
            note: u8_(a),
            value: b as f32,
            channel: u8_(c),
            param,
        },
        Kind::Cv => {
            if text.is_empty() {
                return Err(DropReason::BadArgs);
            }
            OscCommand::Cv {
                node: text.to_owned(),
                channel: b as u16,
                microvolts: (c * 1e6).round() as i32,
            }
        }
        Kind::Tempo => OscCommand::Tempo { bpm: a },
        Kind::Transport => OscCommand::Transport { playing: a >= 0.5 },
        Kind::Subscribe => OscCommand::Subscribe {
            port: (m.args.len() == 1).then_some(a as u16),
        },
        Kind::Unsubscribe => OscCommand::Unsubscribe,
    })
}

/// Cluster time of an NTP timetag (seconds since 1900 in the high 32 bits, fraction of a second
/// in the low 32), taking the timetag as UTC: `(seconds − 2 208 988 800) s + fraction · 2⁻³² s`
/// since the Unix epoch, plus TAI − UTC ([`TAI_OFFSET_NS`]), because cluster time is the PTP
/// (TAI) timescale of the grandmaster's `CLOCK_REALTIME`. A timetag before 1970 maps to 0.
pub fn ntp_to_cluster(ntp: u64) -> ClusterTime {
    let secs = ntp >> 32;
    let frac = ntp & 0xffff_ffff;
    let Some(unix_s) = secs.checked_sub(NTP_UNIX_OFFSET_S) else {
        return ClusterTime(0);
    };
    let frac_ns = (frac * 1_000_000_000 + (1 << 31)) >> 32;
    ClusterTime(unix_s * 1_000_000_000 + frac_ns + TAI_OFFSET_NS)
}

/// The NTP timetag of a cluster time (the inverse of [`ntp_to_cluster`], to the nearest
/// 2⁻³² s), for senders and tests.
pub fn cluster_to_ntp(t: ClusterTime) -> u64 {
    let unix_ns = t.0.saturating_sub(TAI_OFFSET_NS);
    let secs = unix_ns / 1_000_000_000 + NTP_UNIX_OFFSET_S;
    let ns = unix_ns % 1_000_000_000;
    let frac = ((u128::from(ns) << 32) + 500_000_000) / 1_000_000_000;
    (secs << 32) + frac as u64
}

/// Bounds the nesting of bundles and arrays before the recursive decoder sees the bytes.
fn precheck(buf: &[u8], depth: usize) -> Result<(), DropReason> {
    if buf.starts_with(b"#bundle\0") {
        if depth >= MAX_BUNDLE_DEPTH {
            return Err(DropReason::TooDeep);
        }
        let mut pos = 16;
        if buf.len() < pos {
            return Err(DropReason::Malformed);
        }
        while pos < buf.len() {
            let Some(size) = buf.get(pos..pos + 4) else {
                return Err(DropReason::Malformed);
            };
            let size = u32::from_be_bytes([size[0], size[1], size[2], size[3]]) as usize;
            let start = pos + 4;
            let Some(elem) = start.checked_add(size).and_then(|end| buf.get(start..end)) else {
                return Err(DropReason::Malformed);
            };
            precheck(elem, depth + 1)?;
            pos = start + size;
        }
        return Ok(());
    }
    if buf.first() != Some(&b'/') {
        return Err(DropReason::Malformed);
    }
    let Some(nul) = buf.iter().position(|&b| b == 0) else {
        return Err(DropReason::Malformed);
    };
    let tags_at = (nul + 4) & !3;
    let Some(tags) = buf.get(tags_at..) else {
        return Ok(());
    };
    let mut level = 0usize;
    for &t in tags.iter().take_while(|&&b| b != 0) {
        match t {
            b'[' => {
                level += 1;
                if level > MAX_ARRAY_DEPTH {
                    return Err(DropReason::TooDeep);
                }
            }
            b']' => level = level.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rosc::{OscBundle, OscTime, encoder};

    fn enc(p: &OscPacket) -> Vec<u8> {
        encoder::encode(p).expect("encodes")
    }

    fn msg(addr: &str, args: Vec<OscType>) -> OscPacket {
        OscPacket::Message(OscMessage {
            addr: addr.into(),
            args,
        })
    }

    /// Commands and drops of a packet, timetags left out.
    fn parse(buf: &[u8]) -> (Vec<OscCommand>, Vec<DropReason>) {
        let p = parse_packet(buf);
        (p.cmds.into_iter().map(|(_, c)| c).collect(), p.drops)
    }

    #[test]
    fn note_with_ints_floats_and_mixed() {
        for args in [
            vec![OscType::Int(60), OscType::Int(100), OscType::Int(2)],
            vec![
                OscType::Float(60.0),
                OscType::Float(100.0),
                OscType::Float(2.0),
            ],
            vec![OscType::Int(60), OscType::Double(100.2), OscType::Long(2)],
        ] {
            let (c, d) = parse(&enc(&msg(NOTE_ADDR, args)));
            assert!(d.is_empty(), "{d:?}");
            assert_eq!(
                c,
                vec![OscCommand::Note {
                    note: 60,
                    velocity: 100,
                    channel: 2
                }]
            );
        }
    }

    #[test]
    fn controller_messages() {
        let cases = [
            (
                msg(
                    CC_ADDR,
                    vec![OscType::Int(74), OscType::Float(63.6), OscType::Int(3)],
                ),
                OscCommand::Midi(MidiEvent::ControlChange {
                    channel: 3,
                    controller: 74,
                    value: 64,
                }),
            ),
            (
                msg(BEND_ADDR, vec![OscType::Int(-8192)]),
                OscCommand::Midi(MidiEvent::PitchBend {
                    channel: 0,
                    value: -8192,
                }),
            ),
            (
                msg(PRESSURE_ADDR, vec![OscType::Int(100), OscType::Int(15)]),
                OscCommand::Midi(MidiEvent::ChannelPressure {
                    channel: 15,
                    value: 100,
                }),
            ),
        ];
        for (p, want) in cases {
            assert_eq!(parse(&enc(&p)), (vec![want], vec![]));
        }
        for (p, why) in [
            (
                msg(BEND_ADDR, vec![OscType::Int(8192)]),
                DropReason::OutOfRange,
            ),
            (
                msg(BEND_ADDR, vec![OscType::Double(f64::NAN)]),
                DropReason::OutOfRange,
            ),
            (msg(CC_ADDR, vec![OscType::Int(1)]), DropReason::BadArgs),
            (
                msg(PRESSURE_ADDR, vec![OscType::Int(1), OscType::Int(16)]),
                DropReason::OutOfRange,
            ),
        ] {
            assert_eq!(parse(&enc(&p)), (vec![], vec![why]));
        }
    }

    #[test]
    fn params_cv_tempo_transport_and_subscriptions() {
        let cutoff = engine_params()
            .iter()
            .find(|p| p.name == "cutoff")
            .expect("the default engine has a cutoff");
        let cases = [
            (
                msg("/voicemesh/param/cutoff", vec![OscType::Float(440.0)]),
                OscCommand::Param {
                    param: cutoff.id,
                    value: 440.0,
                },
            ),
            (
                msg(
                    "/voicemesh/voice/cutoff",
                    vec![OscType::Int(60), OscType::Int(1000), OscType::Int(1)],
                ),
                OscCommand::VoiceParam {
                    note: 60,
                    channel: 1,
                    param: cutoff.id,
                    value: 1000.0,
                },
            ),
            (
                msg(
                    CV_ADDR,
                    vec![
                        OscType::String("mcu-1".into()),
                        OscType::Int(3),
                        OscType::Float(-2.5),
                    ],
                ),
                OscCommand::Cv {
                    node: "mcu-1".into(),
                    channel: 3,
                    microvolts: -2_500_000,
                },
            ),
            (
                msg(TEMPO_ADDR, vec![OscType::Double(98.5)]),
                OscCommand::Tempo { bpm: 98.5 },
            ),
            (
                msg(TRANSPORT_ADDR, vec![OscType::Bool(true)]),
                OscCommand::Transport { playing: true },
            ),
            (
                msg(TRANSPORT_ADDR, vec![OscType::Int(0)]),
                OscCommand::Transport { playing: false },
            ),
            (
                msg(SUBSCRIBE_ADDR, vec![]),
                OscCommand::Subscribe { port: None },
            ),
            (
                msg(SUBSCRIBE_ADDR, vec![OscType::Int(9100)]),
                OscCommand::Subscribe { port: Some(9100) },
            ),
            (msg(UNSUBSCRIBE_ADDR, vec![]), OscCommand::Unsubscribe),
        ];
        for (p, want) in cases {
            assert_eq!(parse(&enc(&p)), (vec![want], vec![]), "{p:?}");
        }
        for (p, why) in [
            (
                msg("/voicemesh/param/cutoff", vec![OscType::Float(1e6)]),
                DropReason::OutOfRange,
            ),
            (
                msg("/voicemesh/param/nonesuch", vec![OscType::Float(1.0)]),
                DropReason::UnknownAddress,
            ),
            (
                msg(
                    CV_ADDR,
                    vec![OscType::Int(1), OscType::Int(3), OscType::Float(1.0)],
                ),
                DropReason::BadArgs,
            ),
            (
                msg(
                    CV_ADDR,
                    vec![
                        OscType::String("m".into()),
                        OscType::Int(3),
                        OscType::Float(16.0),
                    ],
                ),
                DropReason::OutOfRange,
            ),
            (
                msg(TEMPO_ADDR, vec![OscType::Float(10.0)]),
                DropReason::OutOfRange,
            ),
            (
                msg(TRANSPORT_ADDR, vec![OscType::Int(2)]),
                DropReason::OutOfRange,
            ),
            (
                msg(SUBSCRIBE_ADDR, vec![OscType::Int(0)]),
                DropReason::OutOfRange,
            ),
        ] {
            assert_eq!(parse(&enc(&p)), (vec![], vec![why]), "{p:?}");
        }
    }

    #[test]
    fn bad_messages_are_counted_by_reason() {
        let cases = [
            (msg("/other", vec![]), DropReason::UnknownAddress),
            (msg(NOTE_ADDR, vec![OscType::Int(60)]), DropReason::BadArgs),
            (
                msg(
                    NOTE_ADDR,
                    vec![OscType::String("x".into()), OscType::Int(1)],
                ),
                DropReason::BadArgs,
            ),
            (
                msg(NOTE_ADDR, vec![OscType::Int(128), OscType::Int(1)]),
                DropReason::OutOfRange,
            ),
            (
                msg(
                    NOTE_ADDR,
                    vec![OscType::Int(1), OscType::Int(1), OscType::Int(16)],
                ),
                DropReason::OutOfRange,
            ),
            (
                msg(NOTE_ADDR, vec![OscType::Float(f32::NAN), OscType::Int(1)]),
                DropReason::OutOfRange,
            ),
            (msg(PANIC_ADDR, vec![OscType::Int(1)]), DropReason::BadArgs),
        ];
        for (p, why) in cases {
            let (c, d) = parse(&enc(&p));
            assert!(c.is_empty());
            assert_eq!(d, vec![why], "{p:?}");
        }
    }

    #[test]
    fn bundles_are_unpacked_in_order_with_their_timetags() {
        let inner = OscPacket::Bundle(OscBundle {
            timetag: OscTime::from((5, 7)),
            content: vec![msg(PANIC_ADDR, vec![]), msg("/x", vec![])],
        });
        let outer = OscPacket::Bundle(OscBundle {
            timetag: OscTime::from((0, 1)),
            content: vec![
                msg(NOTE_ADDR, vec![OscType::Int(1), OscType::Int(0)]),
                inner,
            ],
        });
        let p = parse_packet(&enc(&outer));
        assert_eq!(
            p.cmds,
            vec![
                (
                    When::Now,
                    OscCommand::Note {
                        note: 1,
                        velocity: 0,
                        channel: 0
                    }
                ),
                (When::At((5 << 32) | 7), OscCommand::Panic)
            ]
        );
        assert_eq!(p.drops, vec![DropReason::UnknownAddress]);
    }

    #[test]
    fn deep_nesting_and_garbage_are_dropped() {
        let mut p = msg(PANIC_ADDR, vec![]);
        for _ in 0..MAX_BUNDLE_DEPTH + 1 {
            p = OscPacket::Bundle(OscBundle {
                timetag: OscTime::from((0, 1)),
                content: vec![p],
            });
        }
        assert_eq!(parse(&enc(&p)).1, vec![DropReason::TooDeep]);
        let mut arr = b"/voicemesh/note\0,".to_vec();
        arr.extend(std::iter::repeat_n(b'[', 5000));
        arr.push(0);
        assert_eq!(parse(&arr).1, vec![DropReason::TooDeep]);
        for junk in [
            &b""[..],
            b"\xff\xff",
            b"#bundle\0",
            b"#bundle\0\0\0\0\0\0\0\0\0\xff\xff\xff\xff",
            b"/a",
        ] {
            let (c, d) = parse(junk);
            assert!(c.is_empty());
            assert_eq!(d, vec![DropReason::Malformed], "{junk:?}");
        }
    }

    #[test]
    fn ntp_timetags_map_to_cluster_time() {
        // 2026-11-22 00:00:00 UTC = 1 795 305 600 s after the Unix epoch.
        let unix = 1_795_305_600u64;
        let ntp = (unix + NTP_UNIX_OFFSET_S) << 32 | (1 << 31); // + 0.5 s
        let t = ntp_to_cluster(ntp);
        assert_eq!(t.0, unix * 1_000_000_000 + 500_000_000 + TAI_OFFSET_NS);
        assert_eq!(cluster_to_ntp(t), ntp);
        assert_eq!(ntp_to_cluster(1), ClusterTime(0), "before 1970");
        // One fraction unit is 0.23 ns: the round trip is exact to the nanosecond.
        for ns in [0u64, 1, 999_999_999, 123_456_789] {
            let t = ClusterTime(unix * 1_000_000_000 + ns + TAI_OFFSET_NS);
            assert_eq!(ntp_to_cluster(cluster_to_ntp(t)), t);
        }
    }

    #[test]
    fn the_table_has_one_entry_per_path_and_valid_ranges() {
        let t = table();
        assert_eq!(t.by_path.len(), t.entries.len(), "duplicate paths");
        for e in t.entries() {
            assert!(
                e.required <= e.args.len() && e.args.len() <= 3,
                "{}",
                e.path
            );
            for a in &e.args {
                assert!(a.tag == 's' || (a.min <= a.neutral && a.neutral <= a.max));
            }
            assert_eq!(
                e.access == Access::None,
                e.args.is_empty() || e.required == 0
            );
        }
    }

    proptest! {
        /// Random bytes never panic, and every packet is either understood or counted.
        #[test]
        fn random_bytes_are_parsed_or_counted(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let p = parse_packet(&bytes);
            prop_assert!(!p.cmds.is_empty() || !p.drops.is_empty() || bytes.starts_with(b"#bundle\0"));
        }

        /// Random bytes after a valid address prefix (the decoder's deeper paths).
        #[test]
        fn random_tails_of_known_addresses_never_panic(
            which in 0usize..12,
            tail in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let path = &table().entries()[which].path;
            let mut b = path.as_bytes().to_vec();
            b.resize((b.len() + 4) & !3, 0);
            b.extend(tail);
            let p = parse_packet(&b);
            prop_assert!(p.cmds.len() + p.drops.len() == 1);
        }

        /// Encoded messages with random arguments: understood exactly when every argument is
        /// in range, else counted once.
        #[test]
        fn random_note_arguments(n in -200i32..300, v in -200i32..300, ch in -5i32..20) {
            let b = enc(&msg(NOTE_ADDR, vec![OscType::Int(n), OscType::Int(v), OscType::Int(ch)]));
            let p = parse_packet(&b);
            let ok = (0..=127).contains(&n) && (0..=127).contains(&v) && (0..=15).contains(&ch);
            prop_assert_eq!(p.cmds.len(), usize::from(ok));
            prop_assert_eq!(p.drops.len(), usize::from(!ok));
        }
    }
}
