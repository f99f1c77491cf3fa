//! MCU links: the coordinator's end of the UDP session with each MCU node (a Teensy board or
//! `voicemesh mcu-sim`).
//!
//! MCU nodes advertise `_voicemesh._udp` with `role=mcu` like Linux nodes, but speak datagrams
//! instead of QUIC: every datagram carries one protocol frame behind a small header with a
//! sequence number (`voicemesh_protocol::datagram`, docs/mcu.md). [`McuLink`] is the sans-IO
//! core of one such session; `run` is its tokio glue, one task and one connected UDP socket per
//! MCU address.
//!
//! The flow (docs/wire-protocol.md, "The MCU session over UDP"): the coordinator sends
//! `Heartbeat` seq 0 to the advertised port, again every heartbeat interval until it is
//! answered; the MCU answers `Hello` (role `mcu`, its voice slots and CV channels); the
//! coordinator sends `Welcome`, then the MCU's full CV state (a `CvAssign` per channel from the
//! CV router, the controllers its outputs follow), and from then on both ends send `Heartbeat`
//! every heartbeat interval; the MCU's `TimeSync` requests are answered at once and its
//! `CvReport`s (DAC codes) are kept for `/api/cluster`. An MCU heard from not at all for
//! `offline_after` is offline, like a Linux node: its voices go back to the allocator
//! (re-spawned elsewhere where a route allows) and the link probes again under a new session id,
//! so a returning MCU rejoins by itself. Voice events, lease renewals and `Control`s reach the
//! MCU through the same per-node queue the allocator and the CV router use for every node
//! (`Inner::dispatch`). Every `refresh` interval (100 ms) the link re-sends the MCU's full CV
//! state — held voices, controller values, and the assignments once a second or when the
//! configuration changed — so a lost datagram heals itself (DESIGN §4).
//!
//! Datagrams that fail to parse, come from another major protocol version, repeat or fall behind
//! the replay window, or arrive when they make no sense (anything but `Hello` before the session,
//! a `Hello` of a Linux node) are dropped and counted ([`DatagramCounters`]); none of them ends
//! the session or panics.
//!
//! Call order of the core: [`McuLink::new`]; then, in any order, [`McuLink::handle_datagram`]
//! for every datagram received, [`McuLink::handle_timeout`] at or after
//! [`McuLink::poll_timeout`], [`McuLink::send`] for messages to the MCU; after each call drain
//! [`McuLink::poll_transmit`] (datagrams to send) and [`McuLink::poll_event`].

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use voicemesh_protocol::{
    ClusterTime, CvReport, ErrorCode, ErrorMsg, Heartbeat, Hello, Message, Role, RxCounters,
    TimeSync, VoiceOn, Welcome,
};

/// Default full-state refresh interval (DESIGN §4).
pub const REFRESH_NS: u64 = 100_000_000;

/// Timing of one link, in nanoseconds of the glue's monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct McuTiming {
    /// Heartbeat interval (default 100 ms).
    pub heartbeat_ns: u64,
    /// Silence after which the MCU is offline (default 250 ms).
    pub offline_after_ns: u64,
    /// Full CV state re-sent this often (default 100 ms).
    pub refresh_ns: u64,
}

impl Default for McuTiming {
    fn default() -> Self {
        McuTiming {
            heartbeat_ns: 100_000_000,
            offline_after_ns: 250_000_000,
            refresh_ns: REFRESH_NS,
        }
    }
}

/// Datagram counters of one link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatagramCounters {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams received and accepted.
    pub received: u64,
    /// Dropped: not a datagram of ours (bad header or frame).
    pub malformed: u64,
    /// Dropped: another major protocol version.
    pub version: u64,
    /// Dropped: a sequence number seen before (inside the replay window).
    pub duplicates: u64,
    /// Dropped: older than the replay window (a replay, or far too late).
    pub replays: u64,
    /// Accepted although older than the newest seen (reordered on the way).
    pub reordered: u64,
    /// Sequence numbers skipped (lost on the way, or still to come).
    pub gaps: u64,
    /// Dropped: well-formed but out of place (a message before `Hello`, a non-MCU `Hello`).
    pub unexpected: u64,
    /// Messages not sent because the MCU was not in a session (or could not be encoded).
    pub unsent: u64,
}

impl DatagramCounters {
    /// Every datagram received and dropped.
    pub fn dropped(&self) -> u64 {
        self.malformed + self.version + self.duplicates + self.replays + self.unexpected
    }
}

/// Why a link lost its MCU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// Nothing heard within `offline_after`.
    Silent,
    /// The MCU said `Bye`.
    Bye(String),
    /// The MCU sent a new `Hello` during the session: it restarted.
    Restarted,
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostReason::Silent => write!(f, "MCU silent; marked offline"),
            LostReason::Bye(r) => write!(f, "MCU said bye: {r}"),
            LostReason::Restarted => write!(f, "MCU restarted (new Hello)"),
        }
    }
}

/// What the glue must act on.
#[derive(Clone, Debug, PartialEq)]
pub enum McuEvent {
    /// The MCU joined (its `Hello`); `Welcome` is already queued. The glue registers it and
    /// sends its CV assignments and full state.
    Joined(Hello),
    /// The session ended; the link probes again.
    Lost(LostReason),
    /// Time to re-send the MCU's full CV state.
    RefreshDue,
    /// The MCU asks for the cluster time (a `TimeSync` request, `origin` its local clock):
    /// the glue answers at once with [`McuLink::answer_time_sync`].
    TimeSync {
        /// The request's `origin`, echoed back.
        origin: u64,
        /// Cluster time at which the request arrived.
        receive: ClusterTime,
    },
    /// Any other message from the MCU in session (`CvReport`, `Status`, `Error`).
    Message(Message),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Probing {
        next_probe: u64,
    },
    Joined {
        deadline: u64,
        next_heartbeat: u64,
        next_refresh: u64,
    },
}

/// The coordinator's end of one MCU session (sans-IO). See the module docs for the call order.
#[derive(Debug)]
pub struct McuLink {
    timing: McuTiming,
    welcome: Welcome,
    phase: Phase,
    heartbeat_seq: u32,
    /// The MCU's datagram session id when it joined: a `Hello` under it again is a duplicate,
    /// under another one a restart.
    peer_session: Option<u32>,
    tx: wire::Sender,
    rx: wire::Receiver,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<McuEvent>,
    counters: DatagramCounters,
}

/// What [`McuLink::handle_datagram`] made of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// Accepted: the MCU is alive.
    Accepted,
    /// Dropped and counted.
    Dropped,
}

impl McuLink {
    /// A link that starts probing at `now`; `welcome` is sent to the MCU when it joins; our
    /// datagrams carry the session id `session` (random, so that an MCU tells a restarted
    /// coordinator from a replay of the old one).
    pub fn new(timing: McuTiming, welcome: Welcome, session: u32, now: u64) -> Self {
        McuLink {
            timing,
            welcome,
            phase: Phase::Probing { next_probe: now },
            heartbeat_seq: 0,
            peer_session: None,
            tx: wire::Sender::new(session),
            rx: wire::Receiver::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: DatagramCounters::default(),
        }
    }

    /// Whether the MCU is in session.
    pub fn is_joined(&self) -> bool {
        matches!(self.phase, Phase::Joined { .. })
    }

    /// The datagram counters.
    pub fn counters(&self) -> DatagramCounters {
        let rx = self.rx.counters();
        DatagramCounters {
            reordered: u64::from(rx.reordered),
            gaps: u64::from(rx.gaps),
            ..self.counters
        }
    }

    /// Replaces the `Welcome` sent at the next join (a new timeline).
    pub fn set_welcome(&mut self, welcome: Welcome) {
        self.welcome = welcome;
    }

    fn queue(&mut self, msg: &Message) -> bool {
        match self.tx.encode(msg) {
            Ok(d) => {
                self.transmits.push_back(d);
                self.counters.sent += 1;
                true
            }
            Err(_) => {
                self.counters.unsent += 1;
                false
            }
        }
    }

    /// Queues `msg` for the MCU; only in session (otherwise it is counted as unsent and
    /// `false` is returned).
    pub fn send(&mut self, msg: &Message) -> bool {
        if !self.is_joined() {
            self.counters.unsent += 1;
            return false;
        }
        self.queue(msg)
    }

    /// Ends the session on purpose (the coordinator stops): queues `Bye` if in session.
    pub fn close(&mut self, reason: &str) {
        if self.is_joined() {
            self.queue(&Message::Bye(voicemesh_protocol::Bye {
                reason: Message::text(reason),
            }));
        }
    }

    fn join(&mut self, now: u64, hello: Hello) {
        self.phase = Phase::Joined {
            deadline: now + self.timing.offline_after_ns,
            next_heartbeat: now + self.timing.heartbeat_ns,
            next_refresh: now + self.timing.refresh_ns,
        };
        let welcome = Message::Welcome(self.welcome.clone());
        self.queue(&welcome);
        self.events.push_back(McuEvent::Joined(hello));
    }

    /// The MCU was heard from at `now`: it is offline only `offline_after` from here.
    fn refresh_deadline(&mut self, now: u64) {
        if let Phase::Joined { deadline, .. } = &mut self.phase {
            *deadline = now + self.timing.offline_after_ns;
        }
    }

    fn lose(&mut self, now: u64, reason: LostReason) {
        self.phase = Phase::Probing { next_probe: now };
        // A new session of ours: whatever the MCU still thinks of the old one, it starts over
        // with a Hello.
        self.tx.next_session();
        self.events.push_back(McuEvent::Lost(reason));
    }

    /// Answers a [`McuEvent::TimeSync`]: `transmit` is the cluster time now, as late as the
    /// glue can read it.
    pub fn answer_time_sync(&mut self, origin: u64, receive: ClusterTime, transmit: ClusterTime) {
        self.send(&Message::TimeSync(TimeSync {
            origin,
            receive,
            transmit,
        }));
    }

    /// One datagram from the MCU's address, received at `now` (monotonic) and `cluster`.
    pub fn handle_datagram(&mut self, now: u64, cluster: ClusterTime, bytes: &[u8]) -> Received {
        let (msg, session) = match self.rx.decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                let c = &mut self.counters;
                match e {
                    wire::Drop::Malformed => c.malformed += 1,
                    wire::Drop::Version => c.version += 1,
                    wire::Drop::Duplicate => c.duplicates += 1,
                    wire::Drop::Replayed => c.replays += 1,
                }
                return Received::Dropped;
            }
        };
        match (self.phase, msg) {
            (_, Message::Hello(h)) if h.role != Role::Mcu => {
                self.counters.unexpected += 1;
                self.queue(&Message::Error(ErrorMsg {
                    code: ErrorCode::Refused,
                    text: Message::text("this port takes MCU nodes; Linux nodes speak QUIC"),
                }));
                return Received::Dropped;
            }
            (Phase::Probing { .. }, Message::Hello(h)) => {
                self.peer_session = Some(session);
                self.join(now, h);
            }
            (Phase::Probing { .. }, _) => {
                self.counters.unexpected += 1;
                return Received::Dropped;
            }
            // The same MCU session again: our probe crossed its first Welcome. Welcome it again;
            // nothing was lost.
            (Phase::Joined { .. }, Message::Hello(_)) if self.peer_session == Some(session) => {
                let welcome = Message::Welcome(self.welcome.clone());
                self.queue(&welcome);
                self.refresh_deadline(now);
            }
            (Phase::Joined { .. }, Message::Hello(h)) => {
                self.lose(now, LostReason::Restarted);
                self.peer_session = Some(session);
                self.join(now, h);
            }
            (Phase::Joined { .. }, Message::Bye(b)) => {
                self.lose(now, LostReason::Bye(b.reason.to_string()));
            }
            (Phase::Joined { .. }, m) => {
                self.refresh_deadline(now);
                match m {
                    Message::Heartbeat(_) => {}
                    Message::TimeSync(t) => self.events.push_back(McuEvent::TimeSync {
                        origin: t.origin,
                        receive: cluster,
                    }),
                    m => self.events.push_back(McuEvent::Message(m)),
                }
            }
        }
        self.counters.received += 1;
        Received::Accepted
    }

    /// Timers: probes, heartbeats (stamped `cluster`), the liveness deadline and refreshes.
    pub fn handle_timeout(&mut self, now: u64, cluster: ClusterTime) {
        match self.phase {
            Phase::Probing { next_probe } => {
                if now >= next_probe {
                    self.queue(&Message::Heartbeat(Heartbeat {
                        seq: 0,
                        now: cluster,
                    }));
                    self.phase = Phase::Probing {
                        next_probe: now + self.timing.heartbeat_ns,
                    };
                }
            }
            Phase::Joined {
                deadline,
                mut next_heartbeat,
                mut next_refresh,
            } => {
                if now >= deadline {
                    self.lose(now, LostReason::Silent);
                    return self.handle_timeout(now, cluster);
                }
                if now >= next_heartbeat {
                    self.heartbeat_seq = self.heartbeat_seq.wrapping_add(1).max(1);
                    let hb = Message::Heartbeat(Heartbeat {
                        seq: self.heartbeat_seq,
                        now: cluster,
                    });
                    self.queue(&hb);
                    next_heartbeat = now + self.timing.heartbeat_ns;
                }
                if now >= next_refresh {
                    self.events.push_back(McuEvent::RefreshDue);
                    next_refresh = now + self.timing.refresh_ns;
                }
                self.phase = Phase::Joined {
                    deadline,
                    next_heartbeat,
                    next_refresh,
                };
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to be called next.
    pub fn poll_timeout(&self) -> u64 {
        match self.phase {
            Phase::Probing { next_probe, .. } => next_probe,
            Phase::Joined {
                deadline,
                next_heartbeat,
                next_refresh,
            } => deadline.min(next_heartbeat).min(next_refresh),
        }
    }

    /// The next datagram to send to the MCU.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// The next event for the glue.
    pub fn poll_event(&mut self) -> Option<McuEvent> {
        self.events.pop_front()
    }
}

/// The datagram layer of one link: our session id and sequence numbers out, the MCU's replay
/// window in.
mod wire {
    use voicemesh_protocol::datagram::{
        DatagramError, DatagramHeader, MAX_DATAGRAM_LEN, ReplayWindow, SeqVerdict, decode_datagram,
        encode_datagram,
    };
    use voicemesh_protocol::{DecodeError, EncodeError, Message, RxCounters};

    /// Why a datagram was dropped.
    pub enum Drop {
        Malformed,
        Version,
        Duplicate,
        Replayed,
    }

    #[derive(Debug)]
    pub struct Sender {
        header: DatagramHeader,
    }

    impl Sender {
        /// Datagrams of session `session`, numbered from 0.
        pub fn new(session: u32) -> Self {
            Sender {
                header: DatagramHeader { session, seq: 0 },
            }
        }

        pub fn encode(&mut self, msg: &Message) -> Result<Vec<u8>, EncodeError> {
            let mut buf = [0u8; MAX_DATAGRAM_LEN];
            let n = encode_datagram(self.header, msg, &mut buf)?;
            // Sequence numbers never wrap inside a session: at the end, a new session.
            match self.header.seq.checked_add(1) {
                Some(s) => self.header.seq = s,
                None => {
                    self.header.session = self.header.session.wrapping_add(1);
                    self.header.seq = 0;
                }
            }
            Ok(buf[..n].to_vec())
        }

        /// Starts a new session (another id, numbered from 0 again).
        pub fn next_session(&mut self) {
            self.header = DatagramHeader {
                session: self.header.session.wrapping_add(0x9e37_79b9),
                seq: 0,
            };
        }
    }

    #[derive(Debug, Default)]
    pub struct Receiver {
        window: ReplayWindow,
    }

    impl Receiver {
        pub fn counters(&self) -> RxCounters {
            self.window.counters()
        }

        /// The message and the MCU session id it came under.
        pub fn decode(&mut self, bytes: &[u8]) -> Result<(Message, u32), Drop> {
            let (header, frame) = match decode_datagram(bytes) {
                Ok(d) => d,
                Err(e) => {
                    self.window.count_malformed();
                    return Err(match e {
                        DatagramError::Frame(DecodeError::VersionMismatch { .. }) => Drop::Version,
                        _ => Drop::Malformed,
                    });
                }
            };
            match self.window.check(header) {
                SeqVerdict::Fresh | SeqVerdict::Reordered => Ok((frame.message, header.session)),
                SeqVerdict::Duplicate => Err(Drop::Duplicate),
                SeqVerdict::TooOld => Err(Drop::Replayed),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// tokio glue
// ---------------------------------------------------------------------------------------------

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::state::{Inner, Outgoing, SESSION_QUEUE, Shared};

/// Largest datagram read from an MCU.
const MAX_DATAGRAM: usize = 2048;

/// What the coordinator knows of one MCU beyond the common node fields.
#[derive(Clone, Debug, Default)]
pub(crate) struct McuView {
    /// CV channels, from its `Hello`.
    pub channels: u16,
    /// Its last `CvReport`.
    pub report: Option<CvReport>,
    /// Datagram counters of its link.
    pub datagrams: DatagramCounters,
}

/// The CV part of an MCU node in `/api/cluster` (`nodes[].cv`; `null` for Linux nodes). The
/// DAC fields are those of the MCU's last `CvReport` (empty or 0 before the first).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct McuSnapshot {
    /// CV channels the MCU offers.
    pub channels: u16,
    /// Current DAC code of every channel, channel 0 first.
    pub dac_codes: Vec<u16>,
    /// Cluster time at which each channel's current code was written, in nanoseconds.
    pub changed_at_ns: Vec<u64>,
    /// The MCU's cluster time when it made the report, in nanoseconds.
    pub reported_at_ns: Option<u64>,
    /// Bit `d` set: DAC `d` failed and its channels are at 0 V.
    pub dac_faults: u32,
    /// DAC writes issued since the MCU started (refreshes included).
    pub dac_writes: u32,
    /// Writes skipped because the DAC already held the code.
    pub dac_writes_skipped: u32,
    /// DAC writes or inits that failed.
    pub dac_write_errors: u32,
    /// Events the MCU applied after their `at`.
    pub late_events: u32,
    /// Gates the MCU dropped because a lease ran out.
    pub lease_expiries: u32,
    /// The MCU's clock offset estimate, in nanoseconds.
    pub clock_offset_ns: i64,
    /// Whether the MCU's clock servo is locked.
    pub clock_locked: bool,
    /// The MCU's counters of the datagrams it received from the coordinator.
    pub mcu_rx: RxCounters,
    /// The coordinator's counters of this link (sent, received, dropped by reason).
    pub datagrams: DatagramCounters,
}

impl DatagramCounters {
    /// The dropped counters by reason, as `/metrics` labels them.
    pub fn dropped_by_reason(&self) -> [(&'static str, u64); 5] {
        [
            ("malformed", self.malformed),
            ("version", self.version),
            ("duplicate", self.duplicates),
            ("replay", self.replays),
            ("unexpected", self.unexpected),
        ]
    }
}

/// `voicemesh_mcu_datagrams_dropped_total` lines (labels, value) for `/metrics`: one per MCU
/// node and reason.
pub(crate) fn dropped_metric(nodes: &[crate::NodeSnapshot]) -> Vec<(String, u64)> {
    // Prometheus label values escape backslash, double quote and newline.
    let esc = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    nodes
        .iter()
        .filter_map(|n| n.cv.as_ref().map(|cv| (esc(&n.id), cv.datagrams)))
        .flat_map(|(id, d)| {
            d.dropped_by_reason()
                .map(|(r, v)| (format!("{{node=\"{id}\",reason=\"{r}\"}}"), v))
        })
        .collect()
}

impl McuView {
    pub(crate) fn snapshot(&self) -> McuSnapshot {
        let mut s = McuSnapshot {
            channels: self.channels,
            datagrams: self.datagrams,
            ..McuSnapshot::default()
        };
        if let Some(r) = &self.report {
            s.dac_codes = r.codes.to_vec();
            s.changed_at_ns = r.changed_at.iter().map(|t| t.as_nanos()).collect();
            s.reported_at_ns = Some(r.now.as_nanos());
            s.dac_faults = r.dac_faults;
            s.dac_writes = r.writes;
            s.dac_writes_skipped = r.skipped_writes;
            s.dac_write_errors = r.write_errors;
            s.late_events = r.late_events;
            s.lease_expiries = r.lease_expiries;
            s.clock_offset_ns = r.clock_offset_ns;
            s.clock_locked = r.clock_locked;
            s.mcu_rx = r.rx;
        }
        s
    }
}

/// The session an MCU link holds in the shared state.
struct Registered {
    id: String,
    generation: u64,
    /// CV channels, from its `Hello`.
    channels: u16,
    /// The CV configuration generation whose assignments it last got.
    assigned: Option<u64>,
    /// Refreshes sent since the assignments were last sent.
    refreshes: u32,
}

/// Assignments are re-sent at every this many refreshes (once a second) even when the
/// configuration did not change, to heal a lost one.
const ASSIGN_EVERY: u32 = 10;

/// The MCU's full CV state, to (re-)send: its assignments (when the configuration changed,
/// and every [`ASSIGN_EVERY`] refreshes), the last value of every controller its outputs
/// follow, and a `VoiceOn` of every voice it holds that has started (the MCU takes an equal
/// `VoiceOn` as a refresh, not a retrigger), with the lease a renewal would give now.
fn full_state(g: &Inner, now: ClusterTime, r: &mut Registered, lease_ns: u64) -> Vec<Message> {
    let mut out = Vec::new();
    let gen_ = g.cv.generation();
    if r.assigned != Some(gen_) || r.refreshes >= ASSIGN_EVERY {
        out.extend(
            g.cv.assignments(&r.id, r.channels)
                .into_iter()
                .map(Message::CvAssign),
        );
        r.assigned = Some(gen_);
        r.refreshes = 0;
    } else {
        r.refreshes += 1;
    }
    out.extend(g.cv.refresh_controls(now, &r.id));
    let lease_until = now.add_nanos(g.alloc.config().lookahead_ns.saturating_add(lease_ns) as i64);
    // A voice whose start is still ahead has its VoiceOn in flight; re-sending it now (with
    // another lease) would queue a second start on the MCU.
    let started = |h: &crate::allocator::HeldVoice<'_>| h.node == r.id && h.started <= now;
    out.extend(g.alloc.held_voices().filter(started).map(|h| {
        Message::VoiceOn(VoiceOn {
            voice: h.voice,
            note: h.note,
            velocity: h.velocity,
            channel: h.channel,
            at: h.started,
            lease_until,
        })
    }));
    out
}

/// Keeps a link with the MCU at `addr` until `cancel`: one UDP socket bound in `bind` and
/// connected to `addr`, the [`McuLink`] core, and the MCU's entry in the shared state.
pub(crate) async fn run(
    shared: Arc<Shared>,
    addr: SocketAddr,
    bind: IpAddr,
    cancel: CancellationToken,
) {
    let socket = loop {
        let bound = async {
            let s = UdpSocket::bind(SocketAddr::new(bind, 0)).await?;
            s.connect(addr).await?;
            Ok::<_, std::io::Error>(s)
        };
        match bound.await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(%addr, "cannot open the MCU link socket: {e}");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let origin = Instant::now();
    let local = || u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let timing = McuTiming {
        heartbeat_ns: shared.heartbeat.as_nanos() as u64,
        offline_after_ns: shared.offline_after.as_nanos() as u64,
        refresh_ns: REFRESH_NS,
    };
    let mut link = McuLink::new(timing, welcome(&shared), rand::random(), local());
    let mut reg: Option<Registered> = None;
    let mut queue: Option<mpsc::Receiver<Outgoing>> = None;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut published = DatagramCounters::default();
    loop {
        flush(&shared, &socket, &mut link, &mut reg, &mut queue, addr).await;
        if link.counters() != published {
            published = link.counters();
            if let Some(r) = &reg
                && let Some(v) = shared.lock().mcus.get_mut(&r.id)
            {
                v.datagrams = published;
            }
        }
        let wake = origin + Duration::from_nanos(link.poll_timeout());
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = socket.recv(&mut buf) => match r {
                Ok(n) => {
                    let (now, cluster) = (local(), shared.now());
                    // A Hello is answered with the timeline in force now.
                    link.set_welcome(welcome(&shared));
                    if link.handle_datagram(now, cluster, &buf[..n]) == Received::Accepted
                        && let Some(r) = &reg
                        && let Some(n) = shared.lock().nodes.get_mut(&r.id)
                    {
                        n.last_seen = Some(Instant::now());
                    }
                }
                // ICMP port unreachable and the like while the MCU is away: keep probing.
                Err(e) => tracing::debug!(%addr, "MCU link receive error: {e}"),
            },
            Some(out) = next_outgoing(&mut queue) => {
                link.send(&out.msg);
                if let Some(t0) = out.osc_rx {
                    shared.lock().record_latency(Instant::now().saturating_duration_since(t0));
                }
            }
            _ = sleep_until(wake) => link.handle_timeout(local(), shared.now()),
        }
    }
    link.close("coordinator shutting down");
    while let Some(d) = link.poll_transmit() {
        let _ = socket.send(&d).await;
    }
    if let Some(r) = reg.take() {
        let mut g = shared.lock();
        g.end_session(shared.now(), &r.id, r.generation, None);
    }
}

async fn next_outgoing(queue: &mut Option<mpsc::Receiver<Outgoing>>) -> Option<Outgoing> {
    match queue {
        Some(q) => q.recv().await,
        None => std::future::pending().await,
    }
}

fn welcome(shared: &Shared) -> Welcome {
    Welcome {
        coordinator: Message::text(&shared.id),
        heartbeat_ms: u16::try_from(shared.heartbeat.as_millis()).unwrap_or(u16::MAX),
        lease_ms: u32::try_from(shared.lease.as_millis()).unwrap_or(u32::MAX),
        timeline: shared.lock().tempo.timeline,
    }
}

/// Sends what the core queued and acts on its events until both are drained.
async fn flush(
    shared: &Shared,
    socket: &UdpSocket,
    link: &mut McuLink,
    reg: &mut Option<Registered>,
    queue: &mut Option<mpsc::Receiver<Outgoing>>,
    addr: SocketAddr,
) {
    let lease_ns = shared.lease.as_nanos() as u64;
    loop {
        while let Some(d) = link.poll_transmit() {
            if let Err(e) = socket.send(&d).await {
                tracing::debug!(%addr, "MCU link send error: {e}");
            }
        }
        let Some(ev) = link.poll_event() else { return };
        let now = shared.now();
        match ev {
            McuEvent::Joined(hello) => {
                let id = hello.id.to_string();
                let (tx, rx) = mpsc::channel(SESSION_QUEUE);
                *queue = Some(rx);
                let mut g = shared.lock();
                let generation = g.join_node(&hello, addr, tx);
                g.mcus.insert(
                    id.clone(),
                    McuView {
                        channels: hello.cv,
                        datagrams: link.counters(),
                        ..McuView::default()
                    },
                );
                let mut r = Registered {
                    id: id.clone(),
                    generation,
                    channels: hello.cv,
                    assigned: None,
                    refreshes: 0,
                };
                let msgs = full_state(&g, now, &mut r, lease_ns);
                drop(g);
                for m in &msgs {
                    link.send(m);
                }
                tracing::info!(mcu = %id, %addr, voices = hello.voices, cv = hello.cv, "MCU joined");
                *reg = Some(r);
            }
            McuEvent::Lost(reason) => {
                *queue = None;
                if let Some(r) = reg.take() {
                    tracing::warn!(mcu = %r.id, %addr, "{reason}");
                    let mut g = shared.lock();
                    g.end_session(now, &r.id, r.generation, Some(reason.to_string()));
                }
            }
            McuEvent::RefreshDue => {
                let (Some(r), Some(q)) = (reg.as_mut(), queue.as_mut()) else {
                    continue;
                };
                // Under the lock nothing new is queued: send what is queued first, so the
                // refresh never overtakes an event decided before it (a VoiceOff before the
                // re-sent VoiceOn of a stolen voice's next note, say).
                let g = shared.lock();
                let mut msgs: Vec<Message> =
                    std::iter::from_fn(|| q.try_recv().ok().map(|o| o.msg)).collect();
                msgs.extend(full_state(&g, now, r, lease_ns));
                drop(g);
                for m in &msgs {
                    link.send(m);
                }
            }
            McuEvent::TimeSync { origin, receive } => {
                link.answer_time_sync(origin, receive, shared.now());
            }
            McuEvent::Message(m) => {
                let Some(r) = reg else { continue };
                let mut g = shared.lock();
                match m {
                    Message::Status(s) => {
                        if let Some(n) = g.nodes.get_mut(&r.id) {
                            n.status = Some(s);
                        }
                    }
                    Message::Error(e) => {
                        tracing::warn!(mcu = %r.id, code = ?e.code, text = %e.text, "MCU reported an error");
                        if let Some(n) = g.nodes.get_mut(&r.id) {
                            n.error = Some(format!("MCU reported: {}", e.text));
                        }
                    }
                    Message::CvReport(rep) => {
                        if let Some(v) = g.mcus.get_mut(&r.id) {
                            v.report = Some(rep);
                        }
                    }
                    other => tracing::debug!(mcu = %r.id, kind = other.kind(), "ignored message"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::IDLE_STATUS;
    use voicemesh_protocol::{CvSet, Status, Timeline};

    const MS: u64 = 1_000_000;

    fn welcome() -> Welcome {
        Welcome {
            coordinator: Message::text("c"),
            heartbeat_ms: 100,
            lease_ms: 1000,
            timeline: Timeline::from_milli_bpm(120_000, ClusterTime(0)),
        }
    }

    fn hello(role: Role) -> Message {
        Message::Hello(Hello {
            id: Message::text("mcu-1"),
            name: Message::text("mcu-1"),
            role,
            voices: 2,
            cv: 8,
            engines: heapless::Vec::new(),
            sample_rate: 0,
        })
    }

    /// The MCU's end of the wire, for the tests.
    struct FakeMcu {
        tx: wire::Sender,
        rx: wire::Receiver,
    }

    impl Default for FakeMcu {
        fn default() -> Self {
            FakeMcu {
                tx: wire::Sender::new(rand::random()),
                rx: wire::Receiver::default(),
            }
        }
    }

    impl FakeMcu {
        fn datagram(&mut self, m: &Message) -> Vec<u8> {
            self.tx.encode(m).expect("encodable")
        }
        fn read(&mut self, link: &mut McuLink) -> Vec<Message> {
            std::iter::from_fn(|| link.poll_transmit())
                .map(|d| self.rx.decode(&d).ok().expect("a valid datagram").0)
                .collect()
        }
    }

    fn events(link: &mut McuLink) -> Vec<McuEvent> {
        std::iter::from_fn(|| link.poll_event()).collect()
    }

    fn joined(now: u64) -> (McuLink, FakeMcu) {
        let mut link = McuLink::new(McuTiming::default(), welcome(), 1, now);
        let mut mcu = FakeMcu::default();
        link.handle_timeout(now, ClusterTime(7));
        assert_eq!(
            mcu.read(&mut link),
            vec![Message::Heartbeat(Heartbeat {
                seq: 0,
                now: ClusterTime(7)
            })]
        );
        let d = mcu.datagram(&hello(Role::Mcu));
        assert_eq!(
            link.handle_datagram(now, ClusterTime(0), &d),
            Received::Accepted
        );
        assert_eq!(mcu.read(&mut link), vec![Message::Welcome(welcome())]);
        assert!(matches!(&events(&mut link)[..], [McuEvent::Joined(h)] if h.cv == 8));
        (link, mcu)
    }

    #[test]
    fn probes_every_heartbeat_until_hello_then_welcome_and_heartbeats() {
        let mut link = McuLink::new(McuTiming::default(), welcome(), 1, 0);
        let mut mcu = FakeMcu::default();
        let mut probes = Vec::new();
        let mut now = 0;
        while now < 500 * MS {
            link.handle_timeout(now, ClusterTime(now));
            if !mcu.read(&mut link).is_empty() {
                probes.push(now / MS);
            }
            now = link.poll_timeout();
        }
        assert_eq!(probes, vec![0, 100, 200, 300, 400]);
        // Nothing but Hello starts a session; messages before it are dropped and counted.
        let d = mcu.datagram(&Message::Status(IDLE_STATUS));
        assert_eq!(
            link.handle_datagram(now, ClusterTime(0), &d),
            Received::Dropped
        );
        assert_eq!(link.counters().unexpected, 1);
        assert!(!link.send(&Message::CvSet(CvSet {
            channel: 0,
            microvolts: 0,
            at: ClusterTime(0)
        })));
        assert_eq!(link.counters().unsent, 1);

        let (mut link, mut mcu) = joined(0);
        let mut beats = Vec::new();
        let mut refreshes = 0;
        let mut now = 0;
        while now < 1000 * MS {
            // The MCU answers every heartbeat.
            for m in mcu.read(&mut link) {
                if let Message::Heartbeat(h) = m {
                    beats.push(h.seq);
                    let d = mcu.datagram(&m);
                    link.handle_datagram(now, ClusterTime(0), &d);
                }
            }
            refreshes += events(&mut link)
                .iter()
                .filter(|e| **e == McuEvent::RefreshDue)
                .count();
            now = link.poll_timeout();
            link.handle_timeout(now, ClusterTime(now));
        }
        assert_eq!(beats, (1..=9).collect::<Vec<u32>>());
        assert_eq!(refreshes, 9);
        assert!(link.is_joined());
    }

    #[test]
    fn silent_mcu_is_lost_after_offline_after_and_probed_again() {
        let (mut link, mut mcu) = joined(0);
        let now = loop {
            let now = link.poll_timeout();
            link.handle_timeout(now, ClusterTime(now));
            if events(&mut link).contains(&McuEvent::Lost(LostReason::Silent)) {
                break now;
            }
        };
        assert_eq!(now, 250 * MS);
        // The probe goes out at once, and the restarted MCU (numbering from 1 again) rejoins.
        let out = mcu.read(&mut link);
        assert!(
            matches!(out.last(), Some(Message::Heartbeat(h)) if h.seq == 0),
            "{out:?}"
        );
        let mut restarted = FakeMcu::default();
        let d = restarted.datagram(&hello(Role::Mcu));
        assert_eq!(
            link.handle_datagram(now, ClusterTime(0), &d),
            Received::Accepted
        );
        assert!(matches!(&events(&mut link)[..], [McuEvent::Joined(_)]));
    }

    #[test]
    fn bad_replayed_and_foreign_datagrams_are_dropped_and_counted() {
        let (mut link, mut mcu) = joined(0);
        let hb = mcu.datagram(&Message::Heartbeat(Heartbeat {
            seq: 1,
            now: ClusterTime(1),
        }));
        assert_eq!(
            link.handle_datagram(MS, ClusterTime(0), &hb),
            Received::Accepted
        );
        // The same datagram again: a duplicate. One older than the window: a replay.
        assert_eq!(
            link.handle_datagram(2 * MS, ClusterTime(0), &hb),
            Received::Dropped
        );
        let beats: Vec<Vec<u8>> = (0..70)
            .map(|i| {
                mcu.datagram(&Message::Heartbeat(Heartbeat {
                    seq: 2 + i,
                    now: ClusterTime(1),
                }))
            })
            .collect();
        for b in &beats[1..] {
            assert_eq!(
                link.handle_datagram(2 * MS, ClusterTime(0), b),
                Received::Accepted
            );
        }
        assert_eq!(
            link.handle_datagram(2 * MS, ClusterTime(0), &beats[0]),
            Received::Dropped
        );
        // Garbage, a truncated datagram, an empty one.
        for bad in [&b"\xff\x00garbage"[..], &hb[..hb.len() - 1], &[]] {
            assert_eq!(
                link.handle_datagram(3 * MS, ClusterTime(0), bad),
                Received::Dropped
            );
        }
        // Another major version (the frame's first version byte, after its length).
        let mut other = mcu.datagram(&Message::Heartbeat(Heartbeat {
            seq: 2,
            now: ClusterTime(2),
        }));
        other[voicemesh_protocol::datagram::DATAGRAM_HEADER_LEN + 4] =
            voicemesh_protocol::PROTOCOL_VERSION + 1;
        assert_eq!(
            link.handle_datagram(3 * MS, ClusterTime(0), &other),
            Received::Dropped
        );
        // A Linux node's Hello is refused with an Error.
        let d = mcu.datagram(&hello(Role::Node));
        assert_eq!(
            link.handle_datagram(3 * MS, ClusterTime(0), &d),
            Received::Dropped
        );
        assert!(
            matches!(&mcu.read(&mut link)[..], [Message::Error(e)] if e.code == ErrorCode::Refused)
        );
        let c = link.counters();
        assert_eq!(
            (
                c.received,
                c.duplicates,
                c.replays,
                c.malformed,
                c.version,
                c.unexpected
            ),
            (71, 1, 1, 3, 1, 1),
            "{c:?}"
        );
        assert_eq!(c.dropped(), 7);
        // Gaps: the heartbeat skipped while the window moved on, and the number the other
        // version's datagram used (it never reached the window).
        assert_eq!(c.gaps, 2);
        // None of it ended the session, and the heartbeat deadline still counts from the last
        // accepted datagram (2 ms), not from the dropped ones.
        assert!(link.is_joined());
        assert!(events(&mut link).is_empty());
        link.handle_timeout(251 * MS, ClusterTime(0));
        assert!(!events(&mut link).contains(&McuEvent::Lost(LostReason::Silent)));
        link.handle_timeout(252 * MS, ClusterTime(0));
        assert!(events(&mut link).contains(&McuEvent::Lost(LostReason::Silent)));
    }

    #[test]
    fn restart_bye_and_messages_in_session() {
        let (mut link, mut mcu) = joined(0);
        let st = Message::Status(Status {
            active_voices: 1,
            clock_locked: true,
            ..IDLE_STATUS
        });
        let d = mcu.datagram(&st);
        link.handle_datagram(MS, ClusterTime(0), &d);
        assert_eq!(events(&mut link), vec![McuEvent::Message(st)]);
        // A second Hello under the same MCU session (a probe crossed the Welcome): welcomed
        // again, nothing lost.
        let d = mcu.datagram(&hello(Role::Mcu));
        link.handle_datagram(2 * MS, ClusterTime(0), &d);
        assert!(events(&mut link).is_empty());
        assert!(matches!(&mcu.read(&mut link)[..], [Message::Welcome(_)]));
        // A Hello under a new session id: the MCU restarted.
        let mut mcu = FakeMcu::default();
        let d = mcu.datagram(&hello(Role::Mcu));
        link.handle_datagram(2 * MS, ClusterTime(0), &d);
        assert!(matches!(
            &events(&mut link)[..],
            [McuEvent::Lost(LostReason::Restarted), McuEvent::Joined(_)]
        ));
        assert!(matches!(&mcu.read(&mut link)[..], [Message::Welcome(_)]));
        let d = mcu.datagram(&Message::Bye(voicemesh_protocol::Bye {
            reason: Message::text("power off"),
        }));
        link.handle_datagram(3 * MS, ClusterTime(0), &d);
        assert_eq!(
            events(&mut link),
            vec![McuEvent::Lost(LostReason::Bye("power off".into()))]
        );
        assert!(!link.is_joined());
    }
}
