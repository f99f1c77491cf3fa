//! The sans-IO PTP core: one statime port, its timers, the BMCA schedule, lock and holdover
//! tracking. No sockets, no clock reads: the glue (the tokio task in [`super`], or the
//! deterministic simulation in [`super::sim`]) passes in its monotonic `now` (ns) and the local
//! timestamps of packets, and takes packets out.
//!
//! Call protocol:
//! 1. [`PtpCore::new`] at `now`;
//! 2. whenever something happens, one of [`PtpCore::handle_event`] (an event-port datagram and
//!    its local receive stamp), [`PtpCore::handle_general`], [`PtpCore::handle_send_timestamp`]
//!    (the local transmit stamp of an event message sent earlier, with the context that came
//!    with it) or [`PtpCore::handle_timeout`] (at or after [`PtpCore::poll_timeout`]);
//! 3. after each call, drain [`PtpCore::poll_transmit`] and send what it returns.
//!
//! Local stamps are mapped to cluster time through the [`ClusterClock`] model at the moment
//! they are handed in, so statime sees every time on the one timescale it steers.

use super::clocks::to_ptp_time;
use super::probe::{ProbeResult, RateProbe};
use super::{
    ANNOUNCE_RECEIPT_TIMEOUT, GRANDMASTER_PRIORITY_1, LOCK_SAMPLES, LOCK_SETTLE_TIME,
    LOCK_THRESHOLD_NS, LOG_ANNOUNCE_INTERVAL, LOG_DELAY_REQ_INTERVAL, LOG_SYNC_INTERVAL,
    PtpPortState, PtpStatus, ServoState, UNLOCK_THRESHOLD_NS, tai_time_properties,
};
use crate::clock::ClusterClock;
use rand::rngs::SmallRng;
use statime::config::{
    AcceptAnyMaster, ClockIdentity, DelayMechanism, InstanceConfig, PortConfig, PtpMinorVersion,
};
use statime::filters::{KalmanConfiguration, KalmanFilter};
use statime::port::{
    NoForwardedTLVs, Port, PortAction, PortActionIterator, Running, TimestampContext,
};
use statime::time::Interval;
use statime::{Clock, PtpInstance, PtpInstanceState};
use std::collections::VecDeque;
use std::sync::{Arc, RwLock};

/// The statime instance every core runs on (one port).
pub type Instance = PtpInstance<KalmanFilter, RwLock<PtpInstanceState>>;

type PtpPort<'a, C> =
    Port<'a, Running, AcceptAnyMaster, SmallRng, C, KalmanFilter, RwLock<PtpInstanceState>>;

/// The smallest valid PTP message: the common header.
const PTP_HEADER_LEN: usize = 34;
const MSG_SYNC: u8 = 0x0;
const MSG_DELAY_REQ: u8 = 0x1;
/// How many unanswered Syncs / Delay_Reqs are remembered for step hygiene.
const PENDING_KEEP: usize = 8;
/// twoStepFlag, in the first flag byte (offset 6) of the header.
const FLAG_TWO_STEP: u8 = 0x02;
const MSG_FOLLOW_UP: u8 = 0x8;
const MSG_DELAY_RESP: u8 = 0x9;

/// What a PTP instance is for.
#[derive(Clone, Copy, Debug)]
pub struct Role {
    /// statime's instance configuration (identity, priorities, domain).
    pub instance: InstanceConfig,
    /// The port may only be master (the grandmaster).
    pub master_only: bool,
    /// Whatever statime decides, send nothing while the port is master (a node never serves
    /// time).
    pub never_master: bool,
    /// The port steers its clock (a slave): track lock and holdover.
    pub steering: bool,
}

impl Role {
    /// The coordinator's grandmaster: priority [`GRANDMASTER_PRIORITY_1`], master only.
    pub fn grandmaster(identity: ClockIdentity, domain: u8) -> Role {
        Role {
            instance: InstanceConfig {
                clock_identity: identity,
                priority_1: GRANDMASTER_PRIORITY_1,
                priority_2: 128,
                domain_number: domain,
                sdo_id: Default::default(),
                slave_only: false,
                path_trace: false,
            },
            master_only: true,
            never_master: false,
            steering: false,
        }
    }

    /// A node's slave: worst priority, never on the wire as a master.
    pub fn slave(identity: ClockIdentity, domain: u8) -> Role {
        Role {
            instance: InstanceConfig {
                clock_identity: identity,
                priority_1: 255,
                priority_2: 255,
                domain_number: domain,
                sdo_id: Default::default(),
                // Not statime's `slave_only`: its BMCA trips a debug assertion (a panic in
                // debug builds) when a slave-only port's master times out while the port is
                // still a slave. A node is kept off the wire as a master by `never_master`.
                slave_only: false,
                path_trace: false,
            },
            master_only: false,
            never_master: true,
            steering: true,
        }
    }

    /// A statime instance for this role on the PTP (TAI) timescale.
    pub fn new_instance(&self) -> Instance {
        Instance::new(self.instance, tai_time_properties())
    }
}

/// statime's Kalman filter, tuned for a slave whose rate the frequency probe
/// ([`super::probe`]) set before the filter starts: a 1 s steer time (statime: 2 s) takes out the
/// offset left after the first step (statime steps by its first measurement, before it knows
/// the path delay) in about a second; an initial frequency uncertainty of 5 ppm (statime: 100
/// ppm) says the rate is already close, so the filter does not chase the first noisy offsets
/// with the frequency. Otherwise statime's defaults (steps above 1 ms, slews at up to 200 ppm).
pub fn kalman_config() -> KalmanConfiguration {
    KalmanConfiguration {
        steer_time: statime::time::Duration::from_seconds(KALMAN_STEER_TIME_S),
        initial_frequency_uncertainty: KALMAN_FREQ_UNCERTAINTY,
        ..KalmanConfiguration::default()
    }
}

const KALMAN_STEER_TIME_S: f64 = 1.0;
const KALMAN_FREQ_UNCERTAINTY: f64 = 5e-6;

/// The port configuration every VoiceMesh PTP instance uses (E2E delay, the intervals of
/// [`super`]).
pub fn port_config(master_only: bool) -> PortConfig<AcceptAnyMaster> {
    PortConfig {
        acceptable_master_list: AcceptAnyMaster,
        delay_mechanism: DelayMechanism::E2E {
            interval: Interval::from_log_2(LOG_DELAY_REQ_INTERVAL),
        },
        announce_interval: Interval::from_log_2(LOG_ANNOUNCE_INTERVAL),
        announce_receipt_timeout: ANNOUNCE_RECEIPT_TIMEOUT,
        sync_interval: Interval::from_log_2(LOG_SYNC_INTERVAL),
        master_only,
        delay_asymmetry: statime::time::Duration::ZERO,
        minor_ptp_version: PtpMinorVersion::One,
    }
}

/// Which UDP port a datagram goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// The event port (Sync, Delay_Req): transmit and receive stamps matter.
    Event,
    /// The general port (Announce, Follow_Up, Delay_Resp).
    General,
}

/// A datagram to send. An event message carries the context its transmit stamp must be
/// handed back with ([`PtpCore::handle_send_timestamp`]).
#[derive(Debug)]
pub struct Transmit {
    /// Which port.
    pub channel: Channel,
    /// The PTP message.
    pub data: Vec<u8>,
    /// For event messages: hand back with the transmit stamp.
    pub context: Option<TimestampContext>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    Sync,
    DelayReq,
    Announce,
    AnnounceReceipt,
    FilterUpdate,
}

const TIMERS: [Timer; 5] = [
    Timer::Sync,
    Timer::DelayReq,
    Timer::Announce,
    Timer::AnnounceReceipt,
    Timer::FilterUpdate,
];

/// One PTP port and everything around it but IO. See the module docs for the call order.
pub struct PtpCore<'a, C: Clock> {
    port: Option<PtpPort<'a, C>>,
    instance: &'a Instance,
    role: Role,
    clock: Arc<ClusterClock>,
    status: Arc<PtpStatus>,
    timers: [Option<u64>; 5],
    next_bmca: u64,
    bmca_interval: u64,
    out: VecDeque<Transmit>,
    lock: LockTracker,
    /// Sequence ids of two-step Syncs received whose Follow_Up has not come yet, and of our
    /// Delay_Reqs not yet answered: their timestamps are on the clock as it was then.
    pending_syncs: VecDeque<u16>,
    pending_reqs: VecDeque<u16>,
    /// Those of them that straddle a step: statime would pair a pre-step timestamp with a
    /// post-step one and step again by the same amount, so their completions are dropped.
    stale_syncs: Vec<u16>,
    stale_reqs: Vec<u16>,
    /// A slave's frequency probe while it runs ([`super::probe`]): until it ends, statime gets
    /// no Sync, Follow_Up or Delay_Resp, so its filter starts on a model already at the right
    /// rate.
    probe: Option<RateProbe>,
}

impl<C: Clock> core::fmt::Debug for PtpCore<'_, C> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PtpCore")
            .field("identity", &self.role.instance.clock_identity)
            .field("state", &self.status.port_state())
            .field("servo", &self.status.servo_state())
            .finish_non_exhaustive()
    }
}

fn ns(d: core::time::Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl<'a, C: Clock> PtpCore<'a, C> {
    /// A core with one port on `instance` (made by [`Role::new_instance`]), steering (or, for
    /// the grandmaster, reading) `adapter`, which must be a view of `clock`.
    pub fn new(
        instance: &'a Instance,
        role: Role,
        adapter: C,
        clock: Arc<ClusterClock>,
        rng: SmallRng,
        status: Arc<PtpStatus>,
        now: u64,
    ) -> Self {
        let port = instance.add_port(port_config(role.master_only), kalman_config(), adapter, rng);
        let (port, first) = port.end_bmca();
        let bmca_interval = ns(instance.bmca_interval());
        if role.steering {
            clock.set_locked(false);
            status.set_servo(ServoState::Unlocked);
        }
        let mut core = PtpCore {
            port: Some(port),
            instance,
            role,
            clock,
            status,
            timers: [None; 5],
            next_bmca: now + bmca_interval,
            bmca_interval,
            out: VecDeque::new(),
            lock: LockTracker::new(),
            pending_syncs: VecDeque::new(),
            pending_reqs: VecDeque::new(),
            stale_syncs: Vec::new(),
            stale_reqs: Vec::new(),
            probe: role.steering.then(RateProbe::new),
        };
        apply(&mut core.timers, &mut core.out, now, first);
        let steps = core.status.steps();
        core.after(now, false, steps);
        core
    }

    /// This instance's clock identity.
    pub fn identity(&self) -> ClockIdentity {
        self.role.instance.clock_identity
    }

    /// The cluster clock this core reads or steers.
    pub fn clock(&self) -> &Arc<ClusterClock> {
        &self.clock
    }

    /// A datagram arrived on the event port, stamped `rx_local` (local clock, ns).
    pub fn handle_event(&mut self, now: u64, data: &[u8], rx_local: u64) {
        let Some(kind) = self.classify(data) else {
            return;
        };
        let two_step = data[6] & FLAG_TWO_STEP != 0;
        if kind == MSG_SYNC
            && let Some(probe) = self.probe.as_mut()
        {
            if self.status.port_state() == PtpPortState::Slave {
                probe.set_ready();
            }
            probe.sync(now, data, two_step, rx_local);
            if !self.probe_done() {
                return;
            }
        }
        if kind == MSG_SYNC && two_step {
            remember(&mut self.pending_syncs, seq_id(data));
        }
        let steps = self.status.steps();
        let t = to_ptp_time(self.clock.to_cluster(rx_local));
        if let Some(port) = self.port.as_mut() {
            let actions = port.handle_event_receive(data, t);
            apply(&mut self.timers, &mut self.out, now, actions);
        }
        // A two-step Sync measures nothing until its Follow_Up.
        let measured = kind == MSG_SYNC && !two_step;
        self.after(now, measured, steps);
    }

    /// A datagram arrived on the general port.
    pub fn handle_general(&mut self, now: u64, data: &[u8]) {
        let Some(kind) = self.classify(data) else {
            return;
        };
        if matches!(kind, MSG_FOLLOW_UP | MSG_DELAY_RESP)
            && let Some(probe) = self.probe.as_mut()
        {
            if self.status.port_state() == PtpPortState::Slave {
                probe.set_ready();
            }
            if kind == MSG_FOLLOW_UP {
                probe.follow_up(data);
            }
            if !self.probe_done() {
                return;
            }
        }
        let seq = seq_id(data);
        let completes = match kind {
            MSG_FOLLOW_UP => Some((&mut self.pending_syncs, &mut self.stale_syncs)),
            // Only answers to our own requests (requestingPortIdentity, after the receive
            // timestamp) complete a measurement of ours.
            MSG_DELAY_RESP
                if data.get(44..52) == Some(&self.role.instance.clock_identity.0[..]) =>
            {
                Some((&mut self.pending_reqs, &mut self.stale_reqs))
            }
            _ => None,
        };
        if let Some((pending, stale)) = completes {
            pending.retain(|s| *s != seq);
            if let Some(i) = stale.iter().position(|s| *s == seq) {
                stale.swap_remove(i);
                self.status.count_stale();
                return;
            }
        }
        let steps = self.status.steps();
        if let Some(port) = self.port.as_mut() {
            let actions = port.handle_general_receive(data);
            apply(&mut self.timers, &mut self.out, now, actions);
        }
        self.after(now, kind == MSG_FOLLOW_UP || kind == MSG_DELAY_RESP, steps);
    }

    /// The event message sent with `context` left at local time `tx_local` (ns).
    pub fn handle_send_timestamp(&mut self, now: u64, context: TimestampContext, tx_local: u64) {
        let steps = self.status.steps();
        let t = to_ptp_time(self.clock.to_cluster(tx_local));
        if let Some(port) = self.port.as_mut() {
            let actions = port.handle_send_timestamp(context, t);
            apply(&mut self.timers, &mut self.out, now, actions);
        }
        self.after(now, false, steps);
    }

    /// When the core wants [`PtpCore::handle_timeout`] called (glue monotonic ns).
    pub fn poll_timeout(&self) -> u64 {
        self.timers
            .iter()
            .flatten()
            .copied()
            .fold(self.next_bmca, u64::min)
    }

    /// Runs every timer due at `now`, and the BMCA when its interval has come round.
    pub fn handle_timeout(&mut self, now: u64) {
        if let Some(probe) = self.probe.as_mut() {
            probe.expire(now);
            self.probe_done();
        }
        for (i, timer) in TIMERS.iter().enumerate() {
            if self.timers[i].is_none_or(|t| t > now) {
                continue;
            }
            self.timers[i] = None;
            let steps = self.status.steps();
            let Some(port) = self.port.as_mut() else {
                continue;
            };
            let actions = match timer {
                Timer::Sync => port.handle_sync_timer(),
                Timer::DelayReq => port.handle_delay_request_timer(),
                Timer::Announce => port.handle_announce_timer(&mut NoForwardedTLVs),
                Timer::AnnounceReceipt => port.handle_announce_receipt_timer(),
                Timer::FilterUpdate => port.handle_filter_update_timer(),
            };
            apply(&mut self.timers, &mut self.out, now, actions);
            self.after(now, false, steps);
        }
        if self.next_bmca <= now {
            let steps = self.status.steps();
            // Keep the schedule on its grid; after a long stall, run once and move on.
            self.next_bmca += self.bmca_interval;
            if self.next_bmca <= now {
                self.next_bmca = now + self.bmca_interval;
            }
            if let Some(port) = self.port.take() {
                let mut in_bmca = port.start_bmca();
                self.instance.bmca(&mut [&mut in_bmca]);
                let (running, actions) = in_bmca.end_bmca();
                self.port = Some(running);
                apply(&mut self.timers, &mut self.out, now, actions);
            }
            self.status.count_bmca();
            self.after(now, false, steps);
        }
    }

    /// Ends the frequency probe if it has a result (setting the model's rate from it); true
    /// when no probe runs any more.
    fn probe_done(&mut self) -> bool {
        let Some(probe) = self.probe.as_ref() else {
            return true;
        };
        match probe.result() {
            ProbeResult::Running => return false,
            ProbeResult::Ratio(ratio) => {
                let old = self.clock.model().rate;
                let rate = ratio - 1.0;
                self.clock.set_rate_at(probe.last_rx(), rate);
                // statime's first frequency (0 ppm) is relative to this rate.
                self.status.request_rebase();
                self.status.record_rate(rate);
                tracing::info!(
                    from_ppb = (old * 1e9) as i64,
                    to_ppb = (rate * 1e9) as i64,
                    "PTP frequency probe set the cluster clock's rate from the grandmaster's Syncs"
                );
            }
            ProbeResult::Nothing => {
                tracing::info!("PTP frequency probe gave no estimate; the servo starts alone");
            }
        }
        self.probe = None;
        true
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// Checks the common header enough that statime gets only plausible PTPv2 messages;
    /// counts malformed ones, skips our own looped-back ones. Returns the message type.
    fn classify(&self, data: &[u8]) -> Option<u8> {
        match classify(data, &self.role.instance.clock_identity) {
            Ok(kind) => kind,
            Err(()) => {
                self.status.count_malformed();
                None
            }
        }
    }

    /// After every call: step hygiene (`steps_before` is the step count before the call), mute
    /// a node that statime made master, record our Delay_Reqs, report state, lock, holdover.
    fn after(&mut self, now: u64, measured: bool, steps_before: u64) {
        if self.status.steps() != steps_before {
            self.stale_syncs.extend(self.pending_syncs.drain(..));
            self.stale_reqs.extend(self.pending_reqs.drain(..));
            let keep = |v: &mut Vec<u16>| {
                if v.len() > PENDING_KEEP {
                    v.drain(..v.len() - PENDING_KEEP);
                }
            };
            keep(&mut self.stale_syncs);
            keep(&mut self.stale_reqs);
        }
        let Some(port) = self.port.as_ref() else {
            return;
        };
        if self.role.never_master && port.is_master() {
            self.out.clear();
        }
        for t in &self.out {
            if t.channel == Channel::Event
                && t.data.first().map(|b| b & 0x0f) == Some(MSG_DELAY_REQ)
            {
                let seq = seq_id(&t.data);
                if !self.pending_reqs.contains(&seq) {
                    remember(&mut self.pending_reqs, seq);
                }
            }
        }
        let state = match PtpPortState::from_statime(port.port_ds().port_state) {
            // A muted node is a listener, whatever statime calls it.
            PtpPortState::Master if self.role.never_master => PtpPortState::Listening,
            s => s,
        };
        self.status.set_state(state);
        if !self.role.steering {
            return;
        }
        match port.port_current_ds_contribution() {
            Some(estimate) if measured => {
                let clamp = |v: i128| v.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
                self.lock.sample(
                    now,
                    clamp(estimate.offset_from_master.nanos_rounded()),
                    clamp(estimate.mean_delay.nanos_rounded()),
                    &self.status,
                    &self.clock,
                );
            }
            Some(_) => {}
            None => {
                if self.lock.lost(&self.status, &self.clock) {
                    // Measure the next grandmaster's rate before a fresh filter starts on it:
                    // the rate carried into holdover may have been learnt over a few seconds
                    // only.
                    self.probe = Some(RateProbe::new());
                }
            }
        }
    }
}

/// The sequenceId of a PTP message (header bytes 30..32; `classify` checked the length).
fn seq_id(data: &[u8]) -> u16 {
    u16::from_be_bytes([data[30], data[31]])
}

fn remember(list: &mut VecDeque<u16>, seq: u16) {
    if list.len() == PENDING_KEEP {
        list.pop_front();
    }
    list.push_back(seq);
}

/// Turns statime's actions into owned datagrams and timer deadlines.
fn apply(
    timers: &mut [Option<u64>; 5],
    out: &mut VecDeque<Transmit>,
    now: u64,
    actions: PortActionIterator<'_>,
) {
    let mut set = |t: Timer, d: core::time::Duration| {
        let i = TIMERS.iter().position(|x| *x == t).unwrap_or(0);
        timers[i] = Some(now.saturating_add(ns(d)));
    };
    for action in actions {
        match action {
            PortAction::SendEvent { context, data, .. } => out.push_back(Transmit {
                channel: Channel::Event,
                data: data.to_vec(),
                context: Some(context),
            }),
            PortAction::SendGeneral { data, .. } => out.push_back(Transmit {
                channel: Channel::General,
                data: data.to_vec(),
                context: None,
            }),
            PortAction::ResetAnnounceTimer { duration } => set(Timer::Announce, duration),
            PortAction::ResetSyncTimer { duration } => set(Timer::Sync, duration),
            PortAction::ResetDelayRequestTimer { duration } => set(Timer::DelayReq, duration),
            PortAction::ResetAnnounceReceiptTimer { duration } => {
                set(Timer::AnnounceReceipt, duration)
            }
            PortAction::ResetFilterUpdateTimer { duration } => set(Timer::FilterUpdate, duration),
            // One port: there is no other port to forward TLVs to.
            PortAction::ForwardTLV { .. } => {}
        }
    }
}

/// Checks the common header enough that statime gets only plausible PTPv2 messages, and tells
/// our own looped-back messages apart. Returns the message type.
pub(crate) fn classify(data: &[u8], own: &ClockIdentity) -> Result<Option<u8>, ()> {
    if data.len() < PTP_HEADER_LEN || data[1] & 0x0f != 2 {
        return Err(());
    }
    let len = u16::from_be_bytes([data[2], data[3]]) as usize;
    if !(PTP_HEADER_LEN..=data.len()).contains(&len) {
        return Err(());
    }
    if data[20..28] == own.0 {
        return Ok(None);
    }
    Ok(Some(data[0] & 0x0f))
}

/// Lock detection, holdover and statistics of a slave.
pub(crate) struct LockTracker {
    /// When the current settling period began (start, step, or master regained), ns.
    settle_start: Option<u64>,
    good: u32,
    steps_seen: u64,
    mean_square: f64,
}

impl LockTracker {
    pub(crate) fn new() -> Self {
        LockTracker {
            settle_start: None,
            good: 0,
            steps_seen: 0,
            mean_square: 0.0,
        }
    }

    /// Takes the servo's estimate after a measurement at `now` (ns) and updates `status` (and
    /// the clock's locked flag).
    pub(crate) fn sample(
        &mut self,
        now: u64,
        offset_ns: i64,
        delay_ns: i64,
        status: &PtpStatus,
        clock: &ClusterClock,
    ) {
        status.record_measurement(offset_ns, delay_ns);
        let o = offset_ns as f64;
        self.mean_square += (o * o - self.mean_square) / 16.0;
        status.set_jitter(self.mean_square.sqrt().round() as i64);
        let steps = status.steps();
        if steps != self.steps_seen {
            // Right after a step the estimate is near zero whatever the frequency error:
            // start over.
            self.steps_seen = steps;
            self.settle_start = Some(now);
            self.mean_square = 0.0;
        }
        if matches!(
            status.servo_state(),
            ServoState::Unlocked | ServoState::Holdover
        ) {
            tracing::info!(
                offset_ns,
                delay_ns,
                from = status.servo_state().as_str(),
                "PTP slave follows a master; locking"
            );
            status.set_servo(ServoState::Locking);
        }
        let settle_start = *self.settle_start.get_or_insert(now);
        if now.saturating_sub(settle_start) < super::ns_of(LOCK_SETTLE_TIME) {
            self.good = 0;
            self.set(false, status, clock);
            return;
        }
        if offset_ns.abs() < LOCK_THRESHOLD_NS {
            self.good = self.good.saturating_add(1);
            if self.good >= LOCK_SAMPLES {
                self.set(true, status, clock);
            }
        } else {
            self.good = 0;
            if offset_ns.abs() > UNLOCK_THRESHOLD_NS {
                self.set(false, status, clock);
            }
        }
    }

    /// The port follows no master (any more): a slave that had one free-runs in holdover at
    /// its last rate. True when this call entered holdover.
    pub(crate) fn lost(&mut self, status: &PtpStatus, clock: &ClusterClock) -> bool {
        self.good = 0;
        self.settle_start = None;
        let mut entered = false;
        if matches!(
            status.servo_state(),
            ServoState::Locking | ServoState::Locked
        ) {
            tracing::warn!(
                rate_ppb = status.rate_ppb(),
                last_offset_ns = status.offset_ns(),
                "PTP slave lost its master: holdover, the cluster clock free-runs at its last rate"
            );
            status.set_servo(ServoState::Holdover);
            // statime replaced its filter; the next one starts from the rate we run at now.
            status.request_rebase();
            clock.set_locked(false);
            entered = true;
        }
        status.locked_flag(false);
        clock.set_locked(false);
        entered
    }

    fn set(&self, locked: bool, status: &PtpStatus, clock: &ClusterClock) {
        let servo = if locked {
            ServoState::Locked
        } else {
            ServoState::Locking
        };
        if status.servo_state() != servo {
            if locked {
                tracing::info!(
                    offset_ns = status.offset_ns(),
                    delay_ns = status.path_delay_ns(),
                    "PTP slave locked"
                );
            } else if status.servo_state() == ServoState::Locked {
                tracing::info!(offset_ns = status.offset_ns(), "PTP slave unlocked");
            }
            status.set_servo(servo);
        }
        status.locked_flag(locked);
        clock.set_locked(locked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u8, len: u16, id: [u8; 8]) -> Vec<u8> {
        let mut d = vec![0u8; len as usize];
        d[0] = kind;
        d[1] = 2;
        d[2..4].copy_from_slice(&len.to_be_bytes());
        d[20..28].copy_from_slice(&id);
        d
    }

    #[test]
    fn classify_rejects_malformed_and_skips_own() {
        let own = ClockIdentity([1, 2, 3, 4, 5, 6, 7, 8]);
        let other = [9u8; 8];
        assert_eq!(classify(&header(0x8, 44, other), &own), Ok(Some(0x8)));
        assert_eq!(classify(&header(0x8, 44, own.0), &own), Ok(None));
        assert_eq!(classify(&[0u8; 10], &own), Err(()));
        let mut v1 = header(0x0, 44, other);
        v1[1] = 1;
        assert_eq!(classify(&v1, &own), Err(()));
        let mut long = header(0x0, 44, other);
        long[2..4].copy_from_slice(&400u16.to_be_bytes());
        assert_eq!(classify(&long, &own), Err(()));
    }

    #[test]
    fn lock_needs_settling_and_consecutive_good_samples() {
        let status = PtpStatus::default();
        let clock = ClusterClock::new();
        let mut lock = LockTracker::new();
        let ms = |n: u64| n * 1_000_000;
        assert_eq!(status.servo_state(), ServoState::Unlocked);
        // Good estimates during the settling time do not count.
        for i in 0..20 {
            lock.sample(ms(i * 50), 1_000, 5_000, &status, &clock);
        }
        assert!(!status.is_locked());
        assert_eq!(status.servo_state(), ServoState::Locking);
        let after = LOCK_SETTLE_TIME.as_millis() as u64;
        for i in 0..LOCK_SAMPLES as u64 - 1 {
            lock.sample(ms(after + i), 1_000, 5_000, &status, &clock);
        }
        assert!(!status.is_locked());
        lock.sample(ms(after + 100), 1_000, 5_000, &status, &clock);
        assert!(status.is_locked() && clock.is_locked());
        assert_eq!(status.servo_state(), ServoState::Locked);
        lock.sample(ms(after + 101), 50_000, 5_000, &status, &clock);
        assert!(
            status.is_locked(),
            "hysteresis: a middling sample keeps the lock"
        );
        lock.sample(ms(after + 102), 150_000, 5_000, &status, &clock);
        assert!(!status.is_locked(), "a large offset unlocks");
        assert_eq!(status.servo_state(), ServoState::Locking);
        for i in 0..LOCK_SAMPLES as u64 {
            lock.sample(ms(after + 200 + i), 1_000, 5_000, &status, &clock);
        }
        assert!(status.is_locked());
        // A step starts settling again.
        status.record_step(1_000);
        let stepped = after + 1_000;
        for i in 0..20 {
            lock.sample(ms(stepped + i * 50), 0, 5_000, &status, &clock);
            assert!(
                !status.is_locked() && !clock.is_locked(),
                "a step restarts settling"
            );
        }
        for i in 0..LOCK_SAMPLES as u64 {
            lock.sample(ms(stepped + after + i), 0, 5_000, &status, &clock);
        }
        assert!(status.is_locked());
        // Losing the master: holdover, unlocked, a rebase asked for.
        lock.lost(&status, &clock);
        assert!(!status.is_locked() && !clock.is_locked());
        assert_eq!(status.servo_state(), ServoState::Holdover);
        assert!(status.take_rebase());
        lock.lost(&status, &clock);
        assert_eq!(status.servo_state(), ServoState::Holdover);
        assert!(!status.take_rebase(), "one rebase per holdover");
        // A master again: locking.
        lock.sample(ms(stepped + 10_000), 2_000, 5_000, &status, &clock);
        assert_eq!(status.servo_state(), ServoState::Locking);
        assert_eq!(status.measurements(), 40 + 3 * LOCK_SAMPLES as u64 + 3);
    }

    #[test]
    fn a_slave_that_never_had_a_master_is_unlocked_not_in_holdover() {
        let status = PtpStatus::default();
        let clock = ClusterClock::new();
        let mut lock = LockTracker::new();
        lock.lost(&status, &clock);
        assert_eq!(status.servo_state(), ServoState::Unlocked);
        assert!(!status.take_rebase());
    }
}
