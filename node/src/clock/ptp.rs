//! PTP glue (statime): the grandmaster on the coordinator, a slave on every node.
//!
//! statime is sans-IO: a [`PtpInstance`] with one port takes packets, transmit stamps and timer
//! expiries through `handle_*` calls and answers with actions (send this, reset that timer).
//! This module is the IO around it, one tokio task per role:
//!
//! 1. open two [`socket::TimestampedSocket`]s on the PTP group 224.0.1.129, event and general
//!    port, on the scope's multicast interface, kernel software timestamps on;
//! 2. create the instance and its port, `end_bmca` it and apply its first actions;
//! 3. loop until shutdown: a received event message goes to `handle_event_receive` with its
//!    kernel receive stamp, a general one to `handle_general_receive`, a transmit stamp from the
//!    error queue to `handle_send_timestamp` with the context its `SendEvent` left, an expired
//!    timer to its `handle_*_timer`, and every `bmca_interval` the port runs the BMCA
//!    (`start_bmca` → `instance.bmca` → `end_bmca`). Every call's actions are applied at once.
//!
//! Kernel stamps are `CLOCK_REALTIME`; each one is mapped to cluster time through the
//! [`ClusterClock`] model at the moment it is handed to statime, so statime sees every time on
//! the one timescale it steers.
//!
//! The timescale is PTP (TAI, UTC offset 37 s). The grandmaster reads the coordinator's clock
//! and never steers it (its port is master-only, its clock adapter refuses changes) and it has
//! priority 64, so it wins the BMCA against any default-priority (128) PTP clock. A node has the
//! worst priority (255) and never serves time: when its grandmaster is gone statime may call
//! the node's port master, but the node then sends nothing and its clock free-runs at the last
//! rate learnt. (statime's own `slave_only` is not used: its BMCA trips a debug assertion when a
//! slave-only port loses its master.)
//!
//! Bad input never stops the task: a malformed datagram is dropped and counted in
//! [`PtpStatus::malformed`], socket errors are logged and counted.

pub mod clocks;
pub mod socket;

use self::clocks::{ReferenceClock, SteeredClock, to_ptp_time};
use self::socket::{PTP_PRIMARY_GROUP, TimestampedSocket};
use super::ClusterClock;
use crate::net::NetScope;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use statime::config::{
    AcceptAnyMaster, ClockIdentity, DelayMechanism, InstanceConfig, LeapIndicator, PortConfig,
    PtpMinorVersion, TimePropertiesDS, TimeSource,
};
use statime::filters::{KalmanConfiguration, KalmanFilter};
use statime::observability::port::PortState as StatimePortState;
use statime::port::{
    NoForwardedTLVs, Port, PortAction, PortActionIterator, Running, TimestampContext,
};
use statime::time::Interval;
use statime::{Clock, PtpInstance, PtpInstanceState};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where and how PTP runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PtpConfig {
    /// UDP port of event messages (Sync, Delay_Req); 319 in standard PTP.
    pub event_port: u16,
    /// UDP port of general messages (Announce, Follow_Up, Delay_Resp); 320 in standard PTP.
    pub general_port: u16,
    /// PTP domain number.
    pub domain: u8,
    /// Which interface the multicast traffic uses.
    pub scope: NetScope,
}

impl Default for PtpConfig {
    fn default() -> Self {
        PtpConfig {
            event_port: voicemesh_protocol::discovery::DEFAULT_PTP_EVENT_PORT,
            general_port: voicemesh_protocol::discovery::DEFAULT_PTP_GENERAL_PORT,
            domain: 0,
            scope: NetScope::Loopback,
        }
    }
}

/// log2 of the Sync interval in seconds: 8 per second, so a node locks within seconds.
pub const LOG_SYNC_INTERVAL: i8 = -3;
/// log2 of the minimum Delay_Req interval in seconds.
pub const LOG_DELAY_REQ_INTERVAL: i8 = -3;
/// log2 of the Announce interval in seconds; also the BMCA period.
pub const LOG_ANNOUNCE_INTERVAL: i8 = -1;
/// Announce intervals without an Announce before a slave forgets its master.
pub const ANNOUNCE_RECEIPT_TIMEOUT: u8 = 3;
/// priority1 of the grandmaster: better (lower) than the default 128 of other PTP clocks.
pub const GRANDMASTER_PRIORITY_1: u8 = 64;
/// A slave declares itself locked after this many consecutive offset estimates below
/// [`LOCK_THRESHOLD_NS`], counted only after [`LOCK_SETTLE_TIME`].
pub const LOCK_SAMPLES: u32 = 8;
/// Estimates are not trusted for locking this long after the slave found its master or stepped
/// its clock: right after a step the servo's estimate is near zero whatever the clock really
/// does, until new measurements show the frequency error.
pub const LOCK_SETTLE_TIME: Duration = Duration::from_secs(2);
/// Offset below which an estimate counts towards locking, ns (half a sample at 48 kHz).
pub const LOCK_THRESHOLD_NS: i64 = 10_000;
/// Offset above which a locked slave unlocks, ns.
pub const UNLOCK_THRESHOLD_NS: i64 = 100_000;
/// How long a sent event message waits for its transmit stamp before it is given up.
const TX_STAMP_TIMEOUT: Duration = Duration::from_millis(200);
/// The smallest valid PTP message: the common header.
const PTP_HEADER_LEN: usize = 34;

/// The state of the PTP port, as in IEEE 1588 (a subset: the ones statime reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PtpPortState {
    /// Not started yet.
    Initializing,
    /// Listening for a master.
    Listening,
    /// Sending Sync and Announce: the grandmaster.
    Master,
    /// Following a master.
    Slave,
    /// Another port is master; this one stays quiet.
    Passive,
    /// Broken.
    Faulty,
}

impl PtpPortState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => PtpPortState::Listening,
            2 => PtpPortState::Master,
            3 => PtpPortState::Slave,
            4 => PtpPortState::Passive,
            5 => PtpPortState::Faulty,
            _ => PtpPortState::Initializing,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            PtpPortState::Initializing => 0,
            PtpPortState::Listening => 1,
            PtpPortState::Master => 2,
            PtpPortState::Slave => 3,
            PtpPortState::Passive => 4,
            PtpPortState::Faulty => 5,
        }
    }

    fn from_statime(s: StatimePortState) -> Self {
        match s {
            StatimePortState::Initializing => PtpPortState::Initializing,
            StatimePortState::Listening => PtpPortState::Listening,
            StatimePortState::PreMaster | StatimePortState::Master => PtpPortState::Master,
            StatimePortState::Uncalibrated | StatimePortState::Slave => PtpPortState::Slave,
            StatimePortState::Passive => PtpPortState::Passive,
            StatimePortState::Faulty | StatimePortState::Disabled => PtpPortState::Faulty,
        }
    }
}

/// What a PTP slave (or the grandmaster) reports, shared with the control session and the
/// dashboard (wait-free reads).
#[derive(Debug, Default)]
pub struct PtpStatus {
    offset_ns: AtomicI64,
    path_delay_ns: AtomicI64,
    locked: AtomicBool,
    jitter_ns: AtomicI64,
    rate_ppb: AtomicI64,
    state: AtomicU8,
    steps: AtomicU64,
    measurements: AtomicU64,
    malformed: AtomicU64,
    socket_errors: AtomicU64,
}

impl PtpStatus {
    /// Latest measured offset of the local cluster clock from the grandmaster, in ns (the
    /// servo's estimate; positive: the local clock is ahead).
    pub fn offset_ns(&self) -> i64 {
        self.offset_ns.load(Ordering::Relaxed)
    }
    /// Latest mean path delay to the grandmaster, in ns.
    pub fn path_delay_ns(&self) -> i64 {
        self.path_delay_ns.load(Ordering::Relaxed)
    }
    /// Whether the slave follows a grandmaster.
    pub fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }
    /// Root mean square of recent offsets (exponentially weighted, 1/16 per sample), in ns.
    pub fn jitter_ns(&self) -> i64 {
        self.jitter_ns.load(Ordering::Relaxed)
    }
    /// The rate correction the servo applies to the local clock, in parts per billion.
    pub fn rate_ppb(&self) -> i64 {
        self.rate_ppb.load(Ordering::Relaxed)
    }
    /// The port's state.
    pub fn port_state(&self) -> PtpPortState {
        PtpPortState::from_u8(self.state.load(Ordering::Relaxed))
    }
    /// How many times the servo stepped the clock.
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }
    /// How many offset measurements the slave took (Follow_Up, Delay_Resp or one-step Sync).
    pub fn measurements(&self) -> u64 {
        self.measurements.load(Ordering::Relaxed)
    }
    /// Datagrams dropped because they were not valid PTP messages.
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }
    /// Socket errors (send, receive, missing timestamps) seen so far.
    pub fn socket_errors(&self) -> u64 {
        self.socket_errors.load(Ordering::Relaxed)
    }

    pub(crate) fn record_step(&self) {
        self.steps.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_rate(&self, rate: f64) {
        self.rate_ppb
            .store((rate * 1e9).round() as i64, Ordering::Relaxed);
    }

    fn set_state(&self, s: PtpPortState) {
        self.state.store(s.to_u8(), Ordering::Relaxed);
    }

    fn count_socket_error(&self) {
        self.socket_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why PTP could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PtpError {
    /// A socket could not be opened (port in use, no such interface, no permission).
    #[error("PTP socket on port {port}: {source}")]
    Socket {
        /// The port.
        port: u16,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Runs the grandmaster until `shutdown`. `clock` is the coordinator's clock (never steered).
pub async fn run_grandmaster(
    cfg: PtpConfig,
    clock: Arc<ClusterClock>,
    shutdown: CancellationToken,
) -> Result<(), PtpError> {
    run_grandmaster_with_status(cfg, clock, Arc::new(PtpStatus::default()), shutdown).await
}

/// [`run_grandmaster`], reporting port state and counters into `status`.
pub async fn run_grandmaster_with_status(
    cfg: PtpConfig,
    clock: Arc<ClusterClock>,
    status: Arc<PtpStatus>,
    shutdown: CancellationToken,
) -> Result<(), PtpError> {
    let mut rng = SmallRng::from_entropy();
    let instance = InstanceConfig {
        clock_identity: random_identity(&mut rng),
        priority_1: GRANDMASTER_PRIORITY_1,
        priority_2: 128,
        domain_number: cfg.domain,
        sdo_id: Default::default(),
        slave_only: false,
        path_trace: false,
    };
    let adapter = ReferenceClock::new(clock.clone());
    let role = Role {
        instance,
        master_only: true,
        never_master: false,
        steering: false,
    };
    run(cfg, role, clock, adapter, rng, status, shutdown).await
}

/// Runs a slave until `shutdown`, disciplining `clock` and reporting into `status`.
pub async fn run_slave(
    cfg: PtpConfig,
    clock: Arc<ClusterClock>,
    status: Arc<PtpStatus>,
    shutdown: CancellationToken,
) -> Result<(), PtpError> {
    let mut rng = SmallRng::from_entropy();
    let instance = InstanceConfig {
        clock_identity: random_identity(&mut rng),
        priority_1: 255,
        priority_2: 255,
        domain_number: cfg.domain,
        sdo_id: Default::default(),
        // Not statime's `slave_only`: its BMCA trips a debug assertion (a panic in debug
        // builds) when a slave-only port's master times out while the port is still a slave.
        // A node is kept off the wire as a master by `never_master` instead.
        slave_only: false,
        path_trace: false,
    };
    let adapter = SteeredClock::new(clock.clone(), status.clone());
    let role = Role {
        instance,
        master_only: false,
        never_master: true,
        steering: true,
    };
    clock.set_locked(false);
    let result = run(
        cfg,
        role,
        clock.clone(),
        adapter,
        rng,
        status.clone(),
        shutdown,
    )
    .await;
    // The clock free-runs from here: honest readers must not take it for synchronised.
    clock.set_locked(false);
    status.locked.store(false, Ordering::Relaxed);
    result
}

/// The PTP timescale: TAI, 37 s ahead of UTC.
pub fn tai_time_properties() -> TimePropertiesDS {
    TimePropertiesDS::new_ptp_time(
        Some((super::TAI_OFFSET_NS / 1_000_000_000) as i16),
        LeapIndicator::NoLeap,
        false,
        false,
        TimeSource::InternalOscillator,
    )
}

/// A random EUI-64 clock identity: several instances may share one host (and its MAC).
fn random_identity(rng: &mut SmallRng) -> ClockIdentity {
    use rand::RngCore;
    let mut id = [0u8; 8];
    rng.fill_bytes(&mut id);
    // Locally administered, unicast.
    id[0] = (id[0] | 0x02) & !0x01;
    ClockIdentity(id)
}

#[derive(Clone, Copy)]
struct Role {
    instance: InstanceConfig,
    master_only: bool,
    /// Whatever statime decides, send nothing while its port is master.
    never_master: bool,
    steering: bool,
}

type PtpPort<'a, C> =
    Port<'a, Running, AcceptAnyMaster, SmallRng, C, KalmanFilter, RwLock<PtpInstanceState>>;

#[derive(Default)]
struct Timers {
    announce: Option<Instant>,
    sync: Option<Instant>,
    delay_req: Option<Instant>,
    announce_receipt: Option<Instant>,
    filter_update: Option<Instant>,
}

struct PendingStamp {
    id: u32,
    context: TimestampContext,
    deadline: Instant,
}

/// Everything around the port: sockets, timers, stamps awaited, the status.
struct Io {
    event: TimestampedSocket,
    general: TimestampedSocket,
    timers: Timers,
    pending: VecDeque<PendingStamp>,
    status: Arc<PtpStatus>,
    /// Drop every send (see [`Role::never_master`]).
    mute: bool,
}

impl Io {
    fn apply(&mut self, actions: PortActionIterator<'_>) {
        let now = Instant::now();
        for action in actions {
            match action {
                PortAction::SendEvent { .. } | PortAction::SendGeneral { .. } if self.mute => {}
                PortAction::SendEvent { context, data, .. } => match self.event.send(data) {
                    Ok(id) => self.pending.push_back(PendingStamp {
                        id,
                        context,
                        deadline: now + TX_STAMP_TIMEOUT,
                    }),
                    Err(e) => {
                        self.status.count_socket_error();
                        tracing::warn!(error = %e, "PTP: sending an event message failed");
                    }
                },
                PortAction::SendGeneral { data, .. } => {
                    if let Err(e) = self.general.send(data) {
                        self.status.count_socket_error();
                        tracing::warn!(error = %e, "PTP: sending a general message failed");
                    }
                }
                PortAction::ResetAnnounceTimer { duration } => {
                    self.timers.announce = Some(now + duration)
                }
                PortAction::ResetSyncTimer { duration } => self.timers.sync = Some(now + duration),
                PortAction::ResetDelayRequestTimer { duration } => {
                    self.timers.delay_req = Some(now + duration)
                }
                PortAction::ResetAnnounceReceiptTimer { duration } => {
                    self.timers.announce_receipt = Some(now + duration)
                }
                PortAction::ResetFilterUpdateTimer { duration } => {
                    self.timers.filter_update = Some(now + duration)
                }
                // One port: there is no other port to forward TLVs to.
                PortAction::ForwardTLV { .. } => {}
            }
        }
    }

    fn take_pending(&mut self, id: u32) -> Option<TimestampContext> {
        let pos = self.pending.iter().position(|p| p.id == id)?;
        self.pending.remove(pos).map(|p| p.context)
    }
}

/// Lock detection and statistics of a slave.
struct LockTracker {
    /// When the current settling period began (start, step, or master regained).
    settle_start: Option<std::time::Instant>,
    good: u32,
    steps_seen: u64,
    mean_square: f64,
}

impl LockTracker {
    fn new() -> Self {
        LockTracker {
            settle_start: None,
            good: 0,
            steps_seen: 0,
            mean_square: 0.0,
        }
    }

    /// Takes the servo's estimate after a measurement at `now` and updates `status` (and the
    /// clock's locked flag).
    fn sample(
        &mut self,
        now: std::time::Instant,
        offset_ns: i64,
        delay_ns: i64,
        status: &PtpStatus,
        clock: &ClusterClock,
    ) {
        status.offset_ns.store(offset_ns, Ordering::Relaxed);
        status.path_delay_ns.store(delay_ns, Ordering::Relaxed);
        status.measurements.fetch_add(1, Ordering::Relaxed);
        let o = offset_ns as f64;
        self.mean_square += (o * o - self.mean_square) / 16.0;
        status
            .jitter_ns
            .store(self.mean_square.sqrt().round() as i64, Ordering::Relaxed);
        let steps = status.steps();
        if steps != self.steps_seen {
            // Right after a step the estimate is near zero whatever the frequency error:
            // start over.
            self.steps_seen = steps;
            self.settle_start = Some(now);
            self.mean_square = 0.0;
        }
        let settle_start = *self.settle_start.get_or_insert(now);
        if now.duration_since(settle_start) < LOCK_SETTLE_TIME {
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

    fn lost(&mut self, status: &PtpStatus, clock: &ClusterClock) {
        self.good = 0;
        self.settle_start = None;
        self.set(false, status, clock);
    }

    fn set(&self, locked: bool, status: &PtpStatus, clock: &ClusterClock) {
        if status.locked.swap(locked, Ordering::Relaxed) != locked {
            if locked {
                tracing::info!(
                    offset_ns = status.offset_ns(),
                    delay_ns = status.path_delay_ns(),
                    "PTP slave locked"
                );
            } else {
                tracing::info!("PTP slave unlocked");
            }
        }
        clock.set_locked(locked);
    }
}

/// Checks the common header enough that statime gets only plausible PTPv2 messages, and tells
/// our own looped-back messages apart. Returns the message type.
fn classify(data: &[u8], own: &ClockIdentity) -> Result<Option<u8>, ()> {
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

const MSG_SYNC: u8 = 0x0;
/// twoStepFlag, in the first flag byte (offset 6) of the header.
const FLAG_TWO_STEP: u8 = 0x02;
const MSG_FOLLOW_UP: u8 = 0x8;
const MSG_DELAY_RESP: u8 = 0x9;

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn run<C: Clock + Send>(
    cfg: PtpConfig,
    role: Role,
    model: Arc<ClusterClock>,
    adapter: C,
    rng: SmallRng,
    status: Arc<PtpStatus>,
    shutdown: CancellationToken,
) -> Result<(), PtpError> {
    let iface = cfg.scope.multicast_if();
    let event = TimestampedSocket::open(PTP_PRIMARY_GROUP, cfg.event_port, iface, true).map_err(
        |source| PtpError::Socket {
            port: cfg.event_port,
            source,
        },
    )?;
    let general = TimestampedSocket::open(PTP_PRIMARY_GROUP, cfg.general_port, iface, false)
        .map_err(|source| PtpError::Socket {
            port: cfg.general_port,
            source,
        })?;
    let own = role.instance.clock_identity;
    tracing::info!(
        identity = %own,
        event_port = cfg.event_port,
        general_port = cfg.general_port,
        interface = %iface,
        grandmaster = role.master_only,
        "PTP started"
    );

    let instance = PtpInstance::<KalmanFilter, RwLock<PtpInstanceState>>::new(
        role.instance,
        tai_time_properties(),
    );
    let port_config = PortConfig {
        acceptable_master_list: AcceptAnyMaster,
        delay_mechanism: DelayMechanism::E2E {
            interval: Interval::from_log_2(LOG_DELAY_REQ_INTERVAL),
        },
        announce_interval: Interval::from_log_2(LOG_ANNOUNCE_INTERVAL),
        announce_receipt_timeout: ANNOUNCE_RECEIPT_TIMEOUT,
        sync_interval: Interval::from_log_2(LOG_SYNC_INTERVAL),
        master_only: role.master_only,
        delay_asymmetry: statime::time::Duration::ZERO,
        minor_ptp_version: PtpMinorVersion::One,
    };
    let port = instance.add_port(port_config, KalmanConfiguration::default(), adapter, rng);
    let (mut port, first) = port.end_bmca();

    let mut io = Io {
        event,
        general,
        timers: Timers::default(),
        pending: VecDeque::new(),
        status: status.clone(),
        mute: false,
    };
    io.apply(first);
    let mut lock = LockTracker::new();
    let mut bmca = tokio::time::interval(instance.bmca_interval());
    bmca.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ebuf = [0u8; 2048];
    let mut gbuf = [0u8; 2048];

    loop {
        // What happened, and whether it may have produced an offset measurement.
        // A node whose grandmaster is gone lets statime call itself master (its clock
        // free-runs, which is right) but sends nothing, so no node ever serves time.
        io.mute = role.never_master && port.is_master();
        let measured = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = io.event.recv_tx_stamp(), if !io.pending.is_empty() => {
                match r {
                    Ok(stamp) => {
                        if let Some(ctx) = io.take_pending(stamp.id) {
                            let t = to_ptp_time(model.to_cluster(stamp.local_ns));
                            let actions = port.handle_send_timestamp(ctx, t);
                            io.apply(actions);
                        }
                    }
                    Err(e) => {
                        status.count_socket_error();
                        tracing::warn!(error = %e, "PTP: reading transmit stamps failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                false
            }
            r = io.event.recv(&mut ebuf) => match r {
                Ok(got) => match classify(&ebuf[..got.len], &own) {
                    Err(()) => {
                        status.malformed.fetch_add(1, Ordering::Relaxed);
                        false
                    }
                    Ok(None) => false,
                    Ok(Some(kind)) => match got.local_ns {
                        Some(local) => {
                            let t = to_ptp_time(model.to_cluster(local));
                            let actions = port.handle_event_receive(&ebuf[..got.len], t);
                            io.apply(actions);
                            // A two-step Sync measures nothing until its Follow_Up.
                            kind == MSG_SYNC && ebuf[6] & FLAG_TWO_STEP == 0
                        }
                        None => {
                            status.count_socket_error();
                            tracing::warn!("PTP: event message without a kernel timestamp");
                            false
                        }
                    },
                },
                Err(e) => {
                    status.count_socket_error();
                    tracing::warn!(error = %e, "PTP: receiving on the event port failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    false
                }
            },
            r = io.general.recv(&mut gbuf) => match r {
                Ok(got) => match classify(&gbuf[..got.len], &own) {
                    Err(()) => {
                        status.malformed.fetch_add(1, Ordering::Relaxed);
                        false
                    }
                    Ok(None) => false,
                    Ok(Some(kind)) => {
                        let actions = port.handle_general_receive(&gbuf[..got.len]);
                        io.apply(actions);
                        kind == MSG_FOLLOW_UP || kind == MSG_DELAY_RESP
                    }
                },
                Err(e) => {
                    status.count_socket_error();
                    tracing::warn!(error = %e, "PTP: receiving on the general port failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    false
                }
            },
            _ = sleep_until_opt(io.pending.front().map(|p| p.deadline)) => {
                if let Some(p) = io.pending.pop_front() {
                    status.count_socket_error();
                    tracing::warn!(id = p.id, "PTP: no transmit stamp for an event message");
                }
                false
            }
            _ = sleep_until_opt(io.timers.sync) => {
                io.timers.sync = None;
                let actions = port.handle_sync_timer();
                io.apply(actions);
                false
            }
            _ = sleep_until_opt(io.timers.delay_req) => {
                io.timers.delay_req = None;
                let actions = port.handle_delay_request_timer();
                io.apply(actions);
                false
            }
            _ = sleep_until_opt(io.timers.announce) => {
                io.timers.announce = None;
                let actions = port.handle_announce_timer(&mut NoForwardedTLVs);
                io.apply(actions);
                false
            }
            _ = sleep_until_opt(io.timers.announce_receipt) => {
                io.timers.announce_receipt = None;
                let actions = port.handle_announce_receipt_timer();
                io.apply(actions);
                false
            }
            _ = sleep_until_opt(io.timers.filter_update) => {
                io.timers.filter_update = None;
                let actions = port.handle_filter_update_timer();
                io.apply(actions);
                false
            }
            _ = bmca.tick() => {
                let mut in_bmca = port.start_bmca();
                instance.bmca(&mut [&mut in_bmca]);
                let (running, actions) = in_bmca.end_bmca();
                port = running;
                io.apply(actions);
                false
            }
        };
        report(&port, role, measured, &mut lock, &status, &model);
    }
    status.set_state(PtpPortState::Initializing);
    tracing::info!(identity = %own, "PTP stopped");
    Ok(())
}

fn report<C: Clock>(
    port: &PtpPort<'_, C>,
    role: Role,
    measured: bool,
    lock: &mut LockTracker,
    status: &PtpStatus,
    model: &ClusterClock,
) {
    let state = match PtpPortState::from_statime(port.port_ds().port_state) {
        // A muted node is a listener, whatever statime calls it.
        PtpPortState::Master if role.never_master => PtpPortState::Listening,
        s => s,
    };
    status.set_state(state);
    if !role.steering {
        return;
    }
    match port.port_current_ds_contribution() {
        Some(estimate) if measured => {
            let offset = estimate.offset_from_master.nanos_rounded();
            let delay = estimate.mean_delay.nanos_rounded();
            let clamp = |v: i128| v.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
            lock.sample(
                std::time::Instant::now(),
                clamp(offset),
                clamp(delay),
                status,
                model,
            );
        }
        Some(_) => {}
        None => {
            if status.is_locked() {
                tracing::warn!("PTP slave lost its master; the cluster clock free-runs");
            }
            lock.lost(status, model);
        }
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
        let t0 = std::time::Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Good estimates during the settling time do not count.
        for i in 0..20 {
            lock.sample(ms(i * 50), 1_000, 5_000, &status, &clock);
        }
        assert!(!status.is_locked());
        let after = LOCK_SETTLE_TIME.as_millis() as u64;
        for i in 0..LOCK_SAMPLES as u64 - 1 {
            lock.sample(ms(after + i), 1_000, 5_000, &status, &clock);
        }
        assert!(!status.is_locked());
        lock.sample(ms(after + 100), 1_000, 5_000, &status, &clock);
        assert!(status.is_locked() && clock.is_locked());
        lock.sample(ms(after + 101), 50_000, 5_000, &status, &clock);
        assert!(
            status.is_locked(),
            "hysteresis: a middling sample keeps the lock"
        );
        lock.sample(ms(after + 102), 150_000, 5_000, &status, &clock);
        assert!(!status.is_locked(), "a large offset unlocks");
        for i in 0..LOCK_SAMPLES as u64 {
            lock.sample(ms(after + 200 + i), 1_000, 5_000, &status, &clock);
        }
        assert!(status.is_locked());
        // A step starts settling again.
        status.record_step();
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
        lock.lost(&status, &clock);
        assert!(!status.is_locked() && !clock.is_locked());
        assert_eq!(status.measurements(), 40 + 3 * LOCK_SAMPLES as u64 + 2);
    }

    #[test]
    fn port_state_round_trips() {
        for s in [
            PtpPortState::Initializing,
            PtpPortState::Listening,
            PtpPortState::Master,
            PtpPortState::Slave,
            PtpPortState::Passive,
            PtpPortState::Faulty,
        ] {
            assert_eq!(PtpPortState::from_u8(s.to_u8()), s);
        }
    }

    #[test]
    fn timescale_is_tai() {
        let p = tai_time_properties();
        assert!(p.is_ptp());
        assert_eq!(p.utc_offset(), Some(37));
    }
}
