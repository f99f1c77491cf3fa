//! The input side of OSC: the address table, and bytes to commands (sans-IO).
//!
//! Nothing here needs the node crate, tokio or the server, so the fuzz target
//! (`fuzz/fuzz_targets/osc.rs`) compiles this file on its own. What it needs from the rest of
//! the coordinator comes through two paths the includer provides: `super::engine_params` and
//! `super::MAX_CV_VOLTS` (the parent `osc` module here), and `crate::allocator::MidiEvent`.

use std::collections::HashMap;
use std::sync::LazyLock;

use rosc::{OscMessage, OscPacket, OscType};

use super::{MAX_CV_VOLTS, engine_params};
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
    pub(super) entries: Vec<AddressInfo>,
    pub(super) by_path: HashMap<String, usize>,
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
