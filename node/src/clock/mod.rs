//! The node's view of cluster time.
//!
//! Nobody steers a node's system clock. Each process keeps a [`ClusterClock`], a model
//! `cluster = anchor_cluster + (local − anchor_local) × (1 + rate)` over its local clock, and
//! the PTP slave ([`ptp`]) disciplines the model. The local clock is `CLOCK_REALTIME`, the clock
//! the kernel stamps PTP packets with (SO_TIMESTAMPING software stamps), so packet timestamps
//! and `now()` are on the same base. On the grandmaster the model is the identity plus the
//! TAI−UTC offset ([`TAI_OFFSET_NS`]): cluster time is the PTP (TAI) timescale.
//!
//! Reads are wait-free (a sequence lock over atomics) so the audio callback may call
//! [`ClusterClock::now`]; writes come from one thread at a time (the PTP task).

pub mod audio;
pub mod ptp;

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use voicemesh_protocol::ClusterTime;

/// TAI − UTC in nanoseconds (37 s since 2017). PTP's timescale is TAI; kernel timestamps are
/// UTC (`CLOCK_REALTIME`).
pub const TAI_OFFSET_NS: u64 = 37_000_000_000;

/// Nanoseconds of `CLOCK_REALTIME`, the local clock every [`ClusterClock`] is a model over.
pub fn local_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_REALTIME always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A source of local time in nanoseconds: the clock a [`ClusterClock`] model is read over.
/// [`Realtime`] in the product; the PTP simulation gives each simulated node its own drifting
/// oscillator.
pub trait LocalClock {
    /// Local time now, ns.
    fn now_ns(&self) -> u64;
}

/// `CLOCK_REALTIME`, the local clock of every real node (see [`local_now_ns`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Realtime;

impl LocalClock for Realtime {
    fn now_ns(&self) -> u64 {
        local_now_ns()
    }
}

/// A snapshot of the clock model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClockModel {
    /// A local time …
    pub anchor_local: u64,
    /// … and the cluster time it maps to.
    pub anchor_cluster: ClusterTime,
    /// Fractional rate correction: cluster time advances `1 + rate` ns per local ns.
    pub rate: f64,
}

impl ClockModel {
    /// Cluster time at local time `local_ns`.
    pub fn to_cluster(&self, local_ns: u64) -> ClusterTime {
        let dl = local_ns as i128 - self.anchor_local as i128;
        let dc = dl as f64 * (1.0 + self.rate);
        self.anchor_cluster.add_nanos(dc.round() as i64)
    }

    /// Local time at which the cluster time is `t`.
    pub fn to_local(&self, t: ClusterTime) -> u64 {
        let dc = t.nanos_since(self.anchor_cluster) as f64;
        let dl = dc / (1.0 + self.rate);
        self.anchor_local.saturating_add_signed(dl.round() as i64)
    }
}

/// Lock-free, shareable cluster clock. See the module docs.
#[derive(Debug)]
pub struct ClusterClock {
    seq: AtomicU64,
    anchor_local: AtomicU64,
    anchor_cluster: AtomicU64,
    rate_bits: AtomicU64,
    locked: AtomicBool,
}

impl ClusterClock {
    /// A clock that starts as the local clock plus the TAI offset, not yet locked: the
    /// grandmaster's clock, and a node's first guess before PTP has spoken.
    pub fn new() -> Self {
        let now = local_now_ns();
        ClusterClock::from_model(ClockModel {
            anchor_local: now,
            anchor_cluster: ClusterTime(now + TAI_OFFSET_NS),
            rate: 0.0,
        })
    }

    /// A clock that starts with model `m`, not locked.
    pub fn from_model(m: ClockModel) -> Self {
        ClusterClock {
            seq: AtomicU64::new(0),
            anchor_local: AtomicU64::new(m.anchor_local),
            anchor_cluster: AtomicU64::new(m.anchor_cluster.0),
            rate_bits: AtomicU64::new(m.rate.to_bits()),
            locked: AtomicBool::new(false),
        }
    }

    /// A clock started deliberately wrong: `offset_ns` ahead of [`ClusterClock::new`]'s guess
    /// and running `rate_ppm` parts per million fast (negative: behind, slow). Tests and
    /// `voicemesh node --test-clock-offset-ms/--test-clock-rate-ppm` use it to show that PTP
    /// pulls a node in from a known error; the PTP slave takes the model's rate at start as
    /// its free-running base, so the error persists until the servo has measured it.
    pub fn with_error(offset_ns: i64, rate_ppm: f64) -> Self {
        let c = ClusterClock::new();
        let m = c.model();
        c.set_model(ClockModel {
            anchor_local: m.anchor_local,
            anchor_cluster: m.anchor_cluster.add_nanos(offset_ns),
            rate: rate_ppm * 1e-6,
        });
        c
    }

    /// The current model (wait-free; retries only while a writer is mid-update).
    pub fn model(&self) -> ClockModel {
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                core::hint::spin_loop();
                continue;
            }
            let m = ClockModel {
                anchor_local: self.anchor_local.load(Ordering::Relaxed),
                anchor_cluster: ClusterTime(self.anchor_cluster.load(Ordering::Relaxed)),
                rate: f64::from_bits(self.rate_bits.load(Ordering::Relaxed)),
            };
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return m;
            }
        }
    }

    /// Replaces the model. One writer at a time.
    pub fn set_model(&self, m: ClockModel) {
        let s = self.seq.fetch_add(1, Ordering::AcqRel);
        fence(Ordering::Release);
        self.anchor_local.store(m.anchor_local, Ordering::Relaxed);
        self.anchor_cluster
            .store(m.anchor_cluster.0, Ordering::Relaxed);
        self.rate_bits.store(m.rate.to_bits(), Ordering::Relaxed);
        self.seq.store(s + 2, Ordering::Release);
    }

    /// Cluster time now.
    pub fn now(&self) -> ClusterTime {
        self.model().to_cluster(local_now_ns())
    }

    /// Cluster time at local time `local_ns`.
    pub fn to_cluster(&self, local_ns: u64) -> ClusterTime {
        self.model().to_cluster(local_ns)
    }

    /// Moves cluster time by `offset_ns` at once (a step), keeping the rate.
    pub fn step(&self, offset_ns: i64) {
        self.step_at(local_now_ns(), offset_ns)
    }

    /// [`ClusterClock::step`], with the local time of the step given.
    pub fn step_at(&self, now: u64, offset_ns: i64) {
        let m = self.model();
        self.set_model(ClockModel {
            anchor_local: now,
            anchor_cluster: m.to_cluster(now).add_nanos(offset_ns),
            rate: m.rate,
        });
    }

    /// Sets the rate correction from now on, without a jump in cluster time.
    pub fn set_rate(&self, rate: f64) {
        self.set_rate_at(local_now_ns(), rate)
    }

    /// [`ClusterClock::set_rate`], with the local time of the change given.
    pub fn set_rate_at(&self, now: u64, rate: f64) {
        let m = self.model();
        self.set_model(ClockModel {
            anchor_local: now,
            anchor_cluster: m.to_cluster(now),
            rate,
        });
    }

    /// Whether a PTP slave has synchronised this clock to a grandmaster.
    pub fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }

    /// Marks the clock synchronised (or not).
    pub fn set_locked(&self, locked: bool) {
        self.locked.store(locked, Ordering::Relaxed);
    }
}

impl Default for ClusterClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_maps_both_ways() {
        let m = ClockModel {
            anchor_local: 1_000_000,
            anchor_cluster: ClusterTime(5_000_000),
            rate: 50e-6,
        };
        assert_eq!(m.to_cluster(1_000_000), ClusterTime(5_000_000));
        assert_eq!(m.to_cluster(2_000_000), ClusterTime(6_000_050));
        assert_eq!(m.to_local(ClusterTime(6_000_050)), 2_000_000);
    }

    #[test]
    fn step_and_rate_keep_continuity() {
        let c = ClusterClock::new();
        let before = c.now();
        c.step(10_000_000);
        let after = c.now();
        assert!(after.nanos_since(before) >= 10_000_000);
        let t1 = c.now();
        c.set_rate(100e-6);
        let t2 = c.now();
        assert!(t2 >= t1, "rate change must not move time backwards");
        assert!(t2.nanos_since(t1) < 1_000_000);
    }

    #[test]
    fn clock_with_error_is_off_by_offset_and_rate() {
        let c = ClusterClock::with_error(-3_000_000, 50.0);
        let m = c.model();
        // At its anchor the model is exactly 3 ms behind local + TAI offset.
        let d = m.anchor_cluster.as_nanos() as i128 - (m.anchor_local + TAI_OFFSET_NS) as i128;
        assert_eq!(d, -3_000_000);
        assert!((c.model().rate - 50e-6).abs() < 1e-15);
        assert!(!c.is_locked());
    }

    #[test]
    fn grandmaster_clock_is_tai() {
        let c = ClusterClock::new();
        let d = c.now().as_nanos() as i128 - local_now_ns() as i128;
        assert!((d - TAI_OFFSET_NS as i128).abs() < 1_000_000);
    }
}
