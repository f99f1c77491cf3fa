//! The clock servo in a simulated world: the MCU's crystal runs ±100 ppm off, network delays
//! jitter (with occasional queueing spikes), and the servo must hold cluster time.

use voicemesh_mcu::LocalTime;
use voicemesh_mcu::servo::ClockServo;
use voicemesh_protocol::ClusterTime;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// The MCU's local clock at true time `tau` (ns): `drift_ppm` fast, started `offset` ns in.
fn local(tau: u64, drift_ppm: i64, offset: u64) -> LocalTime {
    let t = tau as i128;
    LocalTime((t + t * drift_ppm as i128 / 1_000_000 + offset as i128) as u64)
}

/// One-way delay: 40–160 µs, and one datagram in 20 queued behind traffic for up to 3 ms.
fn delay(rng: &mut Rng) -> u64 {
    if rng.next().is_multiple_of(20) {
        rng.range(500_000, 3_000_000)
    } else {
        rng.range(40_000, 160_000)
    }
}

/// Runs `secs` of 100 ms time-sync exchanges; returns the worst |error| over the last
/// `check_secs`, sampled every 10 ms between exchanges.
fn run(seed: u64, drift_ppm: i64, secs: u64, check_secs: u64) -> (i64, ClockServo) {
    let mut rng = Rng(seed | 1);
    let mut servo = ClockServo::new();
    let offset = rng.range(0, 1 << 40);
    // Cluster time is the true time plus a large epoch (the coordinator's TAI clock).
    let epoch = 1_700_000_000_000_000_000u64;
    let mut worst = 0i64;
    let step = 100_000_000u64;
    for k in 0..secs * 10 {
        let tau1 = 1_000_000_000 + k * step + rng.range(0, 1_000_000);
        let d1 = delay(&mut rng);
        let held = rng.range(5_000, 50_000);
        let d2 = delay(&mut rng);
        let t2 = ClusterTime(epoch + tau1 + d1);
        let t3 = ClusterTime(t2.0 + held);
        let tau4 = tau1 + d1 + held + d2;
        servo.handle_round_trip(
            local(tau1, drift_ppm, offset),
            t2,
            t3,
            local(tau4, drift_ppm, offset),
        );
        if k >= (secs - check_secs) * 10 {
            for j in 0..10 {
                let tau = tau4 + j * 10_000_000;
                let est = servo.cluster(local(tau, drift_ppm, offset));
                let err = est.0 as i64 - (epoch + tau) as i64;
                worst = worst.max(err.abs());
                // The inverse map agrees to within a nanosecond or two.
                let back = servo.local(est);
                assert!(back.0.abs_diff(local(tau, drift_ppm, offset).0) <= 2);
            }
        }
    }
    (worst, servo)
}

#[test]
fn servo_converges_under_drift_and_jitter() {
    for seed in 1..=20u64 {
        for drift in [-100i64, -37, 0, 58, 100] {
            let (worst, servo) = run(seed * 7919, drift, 40, 20);
            assert!(
                servo.locked(),
                "seed {seed} drift {drift}: not locked, last error {}",
                servo.last_error_ns()
            );
            assert!(
                worst < 50_000,
                "seed {seed} drift {drift} ppm: worst error {worst} ns"
            );
            // The frequency estimate found the drift (within 15 ppm; a 15 ppm error moves the
            // phase 1.5 µs between two exchanges, which the next one corrects).
            let want = -drift * 1_000;
            assert!(
                (servo.rate_ppb() - want).abs() < 15_000,
                "seed {seed} drift {drift}: rate {} ppb",
                servo.rate_ppb()
            );
            // At most one step: when the very first exchange was a queued one, the second
            // corrects it by a step; after that never.
            assert!(servo.steps() <= 1, "seed {seed} drift {drift}: stepped");
        }
    }
}

#[test]
fn servo_converges_quickly_from_start() {
    // After 5 s (50 exchanges) the error is already within 100 µs at ±100 ppm.
    for seed in 1..=10u64 {
        for drift in [-100i64, 100] {
            let (worst, _) = run(seed * 104_729, drift, 5, 1);
            assert!(worst < 100_000, "seed {seed} drift {drift}: {worst} ns");
        }
    }
}

#[test]
fn one_way_samples_step_then_track_and_a_jump_steps_again() {
    let mut s = ClockServo::new();
    assert_eq!(s.cluster(LocalTime(5)), ClusterTime(5));
    s.handle_one_way(LocalTime(1_000), ClusterTime(9_000_000_000));
    assert!(s.started());
    assert_eq!(s.cluster(LocalTime(2_000)), ClusterTime(9_000_001_000));
    // A coordinator whose clock jumped by 1 s: stepped, not slewed for minutes.
    s.handle_one_way(LocalTime(100_000_000), ClusterTime(10_100_000_000));
    assert_eq!(s.steps(), 1);
    assert_eq!(
        s.cluster(LocalTime(100_000_000)),
        ClusterTime(10_100_000_000)
    );
    // Round trips with impossible timestamps are dropped, not used.
    assert!(!s.handle_round_trip(
        LocalTime(200),
        ClusterTime(5),
        ClusterTime(1),
        LocalTime(100)
    ));
    assert_eq!(s.dropped(), 1);
}

#[test]
fn thresholds_for_a_jittery_link_slew_a_3_ms_error_and_lock_at_1_ms() {
    // Samples every 100 ms on a perfect clock, with one sample 3 ms off (a late delivery).
    let feed = |s: &mut ClockServo| {
        for i in 1..=40u64 {
            let l = i * 100_000_000;
            let err = if i == 20 { 3_000_000 } else { 0 };
            s.handle_one_way(LocalTime(l), ClusterTime(5_000_000_000 + l + err));
        }
    };
    // The default servo steps on it (and starts counting lock samples again)…
    let mut strict = ClockServo::new();
    feed(&mut strict);
    assert_eq!(
        strict.steps(),
        2,
        "the 3 ms sample and the one after it step back"
    );
    // …one tuned for a jittery link slews instead, and locks with a 1 ms smoothed error.
    let mut tolerant = ClockServo::with_thresholds(20_000_000, 1_000_000);
    feed(&mut tolerant);
    assert_eq!(tolerant.steps(), 0);
    assert!(tolerant.locked(), "error {}", tolerant.last_error_ns());
}
