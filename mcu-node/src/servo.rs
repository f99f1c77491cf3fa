//! The clock servo: the node's model of cluster time over its own free-running clock.
//!
//! `cluster(l) = base_cluster + (l − base_local) · (1 + rate)`. Samples are pairs (local time,
//! cluster time at that instant) from the coordinator: preferably from a `TimeSync` exchange,
//! whose round trip cancels the network delay (`cluster = transmit + delay / 2`), otherwise from
//! the coordinator's heartbeats (one-way, so late by the one-way delay). Each sample's phase
//! error drives a PI loop: a quarter of the error goes into the phase, a share of the error
//! rate into the frequency. An error over [`STEP_NS`] (or the threshold given to
//! [`ClockServo::with_thresholds`]) steps the clock instead (start-up, or a
//! coordinator whose time jumped). Samples whose round trip is much longer than the recent
//! minimum are dropped: on a LAN those are the queued ones, and their error is mostly queueing.
//!
//! Why our own servo and not statime: statime is a PTP stack (BMCA, Sync/Follow_Up/Delay_Req on
//! ports 319/320, its own message formats) and needs PTP event messages with hardware or
//! kernel timestamps to shine. The MCU session already has a datagram path to the coordinator
//! and a 100 ms heartbeat; a two-timestamp exchange on it with a PI loop reaches tens of
//! microseconds on a LAN, which is far below what CV needs (a DAC write alone is ~95 µs), at
//! a few hundred bytes of code. The servo is tested under ±100 ppm drift and jitter
//! (tests/servo.rs).

use voicemesh_protocol::ClusterTime;

use crate::LocalTime;

/// A phase error larger than this steps the clock instead of slewing it (the default; see
/// [`ClockServo::with_thresholds`]).
pub const STEP_NS: i64 = 1_000_000;
/// Frequency corrections are clamped to ± this many parts per billion (±500 ppm).
pub const MAX_RATE_PPB: i64 = 500_000;
/// Samples before the servo may call itself locked.
const LOCK_SAMPLES: u32 = 8;
/// A locked servo's smoothed error must stay under this (the default).
pub const LOCK_ERROR_NS: i64 = 200_000;
/// Round-trip samples kept for the minimum-delay filter.
const DELAY_HISTORY: usize = 8;

/// Disciplines a local clock to cluster time. See the module docs.
#[derive(Clone, Debug)]
pub struct ClockServo {
    step_ns: i64,
    lock_error_ns: i64,
    started: bool,
    base_local: u64,
    base_cluster: i128,
    rate_ppb: i64,
    /// Sub-ppb remainder of the frequency integrator, in ppb / 1024.
    rate_frac: i64,
    last_sample_local: u64,
    samples: u32,
    steps: u32,
    dropped: u32,
    last_error_ns: i64,
    smoothed_abs_error_ns: i64,
    delays: [u64; DELAY_HISTORY],
    delay_count: usize,
    /// A round trip was used: one-way samples (biased by the path delay) started the clock,
    /// the first round trip re-starts it.
    two_way: bool,
}

impl Default for ClockServo {
    fn default() -> Self {
        Self::new()
    }
}

impl ClockServo {
    /// A servo with no sample yet: cluster time equals local time until the first one.
    pub const fn new() -> Self {
        Self::with_thresholds(STEP_NS, LOCK_ERROR_NS)
    }

    /// A servo that steps on phase errors over `step_ns` and calls itself locked while its
    /// smoothed error stays under `lock_error_ns` — for a link whose delays jitter by more
    /// than the defaults allow (an emulated board: QEMU's vCPU and I/O threads share the
    /// host's cores, so a sample now and then is late by milliseconds).
    pub const fn with_thresholds(step_ns: i64, lock_error_ns: i64) -> Self {
        ClockServo {
            step_ns,
            lock_error_ns,
            started: false,
            base_local: 0,
            base_cluster: 0,
            rate_ppb: 0,
            rate_frac: 0,
            last_sample_local: 0,
            samples: 0,
            steps: 0,
            dropped: 0,
            last_error_ns: 0,
            smoothed_abs_error_ns: i64::MAX,
            delays: [u64::MAX; DELAY_HISTORY],
            delay_count: 0,
            two_way: false,
        }
    }

    /// Whether any sample arrived.
    pub const fn started(&self) -> bool {
        self.started
    }

    /// Whether the servo has converged: enough samples since the last step and a small error.
    pub const fn locked(&self) -> bool {
        self.started
            && self.samples >= LOCK_SAMPLES
            && self.smoothed_abs_error_ns < self.lock_error_ns
    }

    /// The phase error of the last sample (cluster − model), ns.
    pub const fn last_error_ns(&self) -> i64 {
        self.last_error_ns
    }

    /// The current frequency correction, parts per billion.
    pub const fn rate_ppb(&self) -> i64 {
        self.rate_ppb
    }

    /// Times the clock was stepped.
    pub const fn steps(&self) -> u32 {
        self.steps
    }

    /// Samples dropped by the delay filter.
    pub const fn dropped(&self) -> u32 {
        self.dropped
    }

    /// Cluster time at local time `l`.
    pub fn cluster(&self, l: LocalTime) -> ClusterTime {
        if !self.started {
            return ClusterTime(l.0);
        }
        let dl = l.0 as i128 - self.base_local as i128;
        let c = self.base_cluster + dl + dl * self.rate_ppb as i128 / 1_000_000_000;
        ClusterTime(c.clamp(0, u64::MAX as i128) as u64)
    }

    /// The local time at which cluster time will be `c` (the inverse of [`Self::cluster`]).
    pub fn local(&self, c: ClusterTime) -> LocalTime {
        if !self.started {
            return LocalTime(c.0);
        }
        let dc = c.0 as i128 - self.base_cluster;
        let dl = dc * 1_000_000_000 / (1_000_000_000 + self.rate_ppb as i128);
        LocalTime((self.base_local as i128 + dl).clamp(0, u64::MAX as i128) as u64)
    }

    /// A one-way sample: the coordinator's clock read `cluster` when it sent what arrived at
    /// local time `local`.
    pub fn handle_one_way(&mut self, local: LocalTime, cluster: ClusterTime) {
        self.sample(local, cluster.0 as i128);
    }

    /// A round trip: request sent at local `origin`, answered by the coordinator (`receive`,
    /// `transmit` in cluster time), answer received at local `now`. Returns whether it was
    /// used.
    pub fn handle_round_trip(
        &mut self,
        origin: LocalTime,
        receive: ClusterTime,
        transmit: ClusterTime,
        now: LocalTime,
    ) -> bool {
        let rtt = now.0 as i128 - origin.0 as i128;
        let held = transmit.0 as i128 - receive.0 as i128;
        let delay = rtt - held;
        if rtt < 0 || held < 0 || delay < 0 || rtt > 1_000_000_000 {
            self.dropped += 1;
            return false;
        }
        let delay = delay as u64;
        self.delays[self.delay_count % DELAY_HISTORY] = delay;
        self.delay_count += 1;
        let min = self.delays.iter().copied().min().unwrap_or(delay);
        // Keep samples within 2 × the recent minimum plus 50 µs; drop the queued ones.
        if self.started && delay > min.saturating_mul(2).saturating_add(50_000) {
            self.dropped += 1;
            return false;
        }
        if !self.two_way {
            // Start over from the first unbiased sample rather than slew a one-way bias
            // through the frequency integrator.
            self.two_way = true;
            self.started = false;
            self.rate_ppb = 0;
            self.rate_frac = 0;
        }
        self.sample(now, transmit.0 as i128 + (delay / 2) as i128);
        true
    }

    fn sample(&mut self, local: LocalTime, cluster: i128) {
        let model = self.cluster(local).0 as i128;
        let err = cluster - model;
        if !self.started || err.abs() > self.step_ns as i128 {
            if self.started {
                self.steps += 1;
            }
            self.started = true;
            self.base_local = local.0;
            self.base_cluster = cluster;
            self.last_sample_local = local.0;
            self.samples = 0;
            self.last_error_ns = 0;
            self.smoothed_abs_error_ns = i64::MAX;
            return;
        }
        let err = err as i64;
        let dt = local
            .0
            .saturating_sub(self.last_sample_local)
            .max(1_000_000) as i128;
        // Gains: fast while acquiring, then gentler so jitter averages out.
        // (Each stage has a damping ratio of about 0.7: kp = 2 · 0.7 · √ki.)
        let (kp_shift, ki_div) = match self.samples {
            0..16 => (1, 4),
            16..64 => (2, 32),
            _ => (3, 128),
        };
        // Rebase the model at this sample, moving the phase by a share of the error.
        self.base_cluster = model + (err >> kp_shift) as i128;
        self.base_local = local.0;
        // Frequency: the error rate (err / dt, in ppb), integrated with gain 1 / ki_div, in
        // 1/1024 ppb so small corrections are not lost to rounding.
        let d = (err as i128 * 1_000_000_000 * 1024 / dt / ki_div) as i64;
        self.rate_frac = self.rate_frac.saturating_add(d);
        let whole = self.rate_frac / 1024;
        self.rate_frac -= whole * 1024;
        self.rate_ppb = (self.rate_ppb + whole).clamp(-MAX_RATE_PPB, MAX_RATE_PPB);
        self.last_sample_local = local.0;
        self.samples = self.samples.saturating_add(1);
        self.last_error_ns = err;
        let abs = err.abs();
        self.smoothed_abs_error_ns = if self.smoothed_abs_error_ns == i64::MAX {
            abs
        } else {
            self.smoothed_abs_error_ns + (abs - self.smoothed_abs_error_ns) / 8
        };
    }
}
