//! Cluster time and the tempo timeline.

use core::fmt;
use serde::{Deserialize, Serialize};

/// A point on the cluster's time base: integer nanoseconds on the coordinator's PTP (TAI)
/// timescale. Every scheduled event carries one.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ClusterTime(pub u64);

impl ClusterTime {
    /// The origin of the timescale.
    pub const ZERO: ClusterTime = ClusterTime(0);

    /// Builds a time from nanoseconds.
    pub const fn from_nanos(ns: u64) -> Self {
        ClusterTime(ns)
    }

    /// Nanoseconds since the origin.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// `self + ns`, saturating at the ends of the timescale.
    #[must_use]
    pub const fn add_nanos(self, ns: i64) -> Self {
        ClusterTime(self.0.saturating_add_signed(ns))
    }

    /// `self - earlier` in nanoseconds (negative when `earlier` is later), saturating.
    pub const fn nanos_since(self, earlier: ClusterTime) -> i64 {
        let d = self.0 as i128 - earlier.0 as i128;
        if d > i64::MAX as i128 {
            i64::MAX
        } else if d < i64::MIN as i128 {
            i64::MIN
        } else {
            d as i64
        }
    }
}

impl fmt::Display for ClusterTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:09}",
            self.0 / 1_000_000_000,
            self.0 % 1_000_000_000
        )
    }
}

const MICROS_PER_BEAT_UNIT: i128 = 1_000_000;

/// The tempo map of the cluster: `beats(t) = beat0 + (t − t0) / ns_per_beat`.
///
/// Beats are counted in micro-beats (millionths of a beat) so that all arithmetic is exact
/// integer maths that runs the same on a Cortex-M7 and on Linux.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    /// Length of one beat in nanoseconds (500 000 000 at 120 BPM). Never zero.
    pub ns_per_beat: u64,
    /// Beat position, in micro-beats, at `t0`.
    pub beat0_micro: i64,
    /// The cluster time at which the beat position is `beat0_micro`.
    pub t0: ClusterTime,
}

/// Slowest tempo a [`Timeline`] accepts, in BPM (the same bound Ableton Link uses).
pub const MIN_BPM: u32 = 20;
/// Fastest tempo a [`Timeline`] accepts, in BPM.
pub const MAX_BPM: u32 = 999;

impl Timeline {
    /// A timeline at `milli_bpm / 1000` BPM with beat 0 at `t0`; the tempo is clamped to
    /// [`MIN_BPM`]..=[`MAX_BPM`].
    pub fn from_milli_bpm(milli_bpm: u32, t0: ClusterTime) -> Self {
        Timeline {
            ns_per_beat: ns_per_beat_from_milli_bpm(milli_bpm),
            beat0_micro: 0,
            t0,
        }
    }

    /// Tempo in thousandths of a BPM, rounded.
    pub fn milli_bpm(&self) -> u32 {
        let npb = self.ns_per_beat.max(1) as u128;
        ((60_000_000_000_000u128 + npb / 2) / npb) as u32
    }

    /// Tempo in BPM.
    pub fn bpm(&self) -> f32 {
        60_000_000_000.0 / self.ns_per_beat.max(1) as f32
    }

    /// Beat position at `t`, in micro-beats (rounded towards negative infinity).
    pub fn micro_beats_at(&self, t: ClusterTime) -> i64 {
        let dt = t.0 as i128 - self.t0.0 as i128;
        let d = (dt * MICROS_PER_BEAT_UNIT).div_euclid(self.ns_per_beat.max(1) as i128);
        clamp_i64(self.beat0_micro as i128 + d)
    }

    /// Beat position at `t`, in beats.
    pub fn beats_at(&self, t: ClusterTime) -> f64 {
        self.micro_beats_at(t) as f64 / MICROS_PER_BEAT_UNIT as f64
    }

    /// The cluster time at which the beat position is `micro_beats` (saturating at the ends of
    /// the timescale).
    pub fn time_at_micro_beats(&self, micro_beats: i64) -> ClusterTime {
        let db = micro_beats as i128 - self.beat0_micro as i128;
        let dt = (db * self.ns_per_beat.max(1) as i128).div_euclid(MICROS_PER_BEAT_UNIT);
        let t = self.t0.0 as i128 + dt;
        ClusterTime(t.clamp(0, u64::MAX as i128) as u64)
    }

    /// Phase within a bar of `quantum_micro` micro-beats, at `t`, in micro-beats
    /// (`0 <= phase < quantum`). A quantum of zero yields zero.
    pub fn phase_micro_at(&self, t: ClusterTime, quantum_micro: i64) -> i64 {
        if quantum_micro <= 0 {
            return 0;
        }
        self.micro_beats_at(t).rem_euclid(quantum_micro)
    }

    /// The same musical position continued at a new tempo from `at`: the beat position at `at`
    /// does not jump, only the slope changes.
    #[must_use]
    pub fn with_tempo_at(&self, milli_bpm: u32, at: ClusterTime) -> Self {
        Timeline {
            ns_per_beat: ns_per_beat_from_milli_bpm(milli_bpm),
            beat0_micro: self.micro_beats_at(at),
            t0: at,
        }
    }
}

fn ns_per_beat_from_milli_bpm(milli_bpm: u32) -> u64 {
    let m = milli_bpm.clamp(MIN_BPM * 1000, MAX_BPM * 1000) as u64;
    (60_000_000_000_000 + m / 2) / m
}

fn clamp_i64(v: i128) -> i64 {
    v.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn cluster_time_arithmetic_saturates() {
        let t = ClusterTime::from_nanos(10);
        assert_eq!(t.add_nanos(-20), ClusterTime::ZERO);
        assert_eq!(ClusterTime(u64::MAX).add_nanos(5), ClusterTime(u64::MAX));
        assert_eq!(ClusterTime(5).nanos_since(ClusterTime(15)), -10);
        assert_eq!(
            ClusterTime(u64::MAX).nanos_since(ClusterTime::ZERO),
            i64::MAX
        );
        assert_eq!(
            ClusterTime(1_500_000_000).to_string_for_test(),
            "1.500000000"
        );
    }

    impl ClusterTime {
        fn to_string_for_test(self) -> heapless::String<32> {
            use core::fmt::Write;
            let mut s = heapless::String::new();
            write!(s, "{self}").unwrap();
            s
        }
    }

    #[test]
    fn tempo_round_trips() {
        let tl = Timeline::from_milli_bpm(120_000, ClusterTime(0));
        assert_eq!(tl.ns_per_beat, 500_000_000);
        assert_eq!(tl.milli_bpm(), 120_000);
        assert!((tl.bpm() - 120.0).abs() < 1e-4);
        let odd = Timeline::from_milli_bpm(97_333, ClusterTime(0));
        assert_eq!(odd.milli_bpm(), 97_333);
    }

    #[test]
    fn tempo_is_clamped() {
        assert_eq!(
            Timeline::from_milli_bpm(0, ClusterTime(0)).milli_bpm(),
            20_000
        );
        assert_eq!(
            Timeline::from_milli_bpm(u32::MAX, ClusterTime(0)).milli_bpm(),
            999_000
        );
    }

    #[test]
    fn beats_follow_time() {
        let tl = Timeline::from_milli_bpm(120_000, ClusterTime(10 * S));
        assert_eq!(tl.micro_beats_at(ClusterTime(10 * S)), 0);
        assert_eq!(tl.micro_beats_at(ClusterTime(11 * S)), 2_000_000);
        assert_eq!(tl.micro_beats_at(ClusterTime(9 * S)), -2_000_000);
        assert_eq!(tl.beats_at(ClusterTime(10 * S + S / 4)), 0.5);
        assert_eq!(
            tl.time_at_micro_beats(3_000_000),
            ClusterTime(11 * S + S / 2)
        );
        assert_eq!(tl.phase_micro_at(ClusterTime(13 * S), 4_000_000), 2_000_000);
        assert_eq!(tl.phase_micro_at(ClusterTime(9 * S), 4_000_000), 2_000_000);
        assert_eq!(tl.phase_micro_at(ClusterTime(9 * S), 0), 0);
    }

    #[test]
    fn tempo_change_keeps_phase_continuous() {
        let tl = Timeline::from_milli_bpm(120_000, ClusterTime(0));
        let at = ClusterTime(3 * S + 123_456);
        let before = tl.micro_beats_at(at);
        let faster = tl.with_tempo_at(140_000, at);
        assert_eq!(faster.micro_beats_at(at), before);
        // One second later the faster timeline has moved 140/60 beats instead of 2.
        let later = at.add_nanos(S as i64);
        assert_eq!(faster.micro_beats_at(later) - before, 2_333_333);
    }

    #[test]
    fn time_at_beat_inverts_beats_at() {
        let tl = Timeline {
            ns_per_beat: 428_571_429,
            beat0_micro: 17_250_000,
            t0: ClusterTime(77 * S),
        };
        for mb in [-5_000_000i64, 0, 17_250_000, 99_999_999] {
            let t = tl.time_at_micro_beats(mb);
            assert!((tl.micro_beats_at(t) - mb).abs() <= 1, "{mb}");
        }
    }
}
