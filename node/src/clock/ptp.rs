//! PTP glue (statime): the grandmaster on the coordinator, a slave on every node.
//!
//! statime is sans-IO: a [`PtpInstance`](statime::PtpInstance) with one port takes packets, transmit stamps and timer
//! expiries through `handle_*` calls and answers with actions (send this, reset that timer).
//! [`port::PtpCore`] wraps the port with its timers, the BMCA schedule (every
//! `bmca_interval`: `start_bmca` → `instance.bmca` → `end_bmca`), lock and holdover tracking,
//! and is itself sans-IO, so the same code runs here and in the deterministic simulation
//! ([`sim`]). This module is the IO around it, one tokio task per role:
//!
//! 1. open two [`socket::TimestampedSocket`]s on the PTP group 224.0.1.129, event and general
//!    port, on the scope's multicast interface, kernel software timestamps on;
//! 2. create the instance and the core;
//! 3. loop until shutdown: a received event message goes to the core with its kernel receive
//!    stamp, a general one without, a transmit stamp from the error queue with the context its
//!    send left, and the core's timeout when it comes; after each, what the core wants sent is
//!    sent.
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
//! rate learnt: the servo state is then [`ServoState::Holdover`], in the status and the log.
//! (statime's own `slave_only` is not used: its BMCA trips a debug assertion when a slave-only
//! port loses its master.)
//!
//! Bad input never stops the task: a malformed datagram is dropped and counted in
//! [`PtpStatus::malformed`], socket errors are logged and counted.

pub mod clocks;
pub mod port;
pub mod probe;
pub mod sim;
pub mod socket;

use self::clocks::{ReferenceClock, SteeredClock};
use self::port::{Channel, PtpCore, Role};
use self::socket::{PTP_PRIMARY_GROUP, TimestampedSocket};
use super::ClusterClock;
use crate::net::NetScope;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use statime::Clock;
use statime::config::{ClockIdentity, LeapIndicator, TimePropertiesDS, TimeSource};
use statime::observability::port::PortState as StatimePortState;
use statime::port::TimestampContext;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
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

pub(crate) const fn ns_of(d: Duration) -> u64 {
    d.as_secs() * 1_000_000_000 + d.subsec_nanos() as u64
}

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

    pub(crate) fn from_statime(s: StatimePortState) -> Self {
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

/// What a slave's servo is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServoState {
    /// No master followed yet (or the grandmaster, which steers nothing).
    Unlocked,
    /// Following a master, not yet within [`LOCK_THRESHOLD_NS`] for long enough.
    Locking,
    /// Following a master, offset within [`LOCK_THRESHOLD_NS`].
    Locked,
    /// The master is gone: the clock free-runs at the last rate learnt.
    Holdover,
}

impl ServoState {
    /// The name used in logs and the HTTP API.
    pub const fn as_str(self) -> &'static str {
        match self {
            ServoState::Unlocked => "unlocked",
            ServoState::Locking => "locking",
            ServoState::Locked => "locked",
            ServoState::Holdover => "holdover",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => ServoState::Locking,
            2 => ServoState::Locked,
            3 => ServoState::Holdover,
            _ => ServoState::Unlocked,
        }
    }

    /// The wire form ([`voicemesh_protocol::ClockState`]).
    pub fn to_wire(self) -> voicemesh_protocol::ClockState {
        match self {
            ServoState::Unlocked => voicemesh_protocol::ClockState::Unlocked,
            ServoState::Locking => voicemesh_protocol::ClockState::Locking,
            ServoState::Locked => voicemesh_protocol::ClockState::Locked,
            ServoState::Holdover => voicemesh_protocol::ClockState::Holdover,
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
    servo: AtomicU8,
    steps: AtomicU64,
    last_step_ns: AtomicI64,
    rebase: AtomicBool,
    bmca_runs: AtomicU64,
    stale: AtomicU64,
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
    /// What the servo is doing (slaves; the grandmaster stays [`ServoState::Unlocked`]).
    pub fn servo_state(&self) -> ServoState {
        ServoState::from_u8(self.servo.load(Ordering::Relaxed))
    }
    /// The size of the last step, ns (0: never stepped).
    pub fn last_step_ns(&self) -> i64 {
        self.last_step_ns.load(Ordering::Relaxed)
    }
    /// Follow_Ups and Delay_Resps dropped because their measurement straddled a clock step.
    pub fn stale_dropped(&self) -> u64 {
        self.stale.load(Ordering::Relaxed)
    }
    /// How many times the BMCA ran.
    pub fn bmca_runs(&self) -> u64 {
        self.bmca_runs.load(Ordering::Relaxed)
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

    /// The PTP fields of a protocol [`voicemesh_protocol::Status`] (the others default).
    pub fn wire_status(&self) -> voicemesh_protocol::Status {
        voicemesh_protocol::Status {
            clock_offset_ns: self.offset_ns(),
            clock_locked: self.is_locked(),
            clock_state: self.servo_state().to_wire(),
            clock_path_delay_ns: self.path_delay_ns(),
            clock_rate_ppb: self.rate_ppb(),
            clock_jitter_ns: self.jitter_ns(),
            clock_steps: self.steps().min(u64::from(u32::MAX)) as u32,
            ..Default::default()
        }
    }

    pub(crate) fn record_step(&self, step_ns: i64) {
        self.last_step_ns.store(step_ns, Ordering::Relaxed);
        self.steps.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_measurement(&self, offset_ns: i64, delay_ns: i64) {
        self.offset_ns.store(offset_ns, Ordering::Relaxed);
        self.path_delay_ns.store(delay_ns, Ordering::Relaxed);
        self.measurements.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_jitter(&self, jitter_ns: i64) {
        self.jitter_ns.store(jitter_ns, Ordering::Relaxed);
    }

    pub(crate) fn set_servo(&self, s: ServoState) {
        let v = match s {
            ServoState::Unlocked => 0,
            ServoState::Locking => 1,
            ServoState::Locked => 2,
            ServoState::Holdover => 3,
        };
        self.servo.store(v, Ordering::Relaxed);
    }

    pub(crate) fn locked_flag(&self, locked: bool) {
        self.locked.store(locked, Ordering::Relaxed);
    }

    /// Asks the steered clock to take its current rate as the base of the next frequency
    /// (see [`clocks::SteeredClock`]).
    pub(crate) fn request_rebase(&self) {
        self.rebase.store(true, Ordering::Relaxed);
    }

    pub(crate) fn take_rebase(&self) -> bool {
        self.rebase.swap(false, Ordering::Relaxed)
    }

    pub(crate) fn count_bmca(&self) {
        self.bmca_runs.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_stale(&self) {
        self.stale.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_malformed(&self) {
        self.malformed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_rate(&self, rate: f64) {
        self.rate_ppb
            .store((rate * 1e9).round() as i64, Ordering::Relaxed);
    }

    pub(crate) fn set_state(&self, s: PtpPortState) {
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
    let role = Role::grandmaster(random_identity(&mut rng), cfg.domain);
    let adapter = ReferenceClock::new(clock.clone());
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
    let role = Role::slave(random_identity(&mut rng), cfg.domain);
    let adapter = SteeredClock::new(clock.clone(), status.clone());
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
    status.locked_flag(false);
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
pub fn random_identity(rng: &mut SmallRng) -> ClockIdentity {
    use rand::RngCore;
    let mut id = [0u8; 8];
    rng.fill_bytes(&mut id);
    // Locally administered, unicast.
    id[0] = (id[0] | 0x02) & !0x01;
    ClockIdentity(id)
}

struct PendingStamp {
    id: u32,
    context: TimestampContext,
    deadline: Instant,
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Sends what the core wants sent; event messages wait for their transmit stamps.
fn flush<C: Clock>(
    core: &mut PtpCore<'_, C>,
    event: &mut TimestampedSocket,
    general: &mut TimestampedSocket,
    pending: &mut VecDeque<PendingStamp>,
    status: &PtpStatus,
) {
    while let Some(t) = core.poll_transmit() {
        match t.channel {
            Channel::Event => match event.send(&t.data) {
                Ok(id) => {
                    if let Some(context) = t.context {
                        pending.push_back(PendingStamp {
                            id,
                            context,
                            deadline: Instant::now() + TX_STAMP_TIMEOUT,
                        });
                    }
                }
                Err(e) => {
                    status.count_socket_error();
                    tracing::warn!(error = %e, "PTP: sending an event message failed");
                }
            },
            Channel::General => {
                if let Err(e) = general.send(&t.data) {
                    status.count_socket_error();
                    tracing::warn!(error = %e, "PTP: sending a general message failed");
                }
            }
        }
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
    let mut event = TimestampedSocket::open(PTP_PRIMARY_GROUP, cfg.event_port, iface, true)
        .map_err(|source| PtpError::Socket {
            port: cfg.event_port,
            source,
        })?;
    let mut general = TimestampedSocket::open(PTP_PRIMARY_GROUP, cfg.general_port, iface, false)
        .map_err(|source| PtpError::Socket {
            port: cfg.general_port,
            source,
        })?;
    let own = role.instance.clock_identity;
    tracing::info!(
        identity = %own,
        event_port = cfg.event_port,
        general_port = cfg.general_port,
        domain = cfg.domain,
        interface = %iface,
        grandmaster = role.master_only,
        "PTP started"
    );

    let instance = role.new_instance();
    let start = Instant::now();
    let mono = move || ns_of(Instant::now().duration_since(start));
    let mut core = PtpCore::new(&instance, role, adapter, model, rng, status.clone(), mono());
    let mut pending: VecDeque<PendingStamp> = VecDeque::new();
    flush(&mut core, &mut event, &mut general, &mut pending, &status);
    let mut ebuf = [0u8; 2048];
    let mut gbuf = [0u8; 2048];

    loop {
        let wake = start + Duration::from_nanos(core.poll_timeout());
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = event.recv_tx_stamp(), if !pending.is_empty() => match r {
                Ok(stamp) => {
                    if let Some(pos) = pending.iter().position(|p| p.id == stamp.id)
                        && let Some(p) = pending.remove(pos)
                    {
                        core.handle_send_timestamp(mono(), p.context, stamp.local_ns);
                    }
                }
                Err(e) => {
                    status.count_socket_error();
                    tracing::warn!(error = %e, "PTP: reading transmit stamps failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            r = event.recv(&mut ebuf) => match r {
                Ok(got) => match got.local_ns {
                    Some(local) => core.handle_event(mono(), &ebuf[..got.len], local),
                    None => {
                        status.count_socket_error();
                        tracing::warn!("PTP: event message without a kernel timestamp");
                    }
                },
                Err(e) => {
                    status.count_socket_error();
                    tracing::warn!(error = %e, "PTP: receiving on the event port failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            r = general.recv(&mut gbuf) => match r {
                Ok(got) => core.handle_general(mono(), &gbuf[..got.len]),
                Err(e) => {
                    status.count_socket_error();
                    tracing::warn!(error = %e, "PTP: receiving on the general port failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = sleep_until_opt(pending.front().map(|p| p.deadline)) => {
                if let Some(p) = pending.pop_front() {
                    status.count_socket_error();
                    tracing::warn!(id = p.id, "PTP: no transmit stamp for an event message");
                }
            }
            _ = tokio::time::sleep_until(wake) => core.handle_timeout(mono()),
        }
        flush(&mut core, &mut event, &mut general, &mut pending, &status);
    }
    status.set_state(PtpPortState::Initializing);
    tracing::info!(identity = %own, "PTP stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn servo_state_round_trips() {
        let status = PtpStatus::default();
        for s in [
            ServoState::Unlocked,
            ServoState::Locking,
            ServoState::Locked,
            ServoState::Holdover,
        ] {
            status.set_servo(s);
            assert_eq!(status.servo_state(), s);
        }
    }

    #[test]
    fn timescale_is_tai() {
        let p = tai_time_properties();
        assert!(p.is_ptp());
        assert_eq!(p.utc_offset(), Some(37));
    }
}
