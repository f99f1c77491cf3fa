//! The AppleMIDI session core: invitations, clock sync, receiver feedback and RTP-MIDI
//! reception for any number of remote sessions, sans IO.
//!
//! Call protocol: feed every datagram to [`SessionCore::handle_datagram`] with the port it came
//! in on, call [`SessionCore::handle_timeout`] when [`SessionCore::poll_timeout`] says, and after
//! each call drain [`SessionCore::poll_transmit`] (datagrams to send, with the local port to send
//! them from) and [`SessionCore::poll_event`] (sessions up and down, MIDI with its time). Time
//! is cluster time in nanoseconds, passed in; the AppleMIDI 10 kHz clock is `now / 100 µs`.
//!
//! Sessions are keyed on the initiator's token and the remote address, not on the SSRC:
//! pymidi answers with different SSRCs on its two ports, and the rtpmidi crate uses different
//! tokens for its two invitations (then the SSRC, from the same host, finds the session).
//!
//! Timestamps: a peer's RTP timestamps are mapped to cluster time through the offset its CK
//! exchanges measured (`peer clock − our clock`). When there is none yet, or the mapping puts
//! a packet more than [`LATE_TICKS`] in the past or more than [`MAX_FUTURE_TICKS`] ahead, the
//! mapping is re-anchored so that the packet's timestamp is "now" (counted). Delta times
//! inside a packet are always honoured exactly.

use std::collections::VecDeque;
use std::net::SocketAddr;

use super::midi::{CommandDecoder, MidiMessage};
use super::wire::{self, Control, Exchange, RtpMidi, Sync, WireError};

/// Nanoseconds per AppleMIDI clock tick (10 kHz).
pub const TICK_NS: u64 = 100_000;
/// Invitations are re-sent this often until answered.
pub const INVITE_EVERY_NS: u64 = 1_500_000_000;
/// Invitations sent before an attempt is given up.
pub const INVITE_TRIES: u32 = 12;
/// A session kept by configuration is invited again this long after it failed or ended.
pub const RETRY_AFTER_NS: u64 = 5_000_000_000;
/// Clock-sync exchanges in the initial burst, and their spacing.
pub const CK_BURST: u32 = 6;
/// Spacing of the initial CK burst.
pub const CK_BURST_EVERY_NS: u64 = 1_500_000_000;
/// CK cadence after the burst.
pub const CK_EVERY_NS: u64 = 10_000_000_000;
/// Two CK exchanges we start are at least this far apart (no CK storms).
pub const CK_MIN_GAP_NS: u64 = 1_000_000_000;
/// CK0s answered per peer per second at most.
pub const CK_ANSWERS_PER_S: u32 = 20;
/// Receiver feedback (RS) spacing.
pub const RS_EVERY_NS: u64 = 1_000_000_000;
/// A listener-side session whose data-port invitation never comes is dropped after this.
pub const HALF_OPEN_NS: u64 = 10_000_000_000;
/// A packet mapped further than this into the past re-anchors the timestamp mapping (2 ms).
pub const LATE_TICKS: i64 = 20;
/// A packet mapped further than this into the future re-anchors the mapping (1 s).
pub const MAX_FUTURE_TICKS: i64 = 10_000;
/// An estimate from a CK exchange whose round trip exceeds this is ignored (1 s).
pub const MAX_RTT_TICKS: u64 = 10_000;

/// Which of the two local ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Port {
    /// The control port (N).
    Control,
    /// The data (MIDI) port (N + 1).
    Data,
}

/// A datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The local port to send it from.
    pub from: Port,
    /// Destination.
    pub to: SocketAddr,
    /// Bytes.
    pub bytes: Vec<u8>,
}

/// Which side opened a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The remote invited us.
    Listener,
    /// We invited the remote.
    Initiator,
}

/// Why a session ended or an invitation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The remote said BY.
    Bye,
    /// Nothing heard for the silence timeout.
    Silent,
    /// The remote's port is closed (ICMP port unreachable).
    Unreachable,
    /// The remote answered NO.
    Rejected,
    /// The invitation was never answered.
    NoAnswer,
    /// The remote invited again with a new token (it restarted).
    Replaced,
    /// We closed it.
    Closed,
}

/// Identifies a session for as long as the core lives.
pub type PeerId = u64;

/// What the core reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Both ports are connected.
    Connected {
        /// The session.
        peer: PeerId,
    },
    /// A MIDI message, to be played at `at_ns` (cluster time).
    Midi {
        /// The session it came from.
        peer: PeerId,
        /// The sender's time for it, mapped to cluster time.
        at_ns: u64,
        /// The message.
        msg: MidiMessage,
    },
    /// A connected session ended: whatever it holds must be released.
    Disconnected {
        /// The session.
        peer: PeerId,
        /// Why.
        reason: EndReason,
    },
}

/// Configuration of the core.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// Our session name (sent in IN and OK).
    pub name: String,
    /// Seed of the SSRC, tokens and sequence numbers.
    pub seed: u64,
    /// Most sessions at once; more invitations are answered NO.
    pub max_peers: usize,
    /// A connected session silent this long is dropped (the notes say listeners drop
    /// initiators after 60 s without CK).
    pub silence_timeout_ns: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            name: "VoiceMesh".into(),
            seed: 1,
            max_peers: 16,
            silence_timeout_ns: 60_000_000_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Initiator: IN sent on the control port.
    InvitingControl,
    /// Initiator: IN sent on the data port.
    InvitingData,
    /// Listener: control IN accepted, waiting for the data IN.
    HalfOpen,
    /// Both ports up.
    Connected,
    /// Kept by configuration, waiting to invite again.
    Waiting,
}

/// Per-session counters and clock state, as the snapshot shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerStats {
    /// RTP packets accepted.
    pub packets: u64,
    /// MIDI messages decoded.
    pub messages: u64,
    /// Packets missing in the sequence numbers.
    pub lost: u64,
    /// Duplicate packets dropped.
    pub duplicates: u64,
    /// Packets whose command list was malformed (the messages before the fault were kept).
    pub malformed: u64,
    /// Packets that carried a recovery journal (walked and skipped).
    pub journals: u64,
    /// Clock-sync exchanges completed (either side's).
    pub syncs: u64,
    /// CK0s not answered because they came faster than the answer limit.
    pub ck_limited: u64,
    /// Times the timestamp mapping was re-anchored to the arrival time.
    pub reanchored: u64,
}

#[derive(Debug)]
struct Peer {
    id: PeerId,
    role: Role,
    state: State,
    keep: bool,
    token: u32,
    ctrl: SocketAddr,
    data: SocketAddr,
    ssrc: Option<u32>,
    data_ssrc: Option<u32>,
    name: Option<String>,
    /// Timer: next invitation (inviting), next retry (waiting), half-open limit.
    next_at: u64,
    tries: u32,
    last_heard: u64,
    connected_at: u64,
    last_error: Option<EndReason>,
    // Clock sync.
    offset: Option<i64>,
    rtt: Option<u64>,
    anchor: Option<u32>,
    ck_started: Option<u64>,
    next_ck: u64,
    ck_window: (u64, u32),
    // Reception.
    highest_seq: Option<u16>,
    next_rs: u64,
    decoder: CommandDecoder,
    // Sending.
    send_seq: u16,
    stats: PeerStats,
}

/// One session, as the snapshot shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PeerSnapshot {
    /// Session id (stable while the coordinator runs).
    pub id: PeerId,
    /// Who invited whom.
    pub role: Role,
    /// `inviting`, `half_open`, `connected` or `waiting`.
    pub state: String,
    /// Remote session name, when it sent one.
    pub name: Option<String>,
    /// Remote control port address.
    pub control: String,
    /// Remote data port address.
    pub data: String,
    /// Remote SSRC (control port).
    pub ssrc: Option<u32>,
    /// Whether the session is re-invited after it ends (configured by address or name).
    pub keep: bool,
    /// Last measured offset `remote clock − our clock`, in 100 µs ticks.
    pub clock_offset_ticks: Option<i64>,
    /// Last measured round trip, in 100 µs ticks.
    pub rtt_ticks: Option<u64>,
    /// Why the last attempt or session ended, if one did.
    pub last_error: Option<EndReason>,
    /// Counters.
    pub stats: PeerStats,
}

/// Datagrams that belong to no session or could not be parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CoreStats {
    /// Datagrams received on both ports.
    pub datagrams: u64,
    /// Datagrams that did not parse, by reason.
    pub malformed: std::collections::BTreeMap<String, u64>,
    /// Parsed datagrams from no known session (dropped).
    pub unknown_sender: u64,
    /// Invitations refused because of `max_peers`.
    pub refused: u64,
}

/// The AppleMIDI endpoint: one control/data port pair, any number of sessions.
#[derive(Debug)]
pub struct SessionCore {
    cfg: CoreConfig,
    ssrc: u32,
    rng: u64,
    next_id: PeerId,
    peers: Vec<Peer>,
    out: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: CoreStats,
}

fn ticks(now: u64) -> u64 {
    now / TICK_NS
}

fn same_host(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip() == b.ip()
}

impl SessionCore {
    /// A core with no sessions.
    pub fn new(cfg: CoreConfig) -> Self {
        let mut core = SessionCore {
            rng: cfg.seed | 1,
            cfg,
            ssrc: 0,
            next_id: 1,
            peers: Vec::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            stats: CoreStats::default(),
        };
        core.ssrc = core.random();
        core
    }

    /// Our SSRC.
    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    fn random(&mut self) -> u32 {
        // xorshift64*: tokens and SSRCs only need to differ, not to be secret.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }

    fn new_peer(&mut self, role: Role, token: u32, ctrl: SocketAddr, now: u64) -> Peer {
        let id = self.next_id;
        self.next_id += 1;
        let send_seq = self.random() as u16;
        Peer {
            id,
            role,
            state: State::InvitingControl,
            keep: false,
            token,
            ctrl,
            data: SocketAddr::new(ctrl.ip(), ctrl.port().wrapping_add(1)),
            ssrc: None,
            data_ssrc: None,
            name: None,
            next_at: now,
            tries: 0,
            last_heard: now,
            connected_at: now,
            last_error: None,
            offset: None,
            rtt: None,
            anchor: None,
            ck_started: None,
            next_ck: now,
            ck_window: (0, 0),
            highest_seq: None,
            next_rs: now,
            decoder: CommandDecoder::new(),
            send_seq,
            stats: PeerStats::default(),
        }
    }

    /// Invites the session whose control port is `ctrl`. With `keep`, it is invited again
    /// [`RETRY_AFTER_NS`] after an attempt fails or the session ends, until
    /// [`remove`](Self::remove). Returns the session id (an existing one if `ctrl` is already
    /// invited).
    pub fn invite(&mut self, now: u64, ctrl: SocketAddr, keep: bool) -> PeerId {
        if let Some(p) = self
            .peers
            .iter_mut()
            .find(|p| p.role == Role::Initiator && p.ctrl == ctrl)
        {
            p.keep |= keep;
            return p.id;
        }
        let token = self.random();
        let mut p = self.new_peer(Role::Initiator, token, ctrl, now);
        p.keep = keep;
        let id = p.id;
        self.peers.push(p);
        self.handle_timeout(now);
        id
    }

    /// Ends a session (BY to the remote when connected) and forgets it.
    pub fn remove(&mut self, now: u64, id: PeerId) -> bool {
        let Some(i) = self.peers.iter().position(|p| p.id == id) else {
            return false;
        };
        self.end(i, now, EndReason::Closed, true);
        // `end` keeps sessions kept by configuration; this one must go.
        if let Some(i) = self.peers.iter().position(|p| p.id == id) {
            self.peers.remove(i);
        }
        true
    }

    /// Ends every session with BY (shutdown).
    pub fn close_all(&mut self, now: u64) {
        while let Some(p) = self.peers.first() {
            let id = p.id;
            self.remove(now, id);
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Counters of datagrams outside any session.
    pub fn stats(&self) -> &CoreStats {
        &self.stats
    }

    /// Every session.
    pub fn peers(&self) -> Vec<PeerSnapshot> {
        self.peers
            .iter()
            .map(|p| PeerSnapshot {
                id: p.id,
                role: p.role,
                state: match p.state {
                    State::InvitingControl | State::InvitingData => "inviting",
                    State::HalfOpen => "half_open",
                    State::Connected => "connected",
                    State::Waiting => "waiting",
                }
                .into(),
                name: p.name.clone(),
                control: p.ctrl.to_string(),
                data: p.data.to_string(),
                ssrc: p.ssrc,
                keep: p.keep,
                clock_offset_ticks: p.offset,
                rtt_ticks: p.rtt,
                last_error: p.last_error,
                stats: p.stats.clone(),
            })
            .collect()
    }

    /// Whether session `id` is connected.
    pub fn is_connected(&self, id: PeerId) -> bool {
        self.peers
            .iter()
            .any(|p| p.id == id && p.state == State::Connected)
    }

    fn send(&mut self, from: Port, to: SocketAddr, c: &Control) {
        self.out.push_back(Transmit {
            from,
            to,
            bytes: c.to_vec(),
        });
    }

    fn exchange(&self, token: u32, with_name: bool) -> Exchange {
        Exchange {
            version: wire::PROTOCOL_VERSION,
            token,
            ssrc: self.ssrc,
            name: with_name.then(|| self.cfg.name.clone()),
        }
    }

    /// Ends session `i`: BY (if `bye`), a `Disconnected` event if it was connected, then
    /// either forgets it or, when kept, waits to invite again.
    fn end(&mut self, i: usize, now: u64, reason: EndReason, bye: bool) {
        let p = &self.peers[i];
        let was_connected = p.state == State::Connected;
        if bye && matches!(p.state, State::Connected | State::HalfOpen) {
            let by = Control::End(self.exchange(p.token, false));
            let (ctrl, id) = (p.ctrl, p.id);
            self.send(Port::Control, ctrl, &by);
            let _ = id;
        }
        let id = self.peers[i].id;
        if was_connected {
            self.events
                .push_back(Event::Disconnected { peer: id, reason });
        }
        if self.peers[i].keep && self.peers[i].role == Role::Initiator {
            let token = self.random();
            let p = &mut self.peers[i];
            p.state = State::Waiting;
            p.last_error = Some(reason);
            p.next_at = now + RETRY_AFTER_NS;
            p.token = token;
            p.tries = 0;
            p.ssrc = None;
            p.data_ssrc = None;
            p.offset = None;
            p.anchor = None;
            p.highest_seq = None;
            p.decoder = CommandDecoder::new();
        } else {
            self.peers.remove(i);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.peers
            .iter()
            .map(|p| match p.state {
                State::InvitingControl | State::InvitingData | State::Waiting | State::HalfOpen => {
                    p.next_at
                }
                State::Connected => {
                    let mut t = p.last_heard.saturating_add(self.cfg.silence_timeout_ns);
                    if p.role == Role::Initiator {
                        t = t.min(p.next_ck);
                    }
                    if p.highest_seq.is_some() {
                        t = t.min(p.next_rs);
                    }
                    t
                }
            })
            .min()
    }

    /// Runs the timers: invitation retries, clock sync, receiver feedback, silence.
    pub fn handle_timeout(&mut self, now: u64) {
        let mut i = 0;
        while i < self.peers.len() {
            let before = self.peers.len();
            self.peer_timeout(i, now);
            if self.peers.len() == before {
                i += 1;
            }
        }
    }

    fn peer_timeout(&mut self, i: usize, now: u64) {
        let p = &self.peers[i];
        match p.state {
            State::Waiting if now >= p.next_at => {
                let p = &mut self.peers[i];
                p.state = State::InvitingControl;
                p.next_at = now;
                self.peer_timeout(i, now);
            }
            State::InvitingControl | State::InvitingData if now >= p.next_at => {
                if p.tries >= INVITE_TRIES {
                    self.fail(i, now, EndReason::NoAnswer);
                    return;
                }
                let (from, to) = if p.state == State::InvitingControl {
                    (Port::Control, p.ctrl)
                } else {
                    (Port::Data, p.data)
                };
                let inv = Control::Invitation(self.exchange(p.token, true));
                self.send(from, to, &inv);
                let p = &mut self.peers[i];
                p.tries += 1;
                p.next_at = now + INVITE_EVERY_NS;
            }
            State::HalfOpen if now >= p.next_at => {
                self.peers.remove(i);
            }
            State::Connected => {
                if now.saturating_sub(p.last_heard) >= self.cfg.silence_timeout_ns {
                    self.end(i, now, EndReason::Silent, true);
                    return;
                }
                if p.role == Role::Initiator && now >= p.next_ck {
                    self.start_ck(i, now);
                }
                let p = &self.peers[i];
                if let Some(seq) = p.highest_seq
                    && now >= p.next_rs
                {
                    // Receiver feedback, once a second for as long as the session had data:
                    // it also probes the remote, whose closed port answers with ICMP.
                    let rs = Control::Feedback {
                        ssrc: self.ssrc,
                        seq,
                    };
                    let to = p.ctrl;
                    self.send(Port::Control, to, &rs);
                    self.peers[i].next_rs = now + RS_EVERY_NS;
                }
            }
            _ => {}
        }
    }

    fn fail(&mut self, i: usize, now: u64, reason: EndReason) {
        let p = &mut self.peers[i];
        p.last_error = Some(reason);
        if p.keep {
            p.state = State::Waiting;
            p.next_at = now + RETRY_AFTER_NS;
            p.tries = 0;
        } else {
            self.peers.remove(i);
        }
    }

    fn start_ck(&mut self, i: usize, now: u64) {
        let p = &self.peers[i];
        let burst = p.stats.syncs < u64::from(CK_BURST);
        let spacing = if burst {
            CK_BURST_EVERY_NS
        } else {
            CK_EVERY_NS
        };
        if p.ck_started.is_some_and(|t| now < t + CK_MIN_GAP_NS) {
            self.peers[i].next_ck = p.ck_started.unwrap_or(now) + CK_MIN_GAP_NS;
            return;
        }
        let ck = Control::Sync(Sync {
            ssrc: self.ssrc,
            count: 0,
            ts: [ticks(now), 0, 0],
        });
        let to = p.data;
        self.send(Port::Data, to, &ck);
        let p = &mut self.peers[i];
        p.ck_started = Some(now);
        p.next_ck = now + spacing;
    }

    /// The remote at `addr` refused a datagram (ICMP port unreachable): a connected session
    /// there is ended (its notes released). Invitations keep trying.
    pub fn handle_unreachable(&mut self, now: u64, addr: SocketAddr) {
        if let Some(i) = self.peers.iter().position(|p| {
            matches!(p.state, State::Connected | State::HalfOpen)
                && (p.ctrl == addr || p.data == addr)
        }) {
            self.end(i, now, EndReason::Unreachable, false);
        }
    }

    /// Handles one datagram received on local port `port` from `from`.
    pub fn handle_datagram(&mut self, now: u64, port: Port, from: SocketAddr, bytes: &[u8]) {
        self.stats.datagrams += 1;
        if wire::is_control(bytes) {
            match Control::parse(bytes) {
                Ok(c) => self.control(now, port, from, c),
                Err(e) => self.malformed(e),
            }
        } else if port == Port::Data {
            match RtpMidi::parse(bytes) {
                Ok(p) => self.rtp(now, from, &p),
                Err(e) => self.malformed(e),
            }
        } else {
            self.malformed(WireError::UnknownCommand);
        }
    }

    fn malformed(&mut self, e: WireError) {
        *self.stats.malformed.entry(e.as_str().into()).or_insert(0) += 1;
    }

    fn control(&mut self, now: u64, port: Port, from: SocketAddr, c: Control) {
        match c {
            Control::Invitation(e) => self.invitation(now, port, from, e),
            Control::Accepted(e) => self.accepted(now, port, from, e),
            Control::Rejected(e) => {
                match self.peers.iter().position(|p| {
                    p.role == Role::Initiator
                        && p.token == e.token
                        && same_host(p.ctrl, from)
                        && matches!(p.state, State::InvitingControl | State::InvitingData)
                }) {
                    Some(i) => self.fail(i, now, EndReason::Rejected),
                    None => self.stats.unknown_sender += 1,
                }
            }
            Control::End(e) => {
                // The name in BY is ignored (node sends ours back).
                match self.peers.iter().position(|p| {
                    same_host(p.ctrl, from)
                        && p.state != State::Waiting
                        && (p.token == e.token
                            || p.ssrc == Some(e.ssrc)
                            || p.data_ssrc == Some(e.ssrc))
                }) {
                    Some(i) => self.end(i, now, EndReason::Bye, false),
                    None => self.stats.unknown_sender += 1,
                }
            }
            Control::Sync(s) => self.sync(now, port, from, s),
            Control::Feedback { ssrc, .. } => {
                if let Some(p) = self.find_connected(from, ssrc) {
                    p.last_heard = now;
                }
            }
            Control::Limit => {}
        }
    }

    fn find_connected(&mut self, from: SocketAddr, ssrc: u32) -> Option<&mut Peer> {
        let i = self
            .peers
            .iter()
            .position(|p| {
                p.state == State::Connected
                    && same_host(p.ctrl, from)
                    && (p.ssrc == Some(ssrc) || p.data_ssrc == Some(ssrc))
            })
            .or_else(|| {
                self.peers
                    .iter()
                    .position(|p| p.state == State::Connected && (p.data == from || p.ctrl == from))
            })?;
        Some(&mut self.peers[i])
    }

    fn invitation(&mut self, now: u64, port: Port, from: SocketAddr, e: Exchange) {
        match port {
            Port::Control => {
                if let Some(i) = self
                    .peers
                    .iter()
                    .position(|p| p.role == Role::Listener && p.ctrl == from)
                {
                    if self.peers[i].token == e.token {
                        // A repeated IN: answer again.
                        let ok = Control::Accepted(self.exchange(e.token, true));
                        self.send(Port::Control, from, &ok);
                        return;
                    }
                    // The remote restarted: its old session is over.
                    self.end(i, now, EndReason::Replaced, false);
                }
                if self.peers.len() >= self.cfg.max_peers {
                    self.stats.refused += 1;
                    let no = Control::Rejected(self.exchange(e.token, false));
                    self.send(Port::Control, from, &no);
                    return;
                }
                let mut p = self.new_peer(Role::Listener, e.token, from, now);
                p.state = State::HalfOpen;
                p.ssrc = Some(e.ssrc);
                p.name = e.name;
                p.next_at = now + HALF_OPEN_NS;
                self.peers.push(p);
                let ok = Control::Accepted(self.exchange(e.token, true));
                self.send(Port::Control, from, &ok);
            }
            Port::Data => {
                let found = self
                    .peers
                    .iter()
                    .position(|p| {
                        p.role == Role::Listener
                            && p.token == e.token
                            && same_host(p.ctrl, from)
                            && matches!(p.state, State::HalfOpen | State::Connected)
                    })
                    .or_else(|| {
                        // rtpmidi crate quirk: a new token on the data port, same SSRC.
                        self.peers.iter().position(|p| {
                            p.role == Role::Listener
                                && p.ssrc == Some(e.ssrc)
                                && same_host(p.ctrl, from)
                                && p.state == State::HalfOpen
                        })
                    });
                let Some(i) = found else {
                    self.stats.unknown_sender += 1;
                    let no = Control::Rejected(self.exchange(e.token, false));
                    self.send(Port::Data, from, &no);
                    return;
                };
                let p = &mut self.peers[i];
                p.data = from;
                p.data_ssrc = Some(e.ssrc);
                p.last_heard = now;
                let newly = p.state == State::HalfOpen;
                if newly {
                    p.state = State::Connected;
                    p.connected_at = now;
                }
                let id = p.id;
                let ok = Control::Accepted(self.exchange(e.token, true));
                self.send(Port::Data, from, &ok);
                if newly {
                    self.events.push_back(Event::Connected { peer: id });
                }
            }
        }
    }

    fn accepted(&mut self, now: u64, port: Port, from: SocketAddr, e: Exchange) {
        let Some(i) = self.peers.iter().position(|p| {
            p.role == Role::Initiator
                && p.token == e.token
                && same_host(p.ctrl, from)
                && matches!(
                    (port, p.state),
                    (Port::Control, State::InvitingControl) | (Port::Data, State::InvitingData)
                )
        }) else {
            // Late duplicates of an OK are harmless.
            return;
        };
        match port {
            Port::Control => {
                let p = &mut self.peers[i];
                p.ssrc = Some(e.ssrc);
                p.name = e.name;
                p.state = State::InvitingData;
                p.tries = 0;
                p.next_at = now;
                p.last_heard = now;
                self.peer_timeout(i, now);
            }
            Port::Data => {
                let p = &mut self.peers[i];
                // pymidi answers the data IN with another SSRC: learn it.
                p.data_ssrc = Some(e.ssrc);
                p.data = from;
                p.state = State::Connected;
                p.connected_at = now;
                p.last_heard = now;
                p.last_error = None;
                p.next_ck = now;
                p.stats.syncs = 0;
                let id = p.id;
                self.events.push_back(Event::Connected { peer: id });
                // Clock sync starts at once: listeners drop initiators that stay silent.
                self.start_ck(i, now);
            }
        }
    }

    fn sync(&mut self, now: u64, port: Port, from: SocketAddr, s: Sync) {
        let ssrc = self.ssrc;
        let Some(p) = self.find_connected(from, s.ssrc) else {
            self.stats.unknown_sender += 1;
            return;
        };
        p.last_heard = now;
        let t = ticks(now);
        let reply = match s.count {
            0 => {
                if now >= p.ck_window.0 + 1_000_000_000 {
                    p.ck_window = (now, 0);
                }
                p.ck_window.1 += 1;
                if p.ck_window.1 > CK_ANSWERS_PER_S {
                    p.stats.ck_limited += 1;
                    None
                } else {
                    Some(Sync {
                        ssrc,
                        count: 1,
                        ts: [s.ts[0], t, 0],
                    })
                }
            }
            1 => {
                // Our exchange (or, from the rtpmidi crate, one it opened with count 1).
                let rtt = t.wrapping_sub(s.ts[0]);
                if rtt <= MAX_RTT_TICKS {
                    let mid = s.ts[0].wrapping_add(rtt / 2);
                    p.set_offset(s.ts[1].wrapping_sub(mid) as i64, rtt);
                }
                Some(Sync {
                    ssrc,
                    count: 2,
                    ts: [s.ts[0], s.ts[1], t],
                })
            }
            _ => {
                // The remote's exchange, finished: ts2 is ours. Never start a CK in reply
                // (node-rtpmidi does, and two of them ping-pong forever).
                let rtt = s.ts[2].wrapping_sub(s.ts[0]);
                if rtt <= MAX_RTT_TICKS && t.abs_diff(s.ts[1]) <= MAX_RTT_TICKS {
                    let mid = s.ts[0].wrapping_add(rtt / 2);
                    p.set_offset(mid.wrapping_sub(s.ts[1]) as i64, rtt);
                }
                None
            }
        };
        if let Some(r) = reply {
            self.send(port, from, &Control::Sync(r));
        }
    }

    fn rtp(&mut self, now: u64, from: SocketAddr, pkt: &RtpMidi<'_>) {
        let Some(i) = self.peers.iter().position(|p| {
            p.state == State::Connected
                && same_host(p.ctrl, from)
                && (p.data_ssrc == Some(pkt.ssrc) || p.ssrc == Some(pkt.ssrc))
        }) else {
            self.stats.unknown_sender += 1;
            return;
        };
        let p = &mut self.peers[i];
        p.last_heard = now;
        if let Some(h) = p.highest_seq {
            let d = pkt.seq.wrapping_sub(h) as i16;
            if d == 0 {
                p.stats.duplicates += 1;
                return;
            }
            if d > 0 {
                p.stats.lost += (d - 1) as u64;
                p.highest_seq = Some(pkt.seq);
            }
        } else {
            p.highest_seq = Some(pkt.seq);
            p.next_rs = now + RS_EVERY_NS;
        }
        p.stats.packets += 1;
        if pkt.journal.is_some() {
            p.stats.journals += 1;
        }
        // Map the packet's timestamp to cluster time.
        let now_t = ticks(now);
        let anchor = *p
            .anchor
            .get_or_insert(pkt.timestamp.wrapping_sub(now_t as u32));
        let mut rel = i64::from(
            pkt.timestamp
                .wrapping_sub(anchor)
                .wrapping_sub(now_t as u32) as i32,
        );
        if !(-LATE_TICKS..=MAX_FUTURE_TICKS).contains(&rel) {
            p.anchor = Some(pkt.timestamp.wrapping_sub(now_t as u32));
            p.stats.reanchored += 1;
            rel = 0;
        }
        let base = (now_t as i64 + rel).max(0) as u64 * TICK_NS;
        let latest = now + MAX_FUTURE_TICKS as u64 * TICK_NS;
        let id = p.id;
        let events = &mut self.events;
        let stats = &mut p.stats;
        let r = p.decoder.decode(pkt.list, pkt.z, pkt.p, |delta, msg| {
            stats.messages += 1;
            let at_ns = base.saturating_add(u64::from(delta) * TICK_NS).min(latest);
            events.push_back(Event::Midi {
                peer: id,
                at_ns,
                msg,
            });
        });
        if r.is_err() {
            p.stats.malformed += 1;
        }
    }

    /// Sends MIDI to every connected session: `list` is a command list as
    /// [`wire::push_command`] builds it. Returns how many sessions it went to.
    pub fn send_midi(&mut self, now: u64, list: &[u8]) -> usize {
        let ts = ticks(now) as u32;
        let mut n = 0;
        for p in self
            .peers
            .iter_mut()
            .filter(|p| p.state == State::Connected)
        {
            p.send_seq = p.send_seq.wrapping_add(1);
            let mut bytes = Vec::with_capacity(14 + list.len());
            wire::emit_rtp(&mut bytes, p.send_seq, ts, self.ssrc, list);
            self.out.push_back(Transmit {
                from: Port::Data,
                to: p.data,
                bytes,
            });
            n += 1;
        }
        n
    }
}

impl Peer {
    fn set_offset(&mut self, offset: i64, rtt: u64) {
        self.offset = Some(offset);
        self.rtt = Some(rtt);
        self.anchor = Some(offset as u32);
        self.stats.syncs += 1;
    }
}
