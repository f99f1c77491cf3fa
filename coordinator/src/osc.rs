//! OSC input: turning datagrams into note commands.
//!
//! The parsing is a pure function ([`parse_datagram`]) so hostile input can be tested without a
//! socket; the UDP task in the crate root feeds it. The address space is documented in
//! `docs/osc.md`. Bundles are unpacked in order; their timetags are ignored for now (every
//! message plays at receive time plus the lookahead). Before rosc sees a datagram its bundle
//! nesting and array nesting are checked against small limits, so a crafted datagram cannot
//! drive the decoder into deep recursion.

use rosc::{OscMessage, OscPacket, OscType};

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
/// Address of the tempo: one number, BPM (20–999).
pub const TEMPO_ADDR: &str = "/voicemesh/tempo";
/// Address of the transport: one integer, 1 start, 0 stop.
pub const TRANSPORT_ADDR: &str = "/voicemesh/transport";
/// Deepest bundle nesting accepted.
pub const MAX_BUNDLE_DEPTH: usize = 4;
/// Deepest OSC array nesting accepted in a type tag string.
pub const MAX_ARRAY_DEPTH: usize = 2;

/// What an OSC message asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// Set the cluster tempo, in thousandths of a BPM (see [`crate::tempo`]).
    Tempo(u32),
    /// Start (`true`) or stop the transport.
    Transport(bool),
}

/// Why an OSC datagram or message was dropped. Each reason has its own counter.
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
    /// A number outside its range (note/velocity 0–127, channel 0–15) or not finite.
    OutOfRange,
}

impl DropReason {
    /// Every reason, for listing counters.
    pub const ALL: [DropReason; 5] = [
        DropReason::Malformed,
        DropReason::TooDeep,
        DropReason::UnknownAddress,
        DropReason::BadArgs,
        DropReason::OutOfRange,
    ];

    /// Name used in the snapshot and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::TooDeep => "too_deep",
            DropReason::UnknownAddress => "unknown_address",
            DropReason::BadArgs => "bad_args",
            DropReason::OutOfRange => "out_of_range",
        }
    }
}

/// Parses one UDP datagram: the commands it carries, in order, and the reasons for whatever
/// in it was dropped. Never panics.
pub fn parse_datagram(buf: &[u8]) -> (Vec<OscCommand>, Vec<DropReason>) {
    let mut cmds = Vec::new();
    let mut drops = Vec::new();
    if let Err(r) = precheck(buf, 0) {
        drops.push(r);
        return (cmds, drops);
    }
    match rosc::decoder::decode_udp(buf) {
        Ok((_, packet)) => walk(packet, &mut cmds, &mut drops),
        Err(_) => drops.push(DropReason::Malformed),
    }
    (cmds, drops)
}

fn walk(packet: OscPacket, cmds: &mut Vec<OscCommand>, drops: &mut Vec<DropReason>) {
    // Iterative, so the nesting the precheck allowed costs no stack.
    let mut stack = vec![packet];
    while let Some(p) = stack.pop() {
        match p {
            OscPacket::Message(m) => match message(&m) {
                Ok(c) => cmds.push(c),
                Err(r) => drops.push(r),
            },
            OscPacket::Bundle(b) => stack.extend(b.content.into_iter().rev()),
        }
    }
}

fn message(m: &OscMessage) -> Result<OscCommand, DropReason> {
    match m.addr.as_str() {
        NOTE_ADDR => {
            if !(2..=3).contains(&m.args.len()) {
                return Err(DropReason::BadArgs);
            }
            let note = num(&m.args[0], 127)?;
            let velocity = num(&m.args[1], 127)?;
            let channel = match m.args.get(2) {
                Some(a) => num(a, 15)?,
                None => 0,
            };
            Ok(OscCommand::Note {
                note,
                velocity,
                channel,
            })
        }
        PANIC_ADDR => {
            if m.args.is_empty() {
                Ok(OscCommand::Panic)
            } else {
                Err(DropReason::BadArgs)
            }
        }
        CC_ADDR => {
            if !(2..=3).contains(&m.args.len()) {
                return Err(DropReason::BadArgs);
            }
            Ok(OscCommand::Midi(MidiEvent::ControlChange {
                controller: num(&m.args[0], 127)?,
                value: num(&m.args[1], 127)?,
                channel: opt_channel(m.args.get(2))?,
            }))
        }
        BEND_ADDR | PRESSURE_ADDR => {
            if !(1..=2).contains(&m.args.len()) {
                return Err(DropReason::BadArgs);
            }
            let channel = opt_channel(m.args.get(1))?;
            if m.addr == BEND_ADDR {
                Ok(OscCommand::Midi(MidiEvent::PitchBend {
                    channel,
                    value: bend(&m.args[0])?,
                }))
            } else {
                Ok(OscCommand::Midi(MidiEvent::ChannelPressure {
                    channel,
                    value: num(&m.args[0], 127)?,
                }))
            }
        }
        TEMPO_ADDR | TRANSPORT_ADDR => {
            let [a] = m.args.as_slice() else {
                return Err(DropReason::BadArgs);
            };
            let v = number(a)?;
            if m.addr == TRANSPORT_ADDR {
                match v {
                    0.0 => Ok(OscCommand::Transport(false)),
                    1.0 => Ok(OscCommand::Transport(true)),
                    _ => Err(DropReason::OutOfRange),
                }
            } else if v.is_finite() && (20.0..=999.0).contains(&v) {
                Ok(OscCommand::Tempo((v * 1000.0).round() as u32))
            } else {
                Err(DropReason::OutOfRange)
            }
        }
        _ => Err(DropReason::UnknownAddress),
    }
}

/// The value of an int, long, float or double argument.
fn number(a: &OscType) -> Result<f64, DropReason> {
    match a {
        OscType::Int(i) => Ok(f64::from(*i)),
        OscType::Long(l) => Ok(*l as f64),
        OscType::Float(f) => Ok(f64::from(*f)),
        OscType::Double(d) => Ok(*d),
        _ => Err(DropReason::BadArgs),
    }
}

fn opt_channel(a: Option<&OscType>) -> Result<u8, DropReason> {
    a.map_or(Ok(0), |a| num(a, 15))
}

/// A pitch bend −8192..=8191 from an int, long, float or double argument (floats rounded).
fn bend(a: &OscType) -> Result<i16, DropReason> {
    let v = number(a)?;
    let r = v.round();
    if r.is_finite() && (-8192.0..=8191.0).contains(&r) {
        Ok(r as i16)
    } else {
        Err(DropReason::OutOfRange)
    }
}

/// An integer in `0..=max` from an int, long, float or double argument (floats are rounded).
fn num(a: &OscType, max: u8) -> Result<u8, DropReason> {
    let v = number(a)?;
    let r = v.round();
    if r.is_finite() && (0.0..=f64::from(max)).contains(&r) {
        Ok(r as u8)
    } else {
        Err(DropReason::OutOfRange)
    }
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
            let (c, d) = parse_datagram(&enc(&msg(NOTE_ADDR, args)));
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
            assert_eq!(parse_datagram(&enc(&p)), (vec![want], vec![]));
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
            assert_eq!(parse_datagram(&enc(&p)), (vec![], vec![why]));
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
            let (c, d) = parse_datagram(&enc(&p));
            assert!(c.is_empty());
            assert_eq!(d, vec![why], "{p:?}");
        }
    }

    #[test]
    fn bundles_are_unpacked_in_order() {
        let inner = OscPacket::Bundle(OscBundle {
            timetag: OscTime::from((0, 1)),
            content: vec![msg(PANIC_ADDR, vec![]), msg("/x", vec![])],
        });
        let outer = OscPacket::Bundle(OscBundle {
            timetag: OscTime::from((0, 1)),
            content: vec![
                msg(NOTE_ADDR, vec![OscType::Int(1), OscType::Int(0)]),
                inner,
            ],
        });
        let (c, d) = parse_datagram(&enc(&outer));
        assert_eq!(
            c,
            vec![
                OscCommand::Note {
                    note: 1,
                    velocity: 0,
                    channel: 0
                },
                OscCommand::Panic
            ]
        );
        assert_eq!(d, vec![DropReason::UnknownAddress]);
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
        assert_eq!(parse_datagram(&enc(&p)).1, vec![DropReason::TooDeep]);
        let mut arr = b"/voicemesh/note\0,".to_vec();
        arr.extend(std::iter::repeat_n(b'[', 5000));
        arr.push(0);
        assert_eq!(parse_datagram(&arr).1, vec![DropReason::TooDeep]);
        for junk in [
            &b""[..],
            b"\xff\xff",
            b"#bundle\0",
            b"#bundle\0\0\0\0\0\0\0\0\0\xff\xff\xff\xff",
            b"/a",
        ] {
            let (c, d) = parse_datagram(junk);
            assert!(c.is_empty());
            assert_eq!(d, vec![DropReason::Malformed], "{junk:?}");
        }
    }
}
