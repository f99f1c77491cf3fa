//! The sans-IO Link peer: discovery, peer table, measurement and the session rules.
//!
//! Call order (CONVENTIONS.md §2): build with [`LinkPeer::new`], tell it the gateways
//! ([`LinkPeer::add_gateway`]), then feed it every datagram with [`LinkPeer::handle_discovery`]
//! (from the multicast or the discovery unicast socket) or [`LinkPeer::handle_measurement`]
//! (from the measurement socket), call [`LinkPeer::handle_timeout`] once
//! [`LinkPeer::poll_timeout`] has passed, and after each call drain [`LinkPeer::poll_transmit`].
//! Every input takes `now`, the host time in µs (the glue uses `CLOCK_MONOTONIC_RAW`, as
//! Ableton's Linux peers do). App edits ([`LinkPeer::set_tempo`], [`LinkPeer::set_playing`])
//! and the state getters take host times too. [`LinkPeer::shutdown`] queues the BYEBYEs.
//!
//! The rules are those of `shared/protocols/ableton-link.md` §3–§7, summed up in docs/link.md.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};

use super::wire::{
    self, Discovery, DiscoveryKind, MAX_PING_PAYLOAD, MeasurementKind, NodeId, PeerState,
    SessionId, StartStop, WireTimeline,
};

/// Link's multicast group.
pub const MULTICAST_GROUP: Ipv4Addr = Ipv4Addr::new(224, 76, 78, 75);
/// Link's discovery port.
pub const DISCOVERY_PORT: u16 = 20808;
/// TTL announced in ALIVE/RESPONSE, in seconds.
pub const TTL_S: u8 = 5;
/// ALIVE period (ttl / 20).
pub const ALIVE_PERIOD_US: i64 = 250_000;
/// Least spacing between two broadcasts.
pub const MIN_BROADCAST_SPACING_US: i64 = 50_000;
/// PING retry timer.
pub const PING_TIMEOUT_US: i64 = 50_000;
/// Timer expiries after which a measurement fails.
pub const MAX_PING_TIMEOUTS: u8 = 5;
/// A measurement finishes once it holds more than this many samples.
pub const MEASUREMENT_SAMPLES: usize = 100;
/// Period of the re-measurement of a joined session.
pub const REMEASURE_US: i64 = 30_000_000;
/// Ghost-time window within which the smaller session id wins.
pub const TIE_WINDOW_US: i64 = 500_000;

/// Which of our interfaces (gateways) a datagram belongs to; chosen by the glue.
pub type GatewayId = u32;

/// Which of a gateway's sockets sends a [`Transmit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketKind {
    /// The discovery unicast socket (sends ALIVE/BYEBYE to the group, RESPONSE to a peer).
    Discovery,
    /// The measurement socket (PING and PONG).
    Measurement,
}

/// A datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Gateway whose socket sends it.
    pub gateway: GatewayId,
    /// Which socket.
    pub socket: SocketKind,
    /// Destination (the multicast group for ALIVE/BYEBYE).
    pub dst: SocketAddrV4,
    /// The datagram.
    pub payload: Vec<u8>,
}

/// Counters for status and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Datagrams that failed to parse (dropped).
    pub bad_datagrams: u64,
    /// Measurements that finished with a result.
    pub measurements_ok: u64,
    /// Measurements that gave up.
    pub measurements_failed: u64,
    /// Times this peer founded a fresh session after losing all peers.
    pub resets: u64,
    /// Times this peer switched into another session.
    pub joins: u64,
    /// `ghost_other − ghost_ours` (µs) found by the last measurement of another session.
    pub last_session_diff_us: i64,
}

#[derive(Clone, Copy, Debug)]
struct Gateway {
    id: GatewayId,
    measurement: SocketAddrV4,
}

#[derive(Clone, Copy, Debug)]
struct PeerEntry {
    node: NodeId,
    gateway: GatewayId,
    state: PeerState,
    expires: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Join,
    Remeasure,
}

#[derive(Clone, Debug)]
struct Measuring {
    session: SessionId,
    gateway: GatewayId,
    endpoint: SocketAddrV4,
    samples: Vec<f64>,
    timeouts: u8,
    deadline: i64,
    purpose: Purpose,
}

/// A Link peer without IO. See the module docs for the call order.
#[derive(Debug)]
pub struct LinkPeer {
    rng: u64,
    node: NodeId,
    session: SessionId,
    /// `ghost = host + intercept` (slope 1).
    intercept: i64,
    timeline: WireTimeline,
    start_stop: StartStop,
    gateways: Vec<Gateway>,
    peers: Vec<PeerEntry>,
    known_sessions: Vec<SessionId>,
    measuring: Vec<Measuring>,
    joined: bool,
    remeasure_at: Option<i64>,
    had_peers: bool,
    next_broadcast: i64,
    last_broadcast: Option<i64>,
    out: VecDeque<Transmit>,
    stats: LinkStats,
    shut: bool,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl LinkPeer {
    /// A peer founding its own session at host time `now`, at `bpm`, with the session beat
    /// `beat_micro` (micro-beats) at `now`, so an app's running beat carries over. `seed` drives
    /// the NodeIds it draws.
    pub fn new(now: i64, seed: u64, bpm: f64, beat_micro: i64) -> Self {
        let mut rng = seed;
        let node = NodeId::from_random(splitmix(&mut rng));
        LinkPeer {
            rng,
            node,
            session: node,
            intercept: now.wrapping_neg(),
            timeline: WireTimeline {
                micros_per_beat: WireTimeline::micros_per_beat_of(bpm),
                beat_origin: beat_micro,
                time_origin: 0,
            },
            start_stop: StartStop::default(),
            gateways: Vec::new(),
            peers: Vec::new(),
            known_sessions: Vec::new(),
            measuring: Vec::new(),
            joined: false,
            remeasure_at: None,
            had_peers: false,
            next_broadcast: now,
            last_broadcast: None,
            out: VecDeque::new(),
            stats: LinkStats::default(),
            shut: false,
        }
    }

    // ----- state for the app -------------------------------------------------------------

    /// This peer's NodeId.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The session this peer is in.
    pub fn session_id(&self) -> SessionId {
        self.session
    }

    /// The session timeline (ghost time on the wire).
    pub fn timeline(&self) -> WireTimeline {
        self.timeline
    }

    /// The session's start/stop state.
    pub fn start_stop(&self) -> StartStop {
        self.start_stop
    }

    /// `ghost − host`: the intercept of the ghost transform.
    pub fn ghost_intercept(&self) -> i64 {
        self.intercept
    }

    /// Ghost time at host time `host`.
    pub fn ghost(&self, host: i64) -> i64 {
        host.saturating_add(self.intercept)
    }

    /// Host time at ghost time `ghost`.
    pub fn host(&self, ghost: i64) -> i64 {
        ghost.saturating_sub(self.intercept)
    }

    /// Session beat at host time `host`, in micro-beats.
    pub fn beats_at_host(&self, host: i64) -> i64 {
        self.timeline.beats_at(self.ghost(host))
    }

    /// Phase in a bar of `quantum_micro` micro-beats at host time `host` (`0..quantum`).
    pub fn phase_at_host(&self, host: i64, quantum_micro: i64) -> i64 {
        if quantum_micro <= 0 {
            return 0;
        }
        self.beats_at_host(host).rem_euclid(quantum_micro)
    }

    /// Host time at which the current start/stop state takes effect, unless it is the unset
    /// default.
    pub fn start_stop_host_time(&self) -> Option<i64> {
        (self.start_stop != StartStop::default())
            .then(|| self.host(self.timeline.time_at(self.start_stop.beats)))
    }

    /// Other peers in our session (unique NodeIds).
    pub fn peer_count(&self) -> usize {
        let mut ids: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|p| p.state.session == self.session)
            .map(|p| p.node)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// Counters.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    // ----- app edits ---------------------------------------------------------------------

    /// Sets the session tempo at host time `now`, keeping the session beat at `now` (§6.3).
    pub fn set_tempo(&mut self, now: i64, bpm: f64) {
        let mpb = WireTimeline::micros_per_beat_of(bpm);
        if mpb == self.timeline.micros_per_beat {
            return;
        }
        let g = self.ghost(now);
        let b = self.timeline.beats_at(g);
        let bo = b.max(self.timeline.beat_origin.saturating_add(1));
        let shift = WireTimeline {
            micros_per_beat: mpb,
            beat_origin: b,
            time_origin: g,
        }
        .time_at(bo);
        self.timeline = WireTimeline {
            micros_per_beat: mpb,
            beat_origin: bo,
            time_origin: shift,
        };
        self.changed(now);
    }

    /// Starts or stops the session transport at host time `apply_at`, decided at `now` (§7).
    pub fn set_playing(&mut self, now: i64, playing: bool, apply_at: i64) {
        if playing == self.start_stop.playing && self.start_stop != StartStop::default() {
            return;
        }
        if !playing && self.start_stop == StartStop::default() {
            return;
        }
        self.start_stop = StartStop {
            playing,
            beats: self.beats_at_host(apply_at),
            timestamp: self
                .ghost(now)
                .max(self.start_stop.timestamp.saturating_add(1)),
        };
        self.changed(now);
    }

    // ----- gateways ----------------------------------------------------------------------

    /// Adds a gateway whose measurement socket is `measurement`; it announces at once.
    pub fn add_gateway(&mut self, now: i64, id: GatewayId, measurement: SocketAddrV4) {
        self.gateways.retain(|g| g.id != id);
        self.gateways.push(Gateway { id, measurement });
        self.changed(now);
    }

    /// Removes a gateway and the peers seen on it (the glue says BYEBYE first if it can).
    pub fn remove_gateway(&mut self, now: i64, id: GatewayId) {
        self.gateways.retain(|g| g.id != id);
        self.peers.retain(|p| p.gateway != id);
        self.measuring.retain(|m| m.gateway != id);
        self.recount(now);
    }

    /// The BYEBYE for one gateway (the glue sends it before closing that gateway).
    pub fn byebye(&self) -> Vec<u8> {
        wire::encode_discovery(DiscoveryKind::ByeBye, 0, self.node, &self.state_on(None))
    }

    /// Leaves: queues a BYEBYE on every gateway; the peer stays silent afterwards.
    pub fn shutdown(&mut self) {
        for g in self.gateways.clone() {
            self.out.push_back(Transmit {
                gateway: g.id,
                socket: SocketKind::Discovery,
                dst: SocketAddrV4::new(MULTICAST_GROUP, DISCOVERY_PORT),
                payload: self.byebye(),
            });
        }
        self.shut = true;
    }

    // ----- inputs ------------------------------------------------------------------------

    /// A datagram from the multicast socket or the discovery unicast socket of `gateway`.
    pub fn handle_discovery(&mut self, now: i64, gateway: GatewayId, src: SocketAddrV4, d: &[u8]) {
        if self.shut {
            return;
        }
        let msg = match wire::parse_discovery(d) {
            Ok(m) => m,
            Err(_) => {
                self.stats.bad_datagrams += 1;
                return;
            }
        };
        if msg.group != 0 || msg.node == self.node || !self.gateways.iter().any(|g| g.id == gateway)
        {
            return;
        }
        match msg {
            Discovery {
                kind: DiscoveryKind::ByeBye,
                node,
                ..
            } => {
                self.peers
                    .retain(|p| !(p.node == node && p.gateway == gateway));
                self.recount(now);
            }
            Discovery {
                kind,
                ttl,
                node,
                state: Some(mut state),
                ..
            } => {
                if kind == DiscoveryKind::Alive {
                    let payload = wire::encode_discovery(
                        DiscoveryKind::Response,
                        TTL_S,
                        self.node,
                        &self.state_on(Some(gateway)),
                    );
                    self.out.push_back(Transmit {
                        gateway,
                        socket: SocketKind::Discovery,
                        dst: src,
                        payload,
                    });
                }
                state.timeline = state.timeline.clamped();
                let expires = now.saturating_add(i64::from(ttl) * 1_000_000);
                let entry = PeerEntry {
                    node,
                    gateway,
                    state,
                    expires,
                };
                match self
                    .peers
                    .iter_mut()
                    .find(|p| p.node == node && p.gateway == gateway)
                {
                    Some(p) => *p = entry,
                    None => self.peers.push(entry),
                }
                self.on_session_timeline(now, state.session, state.timeline);
                self.on_start_stop(now, state.session, state.start_stop);
                self.recount(now);
            }
            Discovery { state: None, .. } => {}
        }
    }

    /// A datagram from the measurement socket of `gateway`: PINGs are answered, PONGs feed
    /// the running measurement with that endpoint.
    pub fn handle_measurement(
        &mut self,
        now: i64,
        gateway: GatewayId,
        src: SocketAddrV4,
        d: &[u8],
    ) {
        if self.shut {
            return;
        }
        let m = match wire::parse_measurement(d) {
            Ok(m) => m,
            Err(_) => {
                self.stats.bad_datagrams += 1;
                return;
            }
        };
        match m.kind {
            MeasurementKind::Ping => {
                if m.payload.len() <= MAX_PING_PAYLOAD && m.host_time.is_some() {
                    let payload = wire::encode_pong(self.session, self.ghost(now), m.payload);
                    self.out.push_back(Transmit {
                        gateway,
                        socket: SocketKind::Measurement,
                        dst: src,
                        payload,
                    });
                } else {
                    self.stats.bad_datagrams += 1;
                }
            }
            MeasurementKind::Pong => {
                let Some(i) = self
                    .measuring
                    .iter()
                    .position(|x| x.gateway == gateway && x.endpoint == src)
                else {
                    return;
                };
                if m.session != Some(self.measuring[i].session) {
                    self.finish(now, i, None);
                    return;
                }
                let (Some(gt), Some(ht)) = (m.ghost_time, m.host_time) else {
                    self.stats.bad_datagrams += 1;
                    return;
                };
                let x = &mut self.measuring[i];
                if ht <= now {
                    x.samples.push(gt as f64 - (now as f64 + ht as f64) / 2.0);
                    if let Some(pgt) = m.prev_ghost_time.filter(|&p| p != 0) {
                        x.samples.push((gt as f64 + pgt as f64) / 2.0 - ht as f64);
                    }
                }
                if x.samples.len() > MEASUREMENT_SAMPLES {
                    let r = median(&mut x.samples).round() as i64;
                    self.finish(now, i, Some(r));
                } else {
                    x.deadline = now + PING_TIMEOUT_US;
                    let (gw, ep) = (x.gateway, x.endpoint);
                    self.ping(gw, ep, wire::encode_ping(now, Some(gt)));
                }
            }
        }
    }

    /// Runs what is due at `now`: measurement retries, peer expiry, re-measurement, ALIVE.
    pub fn handle_timeout(&mut self, now: i64) {
        if self.shut {
            return;
        }
        let mut i = 0;
        while i < self.measuring.len() {
            let x = &mut self.measuring[i];
            if x.deadline <= now {
                x.timeouts += 1;
                if x.timeouts >= MAX_PING_TIMEOUTS {
                    self.finish(now, i, None);
                    continue;
                }
                x.deadline = now + PING_TIMEOUT_US;
                let (gw, ep) = (x.gateway, x.endpoint);
                self.ping(gw, ep, wire::encode_ping(now, None));
            }
            i += 1;
        }
        let before = self.peers.len();
        self.peers.retain(|p| p.expires > now);
        if self.peers.len() != before {
            self.recount(now);
        }
        if let Some(at) = self.remeasure_at
            && at <= now
            && !self.measuring.iter().any(|m| m.session == self.session)
        {
            self.remeasure_at = Some(now + REMEASURE_US);
            self.start_measurement(now, self.session, Purpose::Remeasure);
        }
        if self.next_broadcast <= now {
            self.broadcast(now);
        }
    }

    /// When [`LinkPeer::handle_timeout`] wants to run next (host µs).
    pub fn poll_timeout(&self) -> Option<i64> {
        if self.shut {
            return None;
        }
        let mut t = self.next_broadcast;
        for m in &self.measuring {
            t = t.min(m.deadline);
        }
        for p in &self.peers {
            t = t.min(p.expires);
        }
        if let Some(r) = self.remeasure_at {
            t = t.min(r);
        }
        Some(t)
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    // ----- the rules ---------------------------------------------------------------------

    fn state_on(&self, gateway: Option<GatewayId>) -> PeerState {
        PeerState {
            timeline: self.timeline,
            session: self.session,
            start_stop: self.start_stop,
            mep4: gateway
                .and_then(|id| self.gateways.iter().find(|g| g.id == id))
                .map(|g| g.measurement),
        }
    }

    /// Announces a change at once, but never closer than 50 ms to the last broadcast.
    fn changed(&mut self, now: i64) {
        let earliest = self
            .last_broadcast
            .map_or(now, |l| now.max(l + MIN_BROADCAST_SPACING_US));
        self.next_broadcast = self.next_broadcast.min(earliest);
    }

    fn broadcast(&mut self, now: i64) {
        for g in self.gateways.clone() {
            let payload = wire::encode_discovery(
                DiscoveryKind::Alive,
                TTL_S,
                self.node,
                &self.state_on(Some(g.id)),
            );
            self.out.push_back(Transmit {
                gateway: g.id,
                socket: SocketKind::Discovery,
                dst: SocketAddrV4::new(MULTICAST_GROUP, DISCOVERY_PORT),
                payload,
            });
        }
        self.last_broadcast = Some(now);
        self.next_broadcast = now + ALIVE_PERIOD_US;
    }

    fn on_session_timeline(&mut self, now: i64, session: SessionId, tl: WireTimeline) {
        if session == self.session {
            // §6.2: a later edit has the larger beat origin.
            if tl.beat_origin > self.timeline.beat_origin {
                self.timeline = tl;
                self.changed(now);
            }
        } else if !self.known_sessions.contains(&session)
            && !self.measuring.iter().any(|m| m.session == session)
        {
            self.start_measurement(now, session, Purpose::Join);
        }
    }

    fn on_start_stop(&mut self, now: i64, session: SessionId, s: StartStop) {
        if session == self.session && s.timestamp > self.start_stop.timestamp {
            self.start_stop = s;
            self.changed(now);
        }
    }

    fn start_measurement(&mut self, now: i64, session: SessionId, purpose: Purpose) {
        let candidates = || {
            self.peers
                .iter()
                .filter(move |p| p.state.session == session && p.state.mep4.is_some())
        };
        let Some(p) = candidates()
            .find(|p| p.node == session)
            .or_else(|| candidates().next())
        else {
            return;
        };
        let (gateway, endpoint) = (
            p.gateway,
            p.state
                .mep4
                .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
        );
        self.measuring.push(Measuring {
            session,
            gateway,
            endpoint,
            samples: Vec::with_capacity(MEASUREMENT_SAMPLES + 2),
            timeouts: 0,
            deadline: now + PING_TIMEOUT_US,
            purpose,
        });
        self.ping(gateway, endpoint, wire::encode_ping(now, None));
    }

    fn ping(&mut self, gateway: GatewayId, dst: SocketAddrV4, payload: Vec<u8>) {
        self.out.push_back(Transmit {
            gateway,
            socket: SocketKind::Measurement,
            dst,
            payload,
        });
    }

    /// Ends measurement `i` with the measured intercept, or as a failure (`None`).
    fn finish(&mut self, now: i64, i: usize, result: Option<i64>) {
        let m = self.measuring.swap_remove(i);
        match (m.purpose, result) {
            (Purpose::Join, Some(intercept)) => {
                self.stats.measurements_ok += 1;
                if m.session == self.session {
                    return;
                }
                let diff = intercept.saturating_sub(self.intercept);
                self.stats.last_session_diff_us = diff;
                let switch = diff > TIE_WINDOW_US
                    || (diff.unsigned_abs() < TIE_WINDOW_US as u64 && m.session < self.session);
                let best_timeline = self
                    .peers
                    .iter()
                    .filter(|p| p.state.session == m.session)
                    .map(|p| p.state.timeline)
                    .max_by_key(|t| t.beat_origin);
                match best_timeline {
                    Some(tl) if switch => {
                        self.known_sessions.retain(|s| *s != m.session);
                        self.known_sessions.push(self.session);
                        self.session = m.session;
                        self.intercept = intercept;
                        self.timeline = tl;
                        self.start_stop = self
                            .peers
                            .iter()
                            .filter(|p| p.state.session == m.session)
                            .map(|p| p.state.start_stop)
                            .max_by_key(|s| s.timestamp)
                            .unwrap_or_default();
                        self.joined = true;
                        self.remeasure_at = Some(now + REMEASURE_US);
                        self.stats.joins += 1;
                        self.changed(now);
                        self.recount(now);
                    }
                    _ => {
                        if !self.known_sessions.contains(&m.session) {
                            self.known_sessions.push(m.session);
                        }
                    }
                }
            }
            (Purpose::Join, None) => {
                self.stats.measurements_failed += 1;
                self.known_sessions.retain(|s| *s != m.session);
                self.peers.retain(|p| p.state.session != m.session);
                self.recount(now);
            }
            (Purpose::Remeasure, Some(intercept)) => {
                self.stats.measurements_ok += 1;
                if m.session == self.session && intercept != self.intercept {
                    self.intercept = intercept;
                    self.changed(now);
                }
            }
            (Purpose::Remeasure, None) => self.stats.measurements_failed += 1,
        }
    }

    /// Recounts our session's peers; resets when the count falls to zero (§6.5). Forgets
    /// known sessions nobody is in any more.
    fn recount(&mut self, now: i64) {
        let peers = &self.peers;
        self.known_sessions
            .retain(|s| peers.iter().any(|p| p.state.session == *s));
        if self.peer_count() > 0 {
            self.had_peers = true;
        } else if self.had_peers {
            self.reset(now);
        }
    }

    /// Founds a fresh session, continuing the beat (§6.1).
    fn reset(&mut self, now: i64) {
        let beat = self.beats_at_host(now);
        self.node = NodeId::from_random(splitmix(&mut self.rng));
        self.session = self.node;
        self.intercept = now.wrapping_neg();
        self.timeline = WireTimeline {
            micros_per_beat: self.timeline.micros_per_beat,
            beat_origin: beat,
            time_origin: 0,
        };
        self.start_stop = StartStop::default();
        self.known_sessions.clear();
        self.measuring.clear();
        self.joined = false;
        self.remeasure_at = None;
        self.had_peers = false;
        self.stats.resets += 1;
        self.changed(now);
    }
}
