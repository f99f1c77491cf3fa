//! CPU cost of the MCU core on the host: one `VoiceOn` datagram through `handle_datagram`, the
//! `handle_timeout` at its `at`, and the DAC ops it causes (pitch, velocity, gate on virtual
//! DACs); and one `handle_timeout` with nothing due (the idle wake-up). Figures for the
//! latency budget in docs/mcu.md; a Cortex-M7 at 600 MHz is roughly 5–10× slower per call.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use voicemesh_mcu::{DacOp, DacSpec, LocalTime, McuConfig, McuNode};
use voicemesh_protocol::datagram::{DatagramHeader, MAX_DATAGRAM_LEN, encode_datagram};
use voicemesh_protocol::{
    ClusterTime, CvAssign, CvFunction, Heartbeat, Message, Timeline, VoiceOn, Welcome,
};

fn datagram(seq: u32, m: &Message) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM_LEN];
    let n = encode_datagram(DatagramHeader { session: 1, seq }, m, &mut buf).unwrap();
    buf[..n].to_vec()
}

fn drain(node: &mut McuNode, now: LocalTime) -> usize {
    let mut n = 0;
    while let Some(op) = node.poll_dac(now) {
        node.dac_done(now, op, true);
        if matches!(op, DacOp::Write(_)) {
            n += 1;
        }
    }
    n
}

fn joined() -> (McuNode, u32) {
    let cfg = McuConfig {
        id: "b".try_into().unwrap(),
        name: "b".try_into().unwrap(),
        voices: 4,
        dacs: [DacSpec::VIRTUAL_5V, DacSpec::VIRTUAL_5V]
            .into_iter()
            .collect(),
        session_id: 9,
    };
    let mut node = McuNode::new(cfg, LocalTime(0));
    let mut seq = 0;
    let mut send = |node: &mut McuNode, m: Message| {
        node.handle_datagram(LocalTime(0), &datagram(seq, &m));
        seq += 1;
    };
    send(
        &mut node,
        Message::Heartbeat(Heartbeat {
            seq: 0,
            now: ClusterTime(0),
        }),
    );
    send(
        &mut node,
        Message::Welcome(Welcome {
            coordinator: "c".try_into().unwrap(),
            heartbeat_ms: 100,
            lease_ms: 1000,
            timeline: Timeline::from_milli_bpm(120_000, ClusterTime(0)),
        }),
    );
    for (ch, f) in [
        (0, CvFunction::Pitch),
        (1, CvFunction::Velocity),
        (2, CvFunction::Gate),
    ] {
        let a = CvAssign {
            max_uv: 5_000_000,
            base_note: 36,
            ..CvAssign::new(ch, f)
        };
        send(&mut node, Message::CvAssign(a));
    }
    drain(&mut node, LocalTime(0));
    let mut buf = [0u8; MAX_DATAGRAM_LEN];
    while node.poll_transmit(LocalTime(0), &mut buf).is_some() {}
    (node, seq)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("mcu_core");
    let (mut node, mut seq) = joined();
    // Notes 1 ms apart in a local clock that only moves forward.
    let mut t = 1_000_000u64;
    let mut buf = [0u8; MAX_DATAGRAM_LEN];
    g.bench_function("voice_on_datagram_to_dac_ops", |b| {
        b.iter_batched(
            || {
                t += 1_000_000;
                seq += 1;
                let on = Message::VoiceOn(VoiceOn {
                    voice: 0,
                    note: (seq % 60) as u8 + 36,
                    velocity: 100,
                    channel: 0,
                    at: ClusterTime(t),
                    lease_until: ClusterTime(t + 1_000_000_000),
                });
                (datagram(seq, &on), t)
            },
            |(d, t)| {
                node.handle_datagram(LocalTime(t), black_box(&d));
                node.handle_timeout(LocalTime(t));
                let writes = drain(&mut node, LocalTime(t));
                while node.poll_transmit(LocalTime(t), &mut buf).is_some() {}
                writes
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("idle_handle_timeout", |b| {
        // Nothing due at the same instant: the cost of a spurious wake-up.
        b.iter(|| {
            node.handle_timeout(LocalTime(t));
            black_box(node.poll_timeout())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
