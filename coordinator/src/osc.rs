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
//! [`slip`]. The table and the parser live in [`decode`], which needs neither the node crate
//! nor tokio, so the fuzz target `fuzz/fuzz_targets/osc.rs` compiles it (with [`slip`]) alone.

pub mod decode;
pub mod limit;
pub mod schedule;
pub(crate) mod server;
pub mod slip;

use voicemesh_node::clock::TAI_OFFSET_NS;
use voicemesh_node::engine::subtractive;
use voicemesh_protocol::ClusterTime;

pub use decode::*;

/// Seconds from the NTP epoch (1900-01-01) to the Unix epoch (1970-01-01).
pub const NTP_UNIX_OFFSET_S: u64 = 2_208_988_800;
/// Largest volt value a `/voicemesh/cv` message may ask for.
pub const MAX_CV_VOLTS: f64 = crate::cv::MAX_VOLTS;

/// The engine parameters addressable over OSC: the default engine's (`subtractive`). Other
/// engines receive the same parameter numbers.
pub fn engine_params() -> &'static [voicemesh_node::engine::ParamInfo] {
    subtractive::PARAMS
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::MidiEvent;
    use proptest::prelude::*;
    use rosc::{OscBundle, OscTime, encoder};
    use rosc::{OscMessage, OscPacket, OscType};

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
