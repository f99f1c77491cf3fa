//! The coordinator's MCU link core (`voicemesh_coordinator::mcu::McuLink`) and this node core
//! (`McuNode`) against each other in a deterministic simulated world: the MCU's crystal runs
//! 80 ppm fast from an arbitrary start, every datagram takes 100–150 µs, one in 25 is lost.
//! The pair joins, the node's clock locks through the link's `TimeSync` answers, a note plays
//! with its gate opening and closing at its cluster times, and when the coordinator dies the
//! gate drops at the end of the lease.

use std::collections::VecDeque;

use voicemesh_coordinator::mcu::{McuEvent, McuLink, McuTiming};
use voicemesh_mcu::{DacOp, DacSpec, LocalTime, McuConfig, McuNode};
use voicemesh_protocol::datagram::MAX_DATAGRAM_LEN;
use voicemesh_protocol::{
    ClusterTime, CvAssign, CvFunction, CvReport, Message, Timeline, VoiceOff, VoiceOn, Welcome,
};

const MS: u64 = 1_000_000;
const EPOCH: u64 = 1_700_000_000_000_000_000;
const DRIFT_PPM: i128 = 80;
const OFFSET: u64 = 123_456_789_012;

struct World {
    tau: u64,
    rng: u64,
    link: McuLink,
    node: McuNode,
    /// (delivery time, to the MCU?, bytes)
    flight: VecDeque<(u64, bool, Vec<u8>)>,
    coordinator_alive: bool,
    report: Option<CvReport>,
    held: Vec<VoiceOn>,
    /// Gate (channel 1) code changes seen on the DAC, in cluster time of the true clock.
    gate: Vec<(u64, u16)>,
}

fn local(tau: u64) -> LocalTime {
    let t = tau as i128;
    LocalTime((t + t * DRIFT_PPM / 1_000_000) as u64 + OFFSET)
}

/// The first true time at which the MCU's clock reads at least `l`.
fn tau_of(l: LocalTime) -> u64 {
    let x = l.0.saturating_sub(OFFSET) as i128;
    let mut t = (x * 1_000_000 / (1_000_000 + DRIFT_PPM)) as u64;
    while local(t) < l {
        t += 1;
    }
    t
}

fn assignments() -> Vec<Message> {
    let pitch = CvAssign {
        max_uv: 5_000_000,
        base_note: 36,
        ..CvAssign::new(0, CvFunction::Pitch)
    };
    let gate = CvAssign {
        max_uv: 5_000_000,
        ..CvAssign::new(1, CvFunction::Gate)
    };
    vec![Message::CvAssign(pitch), Message::CvAssign(gate)]
}

impl World {
    fn new() -> World {
        let tau = 1_000_000_000;
        let welcome = Welcome {
            coordinator: "coord".try_into().unwrap(),
            heartbeat_ms: 100,
            lease_ms: 300,
            timeline: Timeline::from_milli_bpm(120_000, ClusterTime(EPOCH)),
        };
        let timing = McuTiming {
            heartbeat_ns: 100 * MS,
            offline_after_ns: 250 * MS,
            refresh_ns: 100 * MS,
        };
        let cfg = McuConfig {
            id: "t41".try_into().unwrap(),
            name: "t41".try_into().unwrap(),
            voices: 2,
            dacs: [DacSpec::VIRTUAL_5V].into_iter().collect(),
            session_id: 0x51,
        };
        World {
            tau,
            rng: 0x2545_f491_4f6c_dd1d,
            link: McuLink::new(timing, welcome, 0xc0, tau),
            node: McuNode::new(cfg, local(tau)),
            flight: VecDeque::new(),
            coordinator_alive: true,
            report: None,
            held: Vec::new(),
            gate: Vec::new(),
        }
    }

    fn cluster(&self) -> ClusterTime {
        ClusterTime(EPOCH + self.tau)
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn post(&mut self, to_mcu: bool, bytes: Vec<u8>) {
        if self.rand().is_multiple_of(25) {
            return; // lost
        }
        let at = self.tau + 100_000 + self.rand() % 50_000;
        let i = self.flight.partition_point(|f| f.0 <= at);
        self.flight.insert(i, (at, to_mcu, bytes));
    }

    /// Lets both ends work at the current instant.
    fn settle(&mut self) {
        let now = self.tau;
        let cluster = self.cluster();
        if self.coordinator_alive {
            while let Some(ev) = self.link.poll_event() {
                match ev {
                    McuEvent::Joined(_) => {
                        for m in assignments() {
                            self.link.send(&m);
                        }
                    }
                    McuEvent::TimeSync { origin, receive } => {
                        self.link.answer_time_sync(origin, receive, cluster)
                    }
                    McuEvent::RefreshDue => {
                        for m in assignments() {
                            self.link.send(&m);
                        }
                        // Held notes are re-sent with a fresh lease (the coordinator's refresh).
                        let held = self.held.clone();
                        for mut on in held {
                            on.lease_until = cluster.add_nanos(300 * MS as i64);
                            self.link.send(&Message::VoiceOn(on));
                        }
                    }
                    McuEvent::Message(Message::CvReport(r)) => self.report = Some(r),
                    _ => {}
                }
            }
            while let Some(d) = self.link.poll_transmit() {
                self.post(true, d);
            }
        }
        let l = local(now);
        while let Some(op) = self.node.poll_dac(l) {
            if let DacOp::Write(w) = op
                && w.channel == 1
                && self.gate.last().map(|g| g.1) != Some(w.code)
            {
                self.gate.push((EPOCH + now, w.code));
            }
            self.node.dac_done(l, op, true);
        }
        let mut buf = [0u8; MAX_DATAGRAM_LEN];
        while let Some(n) = self.node.poll_transmit(l, &mut buf) {
            self.post(false, buf[..n].to_vec());
        }
    }

    /// Runs every event up to true time `end`.
    fn run_until(&mut self, end: u64) {
        loop {
            let mut next = tau_of(self.node.poll_timeout());
            if self.coordinator_alive {
                next = next.min(self.link.poll_timeout());
            }
            if let Some(f) = self.flight.front() {
                next = next.min(f.0);
            }
            if next > end {
                break;
            }
            self.tau = self.tau.max(next);
            while self.flight.front().is_some_and(|f| f.0 <= self.tau) {
                let (_, to_mcu, bytes) = self.flight.pop_front().unwrap();
                if to_mcu {
                    self.node.handle_datagram(local(self.tau), &bytes);
                } else if self.coordinator_alive {
                    let c = self.cluster();
                    self.link.handle_datagram(self.tau, c, &bytes);
                }
            }
            if self.coordinator_alive && self.link.poll_timeout() <= self.tau {
                let c = self.cluster();
                self.link.handle_timeout(self.tau, c);
            }
            if tau_of(self.node.poll_timeout()) <= self.tau {
                self.node.handle_timeout(local(self.tau));
            }
            self.settle();
        }
        self.tau = end;
        self.node.handle_timeout(local(end));
        self.settle();
    }
}

#[test]
fn coordinator_link_and_mcu_node_play_a_note_in_cluster_time() {
    let mut w = World::new();
    w.run_until(w.tau + 5_000 * MS);
    assert!(w.link.is_joined() && w.node.joined());
    assert!(w.node.servo().locked(), "clock locked through TimeSync");
    let err = w.node.cluster_time(local(w.tau)).nanos_since(w.cluster());
    assert!(err.abs() < 20_000, "MCU cluster time off by {err} ns");

    // A note 5 ms ahead (the coordinator's lookahead), held 500 ms.
    let at = w.cluster().add_nanos(5 * MS as i64);
    let on = VoiceOn {
        voice: 0,
        note: 60,
        velocity: 100,
        channel: 0,
        at,
        lease_until: at.add_nanos(300 * MS as i64),
    };
    w.link.send(&Message::VoiceOn(on));
    w.held.push(on);
    w.settle();
    w.run_until(w.tau + 500 * MS);
    let off_at = w.cluster().add_nanos(5 * MS as i64);
    w.held.clear();
    w.link.send(&Message::VoiceOff(VoiceOff {
        voice: 0,
        at: off_at,
    }));
    w.settle();
    w.run_until(w.tau + 300 * MS);
    let g: Vec<(i64, u16)> = w
        .gate
        .iter()
        .map(|&(t, c)| (ClusterTime(t).nanos_since(at), c))
        .collect();
    assert_eq!(g.len(), 3, "closed, opened once, closed: {g:?}");
    assert_eq!(g[1].1, 4095);
    assert!(
        g[1].0.abs() < 20_000,
        "gate opened {} ns from its at",
        g[1].0
    );
    let closed = ClusterTime(w.gate[2].0).nanos_since(off_at);
    assert!(closed.abs() < 20_000, "gate closed {closed} ns from its at");
    let r = w.report.clone().expect("reports reach the coordinator");
    assert_eq!(r.codes[0], 1638, "note 60 = 2 V");
    assert_eq!(r.codes[1], 0);
    assert_eq!(r.lease_expiries, 0, "refreshes kept the lease while held");

    // Another note; then the coordinator dies. The gate drops at the end of the last lease.
    let at2 = w.cluster().add_nanos(5 * MS as i64);
    let on2 = VoiceOn {
        at: at2,
        lease_until: at2.add_nanos(300 * MS as i64),
        ..on
    };
    w.link.send(&Message::VoiceOn(on2));
    w.held.push(on2);
    w.settle();
    w.run_until(w.tau + 250 * MS);
    let death = w.cluster();
    w.coordinator_alive = false;
    w.flight.retain(|f| !f.1); // what it had sent is lost with it, say
    w.run_until(w.tau + 1_000 * MS);
    let drop = w.gate.last().copied().unwrap();
    assert_eq!(drop.1, 0, "gate dropped");
    let after_death = ClusterTime(drop.0).nanos_since(death);
    assert!(
        (0..=300 * MS as i64 + 1_000_000).contains(&after_death),
        "gate dropped {after_death} ns after the coordinator died (lease 300 ms)"
    );
    assert_eq!(w.node.engine_stats().lease_expiries, 1);
}
