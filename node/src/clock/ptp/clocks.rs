//! statime's view of our [`ClusterClock`]: a steerable one for slaves, a read-only one for the
//! grandmaster.

use crate::clock::ptp::PtpStatus;
use crate::clock::{ClusterClock, LocalClock, Realtime};
use statime::Clock;
use statime::config::TimePropertiesDS;
use statime::time::{Duration, Time};
use std::sync::Arc;
use voicemesh_protocol::ClusterTime;

/// A cluster time as statime's [`Time`].
pub fn to_ptp_time(t: ClusterTime) -> Time {
    Time::from_nanos(t.as_nanos())
}

/// The slave's clock: statime steers our model, never the system clock.
///
/// Frequencies from statime are relative to the rate the model had when the adapter was made
/// (the "base"), so a slave restarted after it learnt its rate keeps it, and a model started
/// off-rate stays off until the servo has measured and corrected it — as a free-running
/// oscillator would.
///
/// Holdover: when the port loses its master, statime's filter sets its best frequency estimate
/// and is replaced by a fresh one, which on its first measurement sets frequency 0 — statime's
/// "I know nothing". The PTP core then asks for a rebase ([`PtpStatus`]): the next frequency
/// is taken relative to the rate the clock free-ran at, so re-acquiring a master starts from
/// the rate learnt, not from the oscillator's raw error.
#[derive(Debug)]
pub struct SteeredClock<L: LocalClock = Realtime> {
    clock: Arc<ClusterClock>,
    local: L,
    status: Arc<PtpStatus>,
    base_rate: f64,
    properties: Option<TimePropertiesDS>,
}

impl SteeredClock<Realtime> {
    /// An adapter over `clock`, taking its current rate as the base; steps and rate changes
    /// are reported into `status`.
    pub fn new(clock: Arc<ClusterClock>, status: Arc<PtpStatus>) -> Self {
        SteeredClock::with_local(clock, Realtime, status)
    }
}

impl<L: LocalClock> SteeredClock<L> {
    /// [`SteeredClock::new`] over the local clock `local`.
    pub fn with_local(clock: Arc<ClusterClock>, local: L, status: Arc<PtpStatus>) -> Self {
        let base_rate = clock.model().rate;
        status.record_rate(base_rate);
        SteeredClock {
            clock,
            local,
            status,
            base_rate,
            properties: None,
        }
    }

    /// The timescale properties the grandmaster announced last, if any.
    pub fn properties(&self) -> Option<&TimePropertiesDS> {
        self.properties.as_ref()
    }
}

impl<L: LocalClock> Clock for SteeredClock<L> {
    type Error = core::convert::Infallible;

    fn now(&self) -> Time {
        to_ptp_time(self.clock.to_cluster(self.local.now_ns()))
    }

    fn step_clock(&mut self, offset: Duration) -> Result<Time, Self::Error> {
        let ns = offset
            .nanos_rounded()
            .clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        self.clock.step_at(self.local.now_ns(), ns);
        self.status.record_step(ns);
        tracing::info!(step_ns = ns, "PTP slave stepped the cluster clock");
        Ok(self.now())
    }

    fn set_frequency(&mut self, ppm: f64) -> Result<Time, Self::Error> {
        if self.status.take_rebase() {
            self.base_rate = self.clock.model().rate;
        }
        let rate = (1.0 + self.base_rate) * (1.0 + ppm * 1e-6) - 1.0;
        self.clock.set_rate_at(self.local.now_ns(), rate);
        self.status.record_rate(rate);
        Ok(self.now())
    }

    fn set_properties(&mut self, properties: &TimePropertiesDS) -> Result<(), Self::Error> {
        if !properties.is_ptp() {
            tracing::warn!(
                "the grandmaster announces an arbitrary timescale, not PTP (TAI): \
                 cluster time will not be TAI"
            );
        }
        self.properties = Some(*properties);
        Ok(())
    }
}

/// The grandmaster's clock: read-only. Steering it is refused (the grandmaster's port is
/// master-only, so statime never tries).
#[derive(Debug)]
pub struct ReferenceClock<L: LocalClock = Realtime> {
    clock: Arc<ClusterClock>,
    local: L,
}

/// Why the grandmaster's clock refused a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOnly;

impl ReferenceClock<Realtime> {
    /// An adapter over the coordinator's clock.
    pub fn new(clock: Arc<ClusterClock>) -> Self {
        ReferenceClock::with_local(clock, Realtime)
    }
}

impl<L: LocalClock> ReferenceClock<L> {
    /// [`ReferenceClock::new`] over the local clock `local`.
    pub fn with_local(clock: Arc<ClusterClock>, local: L) -> Self {
        ReferenceClock { clock, local }
    }
}

impl<L: LocalClock> Clock for ReferenceClock<L> {
    type Error = ReadOnly;

    fn now(&self) -> Time {
        to_ptp_time(self.clock.to_cluster(self.local.now_ns()))
    }

    fn step_clock(&mut self, _offset: Duration) -> Result<Time, Self::Error> {
        Err(ReadOnly)
    }

    fn set_frequency(&mut self, _ppm: f64) -> Result<Time, Self::Error> {
        Err(ReadOnly)
    }

    fn set_properties(&mut self, _properties: &TimePropertiesDS) -> Result<(), Self::Error> {
        Err(ReadOnly)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use statime::config::{LeapIndicator, TimeSource};

    fn ns(t: Time) -> i128 {
        t.secs() as i128 * 1_000_000_000 + t.subsec_nanos() as i128
    }

    #[test]
    fn now_is_cluster_time() {
        let c = Arc::new(ClusterClock::new());
        let a = SteeredClock::new(c.clone(), Arc::default());
        let d = ns(a.now()) - c.now().as_nanos() as i128;
        assert!(d.abs() < 1_000_000, "adapter and clock differ by {d} ns");
    }

    #[test]
    fn step_moves_the_cluster_clock() {
        let c = Arc::new(ClusterClock::new());
        let reference = ClusterClock::new();
        let mut a = SteeredClock::new(c.clone(), Arc::default());
        let before = c.now().nanos_since(reference.now());
        a.step_clock(Duration::from_millis(-5)).unwrap();
        let after = c.now().nanos_since(reference.now());
        let moved = after - before;
        assert!(
            (moved + 5_000_000).abs() < 500_000,
            "stepped by {moved} ns, wanted −5 ms"
        );
    }

    #[test]
    fn frequency_is_relative_to_the_base_rate() {
        let c = Arc::new(ClusterClock::new());
        c.set_rate(50e-6);
        let mut a = SteeredClock::new(c.clone(), Arc::default());
        a.set_frequency(0.0).unwrap();
        assert!((c.model().rate - 50e-6).abs() < 1e-12);
        a.set_frequency(-50.0).unwrap();
        assert!(c.model().rate.abs() < 1e-8, "rate {}", c.model().rate);
        a.set_frequency(10.0).unwrap();
        assert!((c.model().rate - 60e-6).abs() < 1e-8);
    }

    #[test]
    fn rebase_keeps_the_holdover_rate_for_a_fresh_filter() {
        let c = Arc::new(ClusterClock::new());
        c.set_rate(50e-6);
        let status = Arc::new(PtpStatus::default());
        let mut a = SteeredClock::new(c.clone(), status.clone());
        // The servo learnt −49 ppm; the master goes away, the clock free-runs at ≈ 1 ppm.
        a.set_frequency(-49.0).unwrap();
        let holdover = c.model().rate;
        status.request_rebase();
        // A fresh filter "knows nothing" and sets 0: the holdover rate stays.
        a.set_frequency(0.0).unwrap();
        assert!((c.model().rate - holdover).abs() < 1e-15);
        a.set_frequency(2.0).unwrap();
        assert!((c.model().rate - (holdover + 2e-6)).abs() < 1e-10);
    }

    #[test]
    fn properties_are_kept() {
        let c = Arc::new(ClusterClock::new());
        let mut a = SteeredClock::new(c, Arc::default());
        assert!(a.properties().is_none());
        let p = TimePropertiesDS::new_ptp_time(
            Some(37),
            LeapIndicator::NoLeap,
            false,
            false,
            TimeSource::InternalOscillator,
        );
        a.set_properties(&p).unwrap();
        assert_eq!(a.properties().map(|p| p.utc_offset()), Some(Some(37)));
    }

    #[test]
    fn reference_clock_is_never_steered() {
        let c = Arc::new(ClusterClock::new());
        let before = c.model();
        let mut r = ReferenceClock::new(c.clone());
        assert_eq!(r.step_clock(Duration::from_millis(3)), Err(ReadOnly));
        assert_eq!(r.set_frequency(100.0), Err(ReadOnly));
        assert_eq!(c.model(), before);
    }
}
