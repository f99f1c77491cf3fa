//! Hostile but well-formed input: assignments, notes and controllers with every field over its
//! whole range (extreme voltages, base notes, bend ranges, glide and pulse lengths, clock
//! rates, calibration tables, times near the ends of the timescale). The node never panics,
//! every code fits 12 bits, and the session survives.

mod common;

use common::{Rig, T0};
use proptest::prelude::*;
use voicemesh_mcu::DacSpec;
use voicemesh_protocol::{
    CalPoint, ClusterTime, Control, ControlKind, CvAssign, CvFunction, CvSet, Message, Timeline,
    VoiceOff, VoiceOn,
};

fn function() -> impl Strategy<Value = CvFunction> {
    prop_oneof![
        Just(CvFunction::Off),
        Just(CvFunction::Direct),
        Just(CvFunction::Pitch),
        Just(CvFunction::Gate),
        Just(CvFunction::Trigger),
        Just(CvFunction::Velocity),
        Just(CvFunction::Cc),
        Just(CvFunction::Aftertouch),
        Just(CvFunction::PitchBend),
        Just(CvFunction::Clock),
        Just(CvFunction::Reset),
    ]
}

fn assign() -> impl Strategy<Value = CvAssign> {
    (
        (0u16..10, function(), 0u16..4, any::<u8>(), any::<u16>()),
        (any::<i32>(), any::<i32>(), any::<u8>(), any::<u8>()),
        (any::<u16>(), any::<u16>()),
        proptest::collection::vec((any::<i32>(), any::<i32>()), 0..=16),
    )
        .prop_map(|(a, b, c, cal)| CvAssign {
            channel: a.0,
            function: a.1,
            voice: a.2,
            midi_channel: a.3,
            param: a.4,
            min_uv: b.0,
            max_uv: b.1,
            base_note: b.2,
            bend_semitones: b.3,
            glide_ms: c.0,
            pulse_ms: c.1,
            calibration: cal
                .into_iter()
                .map(|(microvolts, code)| CalPoint { microvolts, code })
                .collect(),
        })
}

#[derive(Clone, Debug)]
enum Op {
    Assign(CvAssign),
    On(u16, u8, u8, u64, u64),
    Off(u16, u64),
    Control(u8, u8, u8, u16, u64),
    Set(u16, i32, u64),
    Tempo(u64, i64),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        assign().prop_map(Op::Assign),
        (
            0u16..5,
            any::<u8>(),
            any::<u8>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(v, n, c, at, l)| Op::On(v, n, c, at, l)),
        (0u16..5, any::<u64>()).prop_map(|(v, at)| Op::Off(v, at)),
        (any::<u8>(), 0u8..3, any::<u8>(), any::<u16>(), any::<u64>())
            .prop_map(|(ch, k, n, v, at)| Op::Control(ch, k, n, v, at)),
        (0u16..10, any::<i32>(), any::<u64>()).prop_map(|(c, uv, at)| Op::Set(c, uv, at)),
        (any::<u64>(), any::<i64>()).prop_map(|(npb, b0)| Op::Tempo(npb, b0)),
        (0u64..300_000_000).prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn extreme_values_never_panic(ops in proptest::collection::vec(op(), 1..40)) {
        let mut r = Rig::joined(&[DacSpec::VIRTUAL_5V], 4);
        for op in ops {
            let now = r.now.0 + T0;
            // Half the times near now, half anywhere on the timescale.
            let t = |x: u64| if x.is_multiple_of(2) { ClusterTime(now.saturating_add(x % 50_000_000)) } else { ClusterTime(x) };
            match op {
                Op::Assign(a) => r.send(Message::CvAssign(a)),
                Op::On(voice, note, channel, at, lease) => r.send(Message::VoiceOn(VoiceOn {
                    voice, note, velocity: note, channel, at: t(at), lease_until: t(lease),
                })),
                Op::Off(voice, at) => r.send(Message::VoiceOff(VoiceOff { voice, at: t(at) })),
                Op::Control(midi_channel, k, number, value, at) => {
                    let kind = [ControlKind::PitchBend, ControlKind::Cc, ControlKind::Aftertouch][usize::from(k)];
                    r.send(Message::Control(Control { midi_channel, kind, number, value, at: t(at) }));
                }
                Op::Set(channel, microvolts, at) => {
                    r.send(Message::CvSet(CvSet { channel, microvolts, at: t(at) }))
                }
                Op::Tempo(ns_per_beat, beat0_micro) => r.send(Message::Timeline(Timeline {
                    ns_per_beat, beat0_micro, t0: t(ns_per_beat),
                })),
                Op::Advance(ns) => {
                    let to = r.now.add_nanos(ns);
                    r.run_until(to);
                }
            }
            let rep = r.node.report(r.now);
            prop_assert!(rep.codes.iter().all(|&c| c <= 4095), "{:?}", rep.codes);
        }
        prop_assert!(r.node.joined() || r.node.stats().losses > 0);
    }
}
