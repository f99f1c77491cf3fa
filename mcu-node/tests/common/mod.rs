//! A deterministic rig around one `McuNode`: a fake coordinator that writes datagrams, virtual
//! DACs that complete every write at once (or fail on demand), and a clock the test moves.
#![allow(dead_code, reason = "each test binary uses part of the rig")]

use voicemesh_mcu::{DacOp, DacSpec, LocalTime, McuConfig, McuNode};
use voicemesh_protocol::datagram::{
    DatagramHeader, MAX_DATAGRAM_LEN, decode_datagram, encode_datagram,
};
use voicemesh_protocol::{
    CalPoint, ClusterTime, CvAssign, CvFunction, Heartbeat, Message, Timeline, Welcome,
};

/// One DAC write or init the node performed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    pub at: LocalTime,
    pub op: DacOp,
    pub ok: bool,
}

pub struct Rig {
    pub node: McuNode,
    pub now: LocalTime,
    /// Local clock = cluster time − this (so cluster time 0 is local `offset`).
    pub session: u32,
    pub seq: u32,
    pub failing: Vec<bool>,
    pub ops: Vec<Op>,
    pub sent: Vec<Message>,
    /// Codes per channel as the virtual DACs hold them.
    pub dac_codes: Vec<u16>,
}

pub const T0: u64 = 1_000_000_000;

pub fn config(dacs: &[DacSpec], voices: u16) -> McuConfig {
    McuConfig {
        id: "t41".try_into().unwrap(),
        name: "teensy".try_into().unwrap(),
        voices,
        dacs: dacs.iter().copied().collect(),
        session_id: 0xabcd,
    }
}

/// A 0–5 V output with base note 36 and a ±2-semitone bend.
pub fn assign(channel: u16, function: CvFunction) -> CvAssign {
    CvAssign {
        max_uv: 5_000_000,
        base_note: 36,
        bend_semitones: 2,
        ..CvAssign::new(channel, function)
    }
}

pub fn cal(points: &[(i32, i32)]) -> heapless::Vec<CalPoint, 16> {
    points
        .iter()
        .map(|&(microvolts, code)| CalPoint { microvolts, code })
        .collect()
}

impl Rig {
    /// A node with `dacs` at local time 0.
    pub fn new(dacs: &[DacSpec], voices: u16) -> Rig {
        let n: usize = dacs.iter().map(|d| usize::from(d.channels)).sum();
        Rig {
            node: McuNode::new(config(dacs, voices), LocalTime(0)),
            now: LocalTime(0),
            session: 77,
            seq: 0,
            failing: vec![false; dacs.len()],
            ops: Vec::new(),
            sent: Vec::new(),
            dac_codes: vec![0; n],
        }
    }

    /// A rig already joined: the coordinator's heartbeat at cluster time `T0` arrived at
    /// local time 0 (so cluster = local + T0), then a Welcome at 120 BPM.
    pub fn joined(dacs: &[DacSpec], voices: u16) -> Rig {
        let mut r = Rig::new(dacs, voices);
        r.send(Message::Heartbeat(Heartbeat {
            seq: 0,
            now: ClusterTime(T0),
        }));
        assert!(matches!(r.sent.last(), Some(Message::Hello(_))));
        r.send(Message::Welcome(Welcome {
            coordinator: "c".try_into().unwrap(),
            heartbeat_ms: 100,
            lease_ms: 1000,
            timeline: Timeline::from_milli_bpm(120_000, ClusterTime(T0)),
        }));
        assert!(r.node.joined());
        r
    }

    pub fn datagram(&mut self, msg: &Message) -> Vec<u8> {
        let mut buf = [0u8; MAX_DATAGRAM_LEN];
        let h = DatagramHeader {
            session: self.session,
            seq: self.seq,
        };
        self.seq += 1;
        let n = encode_datagram(h, msg, &mut buf).unwrap();
        buf[..n].to_vec()
    }

    /// Delivers `msg` from the coordinator now, then lets the node work.
    pub fn send(&mut self, msg: Message) {
        let d = self.datagram(&msg);
        self.deliver(&d);
    }

    pub fn deliver(&mut self, bytes: &[u8]) {
        let _ = self.node.handle_datagram(self.now, bytes);
        self.drain();
    }

    /// Performs every pending DAC op and collects every datagram.
    pub fn drain(&mut self) {
        while let Some(op) = self.node.poll_dac(self.now) {
            let ok = match op {
                DacOp::Init { dac } => !self.failing[usize::from(dac)],
                DacOp::Write(w) => {
                    let ok = !self.failing[usize::from(w.dac)];
                    if ok {
                        self.dac_codes[usize::from(w.channel)] = w.code;
                    }
                    ok
                }
            };
            self.ops.push(Op {
                at: self.now,
                op,
                ok,
            });
            self.node.dac_done(self.now, op, ok);
        }
        let mut buf = [0u8; MAX_DATAGRAM_LEN];
        while let Some(n) = self.node.poll_transmit(self.now, &mut buf) {
            let (h, f) = decode_datagram(&buf[..n]).expect("the node sends valid datagrams");
            assert_eq!(h.session, 0xabcd);
            self.sent.push(f.message);
        }
    }

    /// Runs the node's timers up to local time `t`, waking at every deadline it asks for.
    pub fn run_until(&mut self, t: LocalTime) {
        loop {
            let next = self.node.poll_timeout();
            if next > t {
                break;
            }
            self.now = next.max(self.now);
            self.node.handle_timeout(self.now);
            self.drain();
            if self.node.poll_timeout() <= self.now {
                // A deadline that does not move would spin: step 1 µs.
                self.now = self.now.add_nanos(1_000);
            }
        }
        self.now = t;
        self.node.handle_timeout(t);
        self.drain();
    }

    /// Local time of cluster time `c` in a joined rig (cluster = local + T0).
    pub fn local(c: u64) -> LocalTime {
        LocalTime(c - T0)
    }

    /// Writes (successful) to `channel`, with their local time and code.
    pub fn writes(&self, channel: u16) -> Vec<(u64, u16)> {
        self.ops
            .iter()
            .filter_map(|o| match o.op {
                DacOp::Write(w) if w.channel == channel && o.ok => Some((o.at.0, w.code)),
                _ => None,
            })
            .collect()
    }

    /// Code changes on `channel`: (local time, new code), first the initial one.
    pub fn changes(&self, channel: u16) -> Vec<(u64, u16)> {
        let mut out: Vec<(u64, u16)> = Vec::new();
        for (t, c) in self.writes(channel) {
            if out.last().map(|l| l.1) != Some(c) {
                out.push((t, c));
            }
        }
        out
    }
}
