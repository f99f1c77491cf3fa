//! The simulator as a real UDP peer on loopback: a fake coordinator joins it, assigns
//! channels, plays a note, and reads the DAC codes back from its reports; then falls silent
//! and the gate drops within the lease.

mod common;

use common::assign;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use voicemesh_mcu::sim::{SimConfig, start_sim};
use voicemesh_node::NetScope;
use voicemesh_protocol::datagram::{
    DatagramHeader, MAX_DATAGRAM_LEN, decode_datagram, encode_datagram,
};
use voicemesh_protocol::{
    ClusterTime, CvFunction, CvReport, Heartbeat, Message, TimeSync, Timeline, VoiceOn, Welcome,
};

struct Coord {
    sock: UdpSocket,
    to: SocketAddr,
    seq: u32,
    /// The coordinator's cluster clock: nanoseconds since it started, plus an epoch.
    start: tokio::time::Instant,
}

const EPOCH: u64 = 1_700_000_000_000_000_000;

impl Coord {
    fn now(&self) -> ClusterTime {
        ClusterTime(EPOCH + self.start.elapsed().as_nanos() as u64)
    }

    async fn send(&mut self, m: &Message) {
        let mut buf = [0u8; MAX_DATAGRAM_LEN];
        let h = DatagramHeader {
            session: 0x5eed,
            seq: self.seq,
        };
        self.seq += 1;
        let n = encode_datagram(h, m, &mut buf).unwrap();
        self.sock.send_to(&buf[..n], self.to).await.unwrap();
    }

    /// The next message from the node, answering time syncs on the way.
    async fn recv(&mut self) -> Message {
        let mut buf = [0u8; MAX_DATAGRAM_LEN];
        {
            let (n, _) =
                tokio::time::timeout(Duration::from_secs(5), self.sock.recv_from(&mut buf))
                    .await
                    .expect("the node answers within 5 s")
                    .unwrap();
            let (_, f) = decode_datagram(&buf[..n]).unwrap();
            if let Message::TimeSync(ts) = f.message {
                let now = self.now();
                self.send(&Message::TimeSync(TimeSync {
                    origin: ts.origin,
                    receive: now,
                    transmit: self.now(),
                }))
                .await;
            }
            f.message
        }
    }

    /// Reads reports until one satisfies `pred`, within `secs`.
    async fn report_until(&mut self, secs: u64, pred: impl Fn(&CvReport) -> bool) -> CvReport {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no such report in {secs} s"
            );
            if let Message::CvReport(r) = self.recv().await
                && pred(&r)
            {
                return r;
            }
        }
    }
}

#[tokio::test]
async fn a_coordinator_joins_plays_a_note_and_the_gate_drops_when_it_goes_silent() {
    let cancel = CancellationToken::new();
    let sim = start_sim(
        SimConfig {
            port: 0,
            advertise: false,
            scope: NetScope::Loopback,
            ..SimConfig::default()
        },
        cancel.clone(),
    )
    .await
    .unwrap();
    let mut c = Coord {
        sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        to: sim.local_addr,
        seq: 0,
        start: tokio::time::Instant::now(),
    };
    c.send(&Message::Heartbeat(Heartbeat {
        seq: 0,
        now: c.now(),
    }))
    .await;
    let Message::Hello(h) = c.recv().await else {
        panic!("Hello first")
    };
    assert_eq!((h.cv, h.voices), (8, 2));
    c.send(&Message::Welcome(Welcome {
        coordinator: "c".try_into().unwrap(),
        heartbeat_ms: 100,
        lease_ms: 300,
        timeline: Timeline::from_milli_bpm(120_000, c.now()),
    }))
    .await;
    c.send(&Message::CvAssign(assign(0, CvFunction::Pitch)))
        .await;
    c.send(&Message::CvAssign(assign(1, CvFunction::Gate)))
        .await;
    // Let the clock settle on a few time syncs, then play 20 ms ahead.
    c.report_until(5, |r| r.clock_locked).await;
    let at = c.now().add_nanos(20_000_000);
    c.send(&Message::VoiceOn(VoiceOn {
        voice: 0,
        note: 60,
        velocity: 100,
        channel: 0,
        at,
        lease_until: at.add_nanos(300_000_000),
    }))
    .await;
    let r = c.report_until(5, |r| r.codes[1] == 4095).await;
    assert_eq!(r.codes[0], 1638, "2 V = note 60 over base 36");
    for ch in [0, 1] {
        let late = r.changed_at[ch].nanos_since(at);
        // Applied at `at` by the node's clock: within the timer's slack (a few ms on a busy
        // machine), never early by more than the servo's error.
        assert!(
            (-1_000_000..10_000_000).contains(&late),
            "channel {ch}: {late} ns from at"
        );
    }
    assert!(sim.snapshot().joined);
    assert_eq!(sim.snapshot().codes[1], 4095);

    // No renewal: the lease (300 ms) drops the gate, on time.
    let r = c.report_until(5, |r| r.codes[1] == 0).await;
    let late = r.changed_at[1].nanos_since(at.add_nanos(300_000_000));
    assert!(
        (0..10_000_000).contains(&late),
        "gate dropped {late} ns after the lease end"
    );
    assert_eq!(r.codes[0], 1638, "pitch holds");
    assert_eq!(r.lease_expiries, 1);
    assert_eq!(sim.snapshot().codes[1], 0);
    cancel.cancel();
    sim.join().await.unwrap();
}
