//! Criterion benchmark of the coordinator's MCU link core (`voicemesh_coordinator::mcu::McuLink`):
//! one datagram in (an MCU's `CvReport` of 8 channels: header check, replay window, MessagePack
//! decode, event) and one datagram out (a `VoiceOn`: MessagePack encode, header).
#![allow(missing_docs)]

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use voicemesh_coordinator::mcu::{McuLink, McuTiming};
use voicemesh_protocol::datagram::{DatagramHeader, MAX_DATAGRAM_LEN, encode_datagram};
use voicemesh_protocol::{
    ClusterTime, CvReport, Heartbeat, Hello, Message, Role, Timeline, VoiceOn, Welcome,
};

const DATAGRAMS: u32 = 4096;

fn datagram(session: u32, seq: u32, m: &Message) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM_LEN];
    let n = encode_datagram(DatagramHeader { session, seq }, m, &mut buf).unwrap();
    buf[..n].to_vec()
}

/// A link with an MCU in session (its Hello was datagram 0 of session 1).
fn joined() -> McuLink {
    let welcome = Welcome {
        coordinator: Message::text("c"),
        heartbeat_ms: 100,
        lease_ms: 1000,
        timeline: Timeline::from_milli_bpm(120_000, ClusterTime(0)),
    };
    let mut link = McuLink::new(McuTiming::default(), welcome, 7, 0);
    link.handle_timeout(0, ClusterTime(0));
    let hello = Message::Hello(Hello {
        id: Message::text("mcu-1"),
        name: Message::text("mcu-1"),
        role: Role::Mcu,
        voices: 2,
        cv: 8,
        engines: heapless::Vec::new(),
        sample_rate: 0,
    });
    link.handle_datagram(0, ClusterTime(0), &datagram(1, 0, &hello));
    while link.poll_transmit().is_some() {}
    while link.poll_event().is_some() {}
    assert!(link.is_joined());
    link
}

fn report() -> Message {
    let mut codes = heapless::Vec::new();
    let mut changed_at = heapless::Vec::new();
    for c in 0..8u16 {
        codes.push(c * 500).unwrap();
        changed_at
            .push(ClusterTime(1_795_000_000_000_000_000 + u64::from(c)))
            .unwrap();
    }
    Message::CvReport(CvReport {
        now: ClusterTime(1_795_000_000_000_000_000),
        codes,
        changed_at,
        applied_at: ClusterTime(1_795_000_000_000_000_007),
        dac_faults: 0,
        writes: 1000,
        skipped_writes: 900,
        write_errors: 0,
        late_events: 0,
        lease_expiries: 0,
        clock_offset_ns: -850,
        clock_locked: true,
        rx: Default::default(),
    })
}

/// Fresh datagrams of one message: batches of [`DATAGRAMS`], each batch a new MCU session, so
/// the replay window accepts every one however long the benchmark runs.
struct Fresh {
    msg: Message,
    session: u32,
    batch: Vec<Vec<u8>>,
    next: usize,
}

impl Fresh {
    fn new(msg: Message) -> Self {
        Fresh {
            msg,
            session: 1,
            batch: Vec::new(),
            next: 0,
        }
    }

    fn next(&mut self) -> &[u8] {
        if self.next == self.batch.len() {
            self.session += 1;
            self.batch = (0..DATAGRAMS)
                .map(|s| datagram(self.session, s, &self.msg))
                .collect();
            self.next = 0;
        }
        self.next += 1;
        &self.batch[self.next - 1]
    }
}

fn link(c: &mut Criterion) {
    let mut g = c.benchmark_group("mcu_link");
    g.throughput(Throughput::Elements(1));

    let mut link = joined();
    let mut reports = Fresh::new(report());
    g.bench_function("handle_cv_report_datagram", |b| {
        // Making the datagrams (in the setup) is not timed.
        b.iter_batched(
            || reports.next().to_vec(),
            |d| {
                let r = link.handle_datagram(1, ClusterTime(1), &d);
                while link.poll_event().is_some() {}
                r
            },
            BatchSize::SmallInput,
        )
    });
    assert_eq!(link.counters().dropped(), 0);

    let mut link = joined();
    let mut beats = Fresh::new(Message::Heartbeat(Heartbeat {
        seq: 1,
        now: ClusterTime(0),
    }));
    g.bench_function("handle_heartbeat_datagram", |b| {
        b.iter_batched(
            || beats.next().to_vec(),
            |d| link.handle_datagram(1, ClusterTime(1), &d),
            BatchSize::SmallInput,
        )
    });
    assert_eq!(link.counters().dropped(), 0);

    let mut link = joined();
    let mut k = 0u64;
    g.bench_function("send_voice_on_datagram", |b| {
        b.iter(|| {
            k += 1;
            link.send(&Message::VoiceOn(VoiceOn {
                voice: (k % 2) as u16,
                note: (k % 128) as u8,
                velocity: 100,
                channel: 0,
                at: ClusterTime(1_795_000_000_000_000_000 + k),
                lease_until: ClusterTime(1_795_000_001_000_000_000 + k),
            }));
            link.poll_transmit()
        })
    });
    g.finish();
}

criterion_group!(benches, link);
criterion_main!(benches);
