//! The MCU node's session with the coordinator over UDP datagrams, around the clock servo and
//! the CV engine.
//!
//! States: **idle** (no coordinator) → a coordinator datagram arrives → **joining** (Hello
//! sent, re-sent at every coordinator heartbeat) → `Welcome` → **joined** (heartbeats, time
//! sync and reports every `heartbeat_ms`; assignments and events go to the engine). A new
//! coordinator session id starts over at joining; `Bye`, or 10 heartbeat intervals without a
//! datagram, goes back to idle and releases every voice (gates drop). The wire is specified in
//! docs/wire-protocol.md ("MCU datagrams").
//!
//! Call order (the glue: firmware or simulator):
//! 1. [`McuNode::handle_datagram`] for every datagram received; when it says
//!    `from_coordinator`, remember the sender's address as the coordinator's.
//! 2. [`McuNode::handle_timeout`] at or after [`McuNode::poll_timeout`].
//! 3. After either: [`McuNode::poll_dac`] until `None`, performing each op and reporting it
//!    with [`McuNode::dac_done`] (at once or when the bus finishes), then
//!    [`McuNode::poll_transmit`] until `None`, sending each datagram to the coordinator.

use heapless::Deque;
use voicemesh_protocol::datagram::{
    DATAGRAM_HEADER_LEN, DatagramError, DatagramHeader, ReplayWindow, decode_datagram,
    encode_datagram,
};
use voicemesh_protocol::{
    ClusterTime, CvReport, DecodeError, ErrorCode, ErrorMsg, Heartbeat, Hello, Message, Role,
    ShortStr, TimeSync, Timeline,
};

use crate::engine::{ChannelWrite, CvEngine, EngineStats};
use crate::servo::ClockServo;
use crate::{DacSpec, LocalTime, MAX_DACS};

/// Heartbeat interval before a `Welcome` says otherwise, ms.
pub const DEFAULT_HEARTBEAT_MS: u16 = 100;
/// Heartbeat intervals without a coordinator datagram after which the session is lost.
pub const SESSION_TIMEOUT_HEARTBEATS: u64 = 10;

/// What the node is and has.
#[derive(Clone, Debug)]
pub struct McuConfig {
    /// Stable node id (also in the mDNS TXT record).
    pub id: ShortStr,
    /// Human-readable name.
    pub name: ShortStr,
    /// Voice slots the node plays (pitch/gate/velocity sets), at most
    /// [`crate::engine::MAX_VOICES`].
    pub voices: u16,
    /// The DACs; node channels are numbered across them in order.
    pub dacs: heapless::Vec<DacSpec, MAX_DACS>,
    /// This boot's session id: random, different at every start.
    pub session_id: u32,
}

/// What [`McuNode::handle_datagram`] made of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The datagram came from the coordinator (the glue sends everything there from now on).
    pub from_coordinator: bool,
    /// It was accepted and handled (not a duplicate, replay or malformed).
    pub accepted: bool,
}

/// A DAC operation for the glue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DacOp {
    /// Initialise DAC `dac` (reset, reference, range, pin modes: see [`crate::dac`]).
    Init {
        /// DAC index.
        dac: u8,
    },
    /// Write one channel.
    Write(ChannelWrite),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    Joining,
    Joined,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tx {
    Hello,
    Heartbeat,
    TimeSync,
    Report,
    VersionMismatch { theirs: u8 },
    Bye,
}

/// Counters of the session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Sessions joined (Welcome received).
    pub joins: u32,
    /// Sessions lost (timeout or Bye).
    pub losses: u32,
    /// Frames of another protocol major version.
    pub version_mismatches: u32,
    /// Messages the engine refused (unknown channel or voice, bad table, queue full).
    pub refused: u32,
    /// Messages that make no sense here (a Hello, a Status, …), ignored.
    pub unexpected: u32,
}

/// The MCU node. See the module docs for the call order.
#[derive(Debug)]
pub struct McuNode {
    cfg: McuConfig,
    state: State,
    window: ReplayWindow,
    servo: ClockServo,
    engine: CvEngine,
    tx: Deque<Tx, 8>,
    tx_seq: u32,
    hb_seq: u32,
    heartbeat_ms: u16,
    last_rx: LocalTime,
    next_heartbeat: LocalTime,
    report_due: bool,
    /// Whether the coordinator answers TimeSync (then heartbeats no longer feed the servo).
    round_trips: bool,
    stats: SessionStats,
    now: LocalTime,
}

impl McuNode {
    /// A node that starts idle at local time `now`, waiting for a coordinator.
    pub fn new(cfg: McuConfig, now: LocalTime) -> Self {
        let engine = CvEngine::new(&cfg.dacs, cfg.voices);
        McuNode {
            cfg,
            state: State::Idle,
            window: ReplayWindow::new(),
            servo: ClockServo::new(),
            engine,
            tx: Deque::new(),
            tx_seq: 0,
            hb_seq: 0,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            last_rx: now,
            next_heartbeat: now,
            report_due: false,
            round_trips: false,
            stats: SessionStats::default(),
            now,
        }
    }

    /// Whether a coordinator has welcomed the node and the session is alive.
    pub fn joined(&self) -> bool {
        self.state == State::Joined
    }

    /// The clock servo.
    pub fn servo(&self) -> &ClockServo {
        &self.servo
    }

    /// Replaces the clock servo (before the first datagram), e.g. with one from
    /// [`ClockServo::with_thresholds`] for a jittery link.
    pub fn set_servo(&mut self, servo: ClockServo) {
        self.servo = servo;
    }

    /// The CV engine (codes, assignments, counters).
    pub fn engine(&self) -> &CvEngine {
        &self.engine
    }

    /// The session counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// The engine's counters.
    pub fn engine_stats(&self) -> EngineStats {
        self.engine.stats()
    }

    /// Cluster time at local time `now`.
    pub fn cluster_time(&self, now: LocalTime) -> ClusterTime {
        self.servo.cluster(now)
    }

    /// Number of CV channels.
    pub fn channels(&self) -> usize {
        self.engine.channels()
    }

    fn queue(&mut self, t: Tx) {
        if !self.tx.iter().any(|q| *q == t) {
            let _ = self.tx.push_back(t);
        }
    }

    /// Handles one received datagram at local time `now`.
    pub fn handle_datagram(&mut self, now: LocalTime, bytes: &[u8]) -> Received {
        self.now = now;
        let (header, frame) = match decode_datagram(bytes) {
            Ok(x) => x,
            Err(DatagramError::Frame(DecodeError::VersionMismatch { theirs, .. })) => {
                self.window.count_malformed();
                self.stats.version_mismatches += 1;
                self.queue(Tx::VersionMismatch { theirs });
                return Received {
                    from_coordinator: true,
                    accepted: false,
                };
            }
            Err(_) => {
                self.window.count_malformed();
                return Received {
                    from_coordinator: false,
                    accepted: false,
                };
            }
        };
        let new_session = self.window.session() != Some(header.session);
        if !self.window.check(header).accept() {
            return Received {
                from_coordinator: false,
                accepted: false,
            };
        }
        self.last_rx = now;
        if new_session && self.state != State::Idle {
            // The coordinator restarted: join its new session.
            self.state = State::Idle;
        }
        self.handle_message(now, frame.message);
        Received {
            from_coordinator: true,
            accepted: true,
        }
    }

    fn handle_message(&mut self, now: LocalTime, msg: Message) {
        let joined = self.state == State::Joined;
        let refused = match msg {
            Message::Heartbeat(hb) => {
                if !self.round_trips {
                    self.servo.handle_one_way(now, hb.now);
                }
                if self.state != State::Joined {
                    self.state = State::Joining;
                    self.queue(Tx::Hello);
                }
                false
            }
            Message::Welcome(w) => {
                // Accepted in any state: a Welcome under a new session id while we were
                // joined is the coordinator re-admitting us (it answers a duplicate Hello —
                // a probe that crossed our first Welcome — with a new session and a Welcome
                // at once); refusing it until our next Hello would make it re-admit us again,
                // forever.
                if self.state != State::Joined {
                    self.stats.joins += 1;
                }
                self.state = State::Joined;
                self.heartbeat_ms = w.heartbeat_ms.max(10);
                self.engine.set_timeline(w.timeline);
                self.next_heartbeat = now;
                false
            }
            Message::TimeSync(ts) => {
                if ts.transmit.0 != 0
                    && self.servo.handle_round_trip(
                        LocalTime(ts.origin),
                        ts.receive,
                        ts.transmit,
                        now,
                    )
                {
                    self.round_trips = true;
                }
                false
            }
            Message::CvAssign(a) if joined => self.engine.assign(&a).is_err(),
            Message::VoiceOn(on) if joined => self.engine.voice_on(on).is_err(),
            Message::VoiceOff(off) if joined => self.engine.voice_off(off).is_err(),
            Message::Control(c) if joined => self.engine.control(c).is_err(),
            Message::CvSet(s) if joined => self.engine.cv_set(s).is_err(),
            Message::LeaseRenew(r) if joined => {
                self.engine.renew(&r.voices, r.until);
                false
            }
            Message::Timeline(tl) if joined => {
                self.set_timeline(tl);
                false
            }
            Message::Bye(_) | Message::Error(_) => {
                self.lose_session();
                false
            }
            _ => {
                self.stats.unexpected += 1;
                false
            }
        };
        if refused {
            self.stats.refused += 1;
        }
        // Apply what is already due right away (an event with `at` in the past, an assignment).
        self.handle_timeout(now);
    }

    fn set_timeline(&mut self, tl: Timeline) {
        self.engine.set_timeline(tl);
    }

    fn lose_session(&mut self) {
        if self.state == State::Joined {
            self.stats.losses += 1;
        }
        self.state = State::Idle;
        self.engine.release_all();
        self.window.reset();
        self.round_trips = false;
    }

    /// Ends the session on purpose: the next [`Self::poll_transmit`] yields a `Bye` for the
    /// coordinator, and every voice is released.
    pub fn close(&mut self) {
        let was = self.state;
        self.lose_session();
        if was != State::Idle {
            self.tx.clear();
            self.queue(Tx::Bye);
        }
    }

    /// Runs the timers at local time `now`: session timeout, heartbeats, and the engine.
    pub fn handle_timeout(&mut self, now: LocalTime) {
        self.now = now;
        let hb_ns = u64::from(self.heartbeat_ms) * 1_000_000;
        if self.state != State::Idle
            && now.0.saturating_sub(self.last_rx.0) > SESSION_TIMEOUT_HEARTBEATS * hb_ns
        {
            self.lose_session();
        }
        if self.state == State::Joined && now >= self.next_heartbeat {
            self.next_heartbeat = now.add_nanos(hb_ns);
            self.queue(Tx::Heartbeat);
            self.queue(Tx::TimeSync);
            self.queue(Tx::Report);
        }
        let cluster = self.servo.cluster(now);
        self.engine.handle_timeout(cluster);
    }

    /// When [`Self::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> LocalTime {
        let hb_ns = u64::from(self.heartbeat_ms) * 1_000_000;
        let mut t = self.servo.local(self.engine.next_deadline());
        if self.state == State::Joined {
            t = t.min(self.next_heartbeat);
        }
        if self.state != State::Idle {
            t = t.min(
                self.last_rx
                    .add_nanos(SESSION_TIMEOUT_HEARTBEATS * hb_ns + 1),
            );
        }
        t.max(self.now)
    }

    /// The next DAC operation to perform, in order (inits first, then writes: pitch before
    /// gate). Report each with [`Self::dac_done`].
    pub fn poll_dac(&mut self, _now: LocalTime) -> Option<DacOp> {
        if let Some(dac) = self.engine.poll_init() {
            return Some(DacOp::Init { dac });
        }
        self.engine.poll_write().map(DacOp::Write)
    }

    /// The result of an operation from [`Self::poll_dac`], finished at local time `now`.
    pub fn dac_done(&mut self, now: LocalTime, op: DacOp, ok: bool) {
        let cluster = self.servo.cluster(now);
        match op {
            DacOp::Init { dac } => self.engine.init_done(dac, ok, cluster),
            DacOp::Write(w) => {
                if self.engine.write_done(w, ok, cluster) {
                    self.report_due = true;
                }
            }
        }
    }

    /// The next datagram for the coordinator, written into `buf` (at least
    /// [`voicemesh_protocol::datagram::MAX_DATAGRAM_LEN`] bytes); returns its length.
    pub fn poll_transmit(&mut self, now: LocalTime, buf: &mut [u8]) -> Option<usize> {
        if self.report_due && self.state == State::Joined {
            self.report_due = false;
            self.queue(Tx::Report);
        }
        loop {
            let t = self.tx.pop_front()?;
            let msg = match t {
                Tx::Hello => Message::Hello(Hello {
                    id: self.cfg.id.clone(),
                    name: self.cfg.name.clone(),
                    role: Role::Mcu,
                    voices: self.engine.voices() as u16,
                    cv: self.engine.channels() as u16,
                    engines: heapless::Vec::new(),
                    sample_rate: 0,
                }),
                Tx::Heartbeat if self.state == State::Joined => {
                    self.hb_seq = self.hb_seq.wrapping_add(1);
                    Message::Heartbeat(Heartbeat {
                        seq: self.hb_seq,
                        now: self.servo.cluster(now),
                    })
                }
                Tx::TimeSync if self.state == State::Joined => Message::TimeSync(TimeSync {
                    origin: now.0,
                    receive: ClusterTime::ZERO,
                    transmit: ClusterTime::ZERO,
                }),
                Tx::Report if self.state == State::Joined => Message::CvReport(self.report(now)),
                Tx::Bye => Message::Bye(voicemesh_protocol::Bye {
                    reason: Message::text("MCU node shutting down"),
                }),
                Tx::VersionMismatch { theirs } => Message::Error(ErrorMsg {
                    code: ErrorCode::VersionMismatch,
                    text: version_text(theirs),
                }),
                _ => continue,
            };
            let header = DatagramHeader {
                session: self.cfg.session_id,
                seq: self.tx_seq,
            };
            if buf.len() < DATAGRAM_HEADER_LEN {
                return None;
            }
            match encode_datagram(header, &msg, buf) {
                Ok(n) => {
                    self.tx_seq = self.tx_seq.wrapping_add(1);
                    return Some(n);
                }
                Err(_) => continue,
            }
        }
    }

    /// The report the node would send now.
    pub fn report(&self, now: LocalTime) -> CvReport {
        let e = &self.engine;
        let s = e.stats();
        let n = e.channels() as u16;
        let mut applied_at = ClusterTime::ZERO;
        let mut codes = heapless::Vec::new();
        let mut changed = heapless::Vec::new();
        for ch in 0..n {
            let _ = codes.push(e.code(ch));
            let t = e.changed_at(ch);
            applied_at = applied_at.max(t);
            let _ = changed.push(t);
        }
        CvReport {
            now: self.servo.cluster(now),
            codes,
            changed_at: changed,
            applied_at,
            dac_faults: e.dac_faults(),
            writes: s.writes,
            skipped_writes: s.skipped_writes,
            write_errors: s.write_errors,
            late_events: s.late_events,
            lease_expiries: s.lease_expiries,
            clock_offset_ns: self.servo.last_error_ns(),
            clock_locked: self.servo.locked(),
            rx: self.window.counters(),
        }
    }
}

fn version_text(theirs: u8) -> voicemesh_protocol::Text {
    use core::fmt::Write;
    let mut t = voicemesh_protocol::Text::new();
    let _ = write!(
        t,
        "MCU speaks VoiceMesh protocol {}.x, peer {theirs}.x",
        voicemesh_protocol::PROTOCOL_VERSION
    );
    t
}
