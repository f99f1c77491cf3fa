//! Model-based test of the node on random operation sequences: notes, releases, renewals,
//! controllers, direct values, DAC failures and recoveries, garbage datagrams and time jumps.
//! Invariants: no gate is open past the latest lease given for its voice; a failed DAC reads
//! 0; every code fits 12 bits; once everything is quiet and every DAC works, every DAC holds
//! exactly the engine's code (nothing stale) and no gate is open (no stuck note).

mod common;

use common::{Rig, T0, assign};
use proptest::prelude::*;
use voicemesh_mcu::DacSpec;
use voicemesh_protocol::{
    ClusterTime, Control, ControlKind, CvFunction, CvSet, Heartbeat, LeaseRenew, Message, VoiceOff,
    VoiceOn,
};

const MS: u64 = 1_000_000;

#[derive(Clone, Debug)]
enum Op {
    On {
        voice: u16,
        note: u8,
        in_ms: u64,
        lease_ms: u64,
    },
    Off {
        voice: u16,
        in_ms: u64,
    },
    Renew {
        voice: u16,
        lease_ms: u64,
    },
    Bend(u16),
    Cc(u8),
    Set {
        channel: u16,
        uv: i32,
    },
    Fail {
        dac: usize,
        failing: bool,
    },
    Garbage(Vec<u8>),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u16..3, 0u8..128, 0u64..20, 0u64..400).prop_map(|(voice, note, in_ms, lease_ms)| {
            Op::On {
                voice,
                note,
                in_ms,
                lease_ms,
            }
        }),
        (0u16..3, 0u64..20).prop_map(|(voice, in_ms)| Op::Off { voice, in_ms }),
        (0u16..3, 0u64..400).prop_map(|(voice, lease_ms)| Op::Renew { voice, lease_ms }),
        (0u16..16384).prop_map(Op::Bend),
        (0u8..128).prop_map(Op::Cc),
        (8u16..16, -1_000_000i32..6_000_000).prop_map(|(channel, uv)| Op::Set { channel, uv }),
        (0usize..2, any::<bool>()).prop_map(|(dac, failing)| Op::Fail { dac, failing }),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Op::Garbage),
        (0u64..300).prop_map(Op::Advance),
    ]
}

/// Channels 0–7 on DAC 0: voices 0–2 pitch/gate, a trigger, a bend and a cc output; 8–15 on
/// DAC 1 direct.
fn rig() -> Rig {
    let mut r = Rig::joined(&[DacSpec::VIRTUAL_5V, DacSpec::VIRTUAL_5V], 3);
    for v in 0..3u16 {
        let mut p = assign(2 * v, CvFunction::Pitch);
        p.voice = v;
        p.glide_ms = 20;
        r.send(Message::CvAssign(p));
        let mut g = assign(2 * v + 1, CvFunction::Gate);
        g.voice = v;
        r.send(Message::CvAssign(g));
    }
    r.send(Message::CvAssign(assign(6, CvFunction::PitchBend)));
    let mut cc = assign(7, CvFunction::Cc);
    cc.param = 1;
    r.send(Message::CvAssign(cc));
    r
}

fn cluster(r: &Rig) -> u64 {
    r.now.0 + T0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn invariants_hold_on_random_sequences(ops in proptest::collection::vec(op(), 1..60)) {
        let mut r = rig();
        let mut max_lease = [0u64; 3];
        for op in ops {
            let now = cluster(&r);
            match op {
                Op::On { voice, note, in_ms, lease_ms } => {
                    let at = now + in_ms * MS;
                    let until = at + lease_ms * MS;
                    max_lease[usize::from(voice)] = max_lease[usize::from(voice)].max(until);
                    r.send(Message::VoiceOn(VoiceOn {
                        voice, note, velocity: 90, channel: 0,
                        at: ClusterTime(at), lease_until: ClusterTime(until),
                    }));
                }
                Op::Off { voice, in_ms } => r.send(Message::VoiceOff(VoiceOff {
                    voice, at: ClusterTime(now + in_ms * MS),
                })),
                Op::Renew { voice, lease_ms } => {
                    let until = now + lease_ms * MS;
                    // A renewal only extends a held voice; the model's bound is an upper one.
                    max_lease[usize::from(voice)] = max_lease[usize::from(voice)].max(until);
                    r.send(Message::LeaseRenew(LeaseRenew {
                        voices: heapless::Vec::from_iter([voice]),
                        until: ClusterTime(until),
                    }));
                }
                Op::Bend(value) => r.send(Message::Control(Control {
                    midi_channel: 0, kind: ControlKind::PitchBend, number: 0, value,
                    at: ClusterTime(now),
                })),
                Op::Cc(value) => r.send(Message::Control(Control {
                    midi_channel: 0, kind: ControlKind::Cc, number: 1, value: u16::from(value),
                    at: ClusterTime(now),
                })),
                Op::Set { channel, uv } => r.send(Message::CvSet(CvSet {
                    channel, microvolts: uv, at: ClusterTime(now),
                })),
                Op::Fail { dac, failing } => r.failing[dac] = failing,
                Op::Garbage(bytes) => r.deliver(&bytes),
                Op::Advance(ms) => {
                    let t = r.now.add_nanos(ms * MS);
                    r.run_until(t);
                    // Keep the session alive like a coordinator would.
                    r.send(Message::Heartbeat(Heartbeat { seq: 1, now: ClusterTime(cluster(&r)) }));
                }
            }
            let rep = r.node.report(r.now);
            let t = cluster(&r);
            for (v, lease) in max_lease.iter().enumerate() {
                let gate = rep.codes[2 * v + 1];
                prop_assert!(
                    gate == 0 || t <= lease + 1,
                    "voice {v}: gate open at {t}, latest lease {lease}"
                );
            }
            for (d, failing) in r.failing.iter().enumerate() {
                if rep.dac_faults & (1 << d) != 0 {
                    prop_assert!(rep.codes[d * 8..d * 8 + 8].iter().all(|&c| c == 0));
                } else if !failing {
                    prop_assert!(rep.dac_faults & (1 << d) == 0);
                }
            }
            prop_assert!(rep.codes.iter().all(|&c| c <= 4095));
        }
        // Quiet: every DAC works again, every lease runs out, nothing is sent for 1.5 s.
        r.failing = vec![false, false];
        let end = r.now.add_nanos(1_500 * MS);
        r.run_until(end);
        let rep = r.node.report(r.now);
        prop_assert_eq!(rep.dac_faults, 0);
        for v in 0..3usize {
            prop_assert_eq!(rep.codes[2 * v + 1], 0, "voice {} gate stuck", v);
        }
        for ch in 0..16u16 {
            prop_assert_eq!(r.dac_codes[usize::from(ch)], r.node.engine().target_code(ch), "channel {} stale", ch);
            prop_assert_eq!(rep.codes[usize::from(ch)], r.node.engine().target_code(ch));
        }
    }
}
