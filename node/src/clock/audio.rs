//! The audio clock model: which instant each frame of a sound card's stream is heard.
//!
//! A sound card plays frames at the rate of its own crystal, which is neither the nominal rate
//! nor the cluster's: ±100 ppm is common. The backend sees it only through its callbacks, and
//! a callback runs some scheduling jitter after the moment it stands for. [`AudioClock`] is a
//! second-order delay-locked loop (F. Adriaensen, "Using a DLL to filter time", LAC 2005)
//! over the device's frame counter: each callback feeds it one observation (a frame number and
//! the `CLOCK_MONOTONIC` instant that frame is heard, noisy), and it keeps a straight line
//! `mono(frame) = t0 + (frame − f0) × period` that averages the jitter away (its bandwidth,
//! [`AudioClock::BANDWIDTH_HZ`], is a fraction of a hertz once locked) and follows the crystal's
//! drift with no steady-state error (a type-2 loop: the period itself is estimated).
//!
//! The model is over `CLOCK_MONOTONIC` on purpose, not over cluster time: the sound card does
//! not care what PTP does. The cluster time of a frame is the composition
//! `cluster(frame) = ClusterClock(realtime(mono(frame)))` ([`AudioClock::block_time`]), so a
//! step or a rate change of the [`ClusterClock`] moves where *future*
//! events land at once and exactly, and never disturbs the loop. A voice that is already
//! sounding is rendered frame after frame whatever the time map says, so no clock change can
//! put a jump into it (tested in `tests::cluster_step_leaves_a_sounding_voice_untouched`).
//!
//! An observation further than [`AudioClock::RESET_NS`] from the line (an xrun that lost or
//! repeated frames, a device restart) re-anchors the model on it (counted in
//! [`AudioClock::resets`]): that is a real discontinuity of the device, not jitter.
//!
//! Everything here is plain arithmetic on the caller's stack: no allocation, no lock, no
//! system call but the vDSO clock reads of [`realtime_of_mono`]; the audio thread owns the
//! `AudioClock`.

use super::ClusterClock;
use voicemesh_protocol::ClusterTime;

/// The timing of one block, for [`Engine::render_block`](crate::engine::Engine::render_block):
/// the cluster time of its first frame and when that frame is heard on `CLOCK_MONOTONIC`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockTime {
    /// Cluster time of the block's first frame (the model's).
    pub cluster: ClusterTime,
    /// `CLOCK_MONOTONIC` ns at which the block's first frame is heard (0: unknown).
    pub mono_ns: u64,
    /// Duration of one frame on `CLOCK_MONOTONIC`, ns (the device's real rate).
    pub frame_ns: f64,
}

impl BlockTime {
    /// A block at `cluster` with no known emission time (offline rendering, tests).
    pub fn cluster_only(cluster: ClusterTime, sample_rate: u32) -> Self {
        BlockTime {
            cluster,
            mono_ns: 0,
            frame_ns: 1e9 / f64::from(sample_rate.max(1)),
        }
    }

    /// `CLOCK_MONOTONIC` ns at which frame `offset` of the block is heard (0 when unknown).
    pub fn mono_of(&self, offset: usize) -> u64 {
        if self.mono_ns == 0 {
            return 0;
        }
        self.mono_ns + (offset as f64 * self.frame_ns).round() as u64
    }
}

/// The DLL over a device's frame counter. See the module docs.
#[derive(Clone, Debug)]
pub struct AudioClock {
    nominal_ns: f64,
    /// Whether the loop has an anchor yet.
    started: bool,
    /// Frame of the last observation and its modelled time (ns since `origin`).
    f0: u64,
    t0: f64,
    origin: u64,
    /// Estimated duration of one frame, ns.
    period: f64,
    updates: u64,
    resets: u64,
    /// Last observation's error against the prediction, ns.
    last_error: f64,
}

impl AudioClock {
    /// Loop bandwidth once locked, Hz: jitter is averaged over tens of seconds.
    pub const BANDWIDTH_HZ: f64 = 0.05;
    /// Bandwidth of the first [`Self::FAST_UPDATES`] updates, Hz, to lock on quickly.
    pub const FAST_BANDWIDTH_HZ: f64 = 2.0;
    /// Updates run with the fast bandwidth after an anchor (about a second of 256-frame
    /// blocks).
    pub const FAST_UPDATES: u64 = 200;
    /// Bandwidth of the updates after those, up to [`Self::MEDIUM_UPDATES`], Hz.
    pub const MEDIUM_BANDWIDTH_HZ: f64 = 0.5;
    /// Updates (counted from the anchor) after which the loop narrows to
    /// [`Self::BANDWIDTH_HZ`] (about ten seconds of 256-frame blocks).
    pub const MEDIUM_UPDATES: u64 = 2000;
    /// An observation further than this from the model is a discontinuity: re-anchor.
    pub const RESET_NS: f64 = 4_000_000.0;
    /// Largest deviation of the estimated rate from the nominal one (a bad crystal is 100 ppm).
    pub const MAX_DRIFT: f64 = 1e-3;

    /// A model of a device running at `sample_rate` Hz, not yet anchored.
    pub fn new(sample_rate: u32) -> Self {
        let nominal_ns = 1e9 / f64::from(sample_rate.max(1));
        AudioClock {
            nominal_ns,
            started: false,
            f0: 0,
            t0: 0.0,
            origin: 0,
            period: nominal_ns,
            updates: 0,
            resets: 0,
            last_error: 0.0,
        }
    }

    fn anchor(&mut self, frame: u64, mono_ns: u64) {
        self.started = true;
        self.f0 = frame;
        self.origin = mono_ns;
        self.t0 = 0.0;
        self.updates = 0;
        self.last_error = 0.0;
    }

    /// Feeds one observation: frame `frame` of the stream is heard at `mono_ns`
    /// (`CLOCK_MONOTONIC`), give or take the callback's jitter. Frames must not go backwards
    /// (an older or repeated frame is ignored).
    pub fn observe(&mut self, frame: u64, mono_ns: u64) {
        if !self.started {
            self.anchor(frame, mono_ns);
            return;
        }
        if frame <= self.f0 {
            return;
        }
        let n = (frame - self.f0) as f64;
        let predicted = self.t0 + n * self.period;
        let observed = mono_ns as f64 - self.origin as f64;
        let e = observed - predicted;
        if e.abs() > Self::RESET_NS {
            self.resets += 1;
            self.anchor(frame, mono_ns);
            return;
        }
        let bw = if self.updates < Self::FAST_UPDATES {
            Self::FAST_BANDWIDTH_HZ
        } else if self.updates < Self::MEDIUM_UPDATES {
            Self::MEDIUM_BANDWIDTH_HZ
        } else {
            Self::BANDWIDTH_HZ
        };
        // ω over this update's interval (the nominal one: the loop constants need not be
        // exact), critically damped second-order loop.
        // Capped so that rare observations (a long gap) cannot make the loop unstable.
        let omega = (2.0 * core::f64::consts::PI * bw * n * self.nominal_ns * 1e-9).min(0.3);
        let b = core::f64::consts::SQRT_2 * omega;
        let c = omega * omega;
        self.t0 = predicted + b * e;
        self.period += c * e / n;
        let (lo, hi) = (
            self.nominal_ns * (1.0 - Self::MAX_DRIFT),
            self.nominal_ns * (1.0 + Self::MAX_DRIFT),
        );
        self.period = self.period.clamp(lo, hi);
        self.f0 = frame;
        self.updates += 1;
        self.last_error = e;
        // Keep the origin near the present so f64 keeps sub-ns resolution for ever.
        if self.t0 > 1e12 {
            let whole = self.t0.floor();
            self.origin += whole as u64;
            self.t0 -= whole;
        }
    }

    /// Whether the model has an anchor (after the first observation).
    pub fn started(&self) -> bool {
        self.started
    }

    /// `CLOCK_MONOTONIC` ns at which frame `frame` is heard, by the model (0 before the first
    /// observation).
    pub fn mono_of(&self, frame: u64) -> u64 {
        if !self.started {
            return 0;
        }
        let dn = frame as f64 - self.f0 as f64;
        let t = self.origin as f64 + self.t0 + dn * self.period;
        t.max(0.0).round() as u64
    }

    /// Estimated duration of one frame, ns.
    pub fn period_ns(&self) -> f64 {
        self.period
    }

    /// Estimated rate error of the device against `CLOCK_MONOTONIC`, ppm (positive: the device
    /// is slow, each frame lasts longer than nominal).
    pub fn drift_ppm(&self) -> f64 {
        (self.period / self.nominal_ns - 1.0) * 1e6
    }

    /// Observations that were too far from the model and re-anchored it.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// The last observation's distance from the model's prediction, ns.
    pub fn last_error_ns(&self) -> f64 {
        self.last_error
    }

    /// The timing of the block whose first frame is `frame`: the model's emission instant and
    /// rate, and the cluster time `clock` gives that instant.
    pub fn block_time(&self, frame: u64, clock: &ClusterClock) -> BlockTime {
        let mono_ns = self.mono_of(frame);
        BlockTime {
            cluster: clock.to_cluster(realtime_of_mono(mono_ns)),
            mono_ns,
            frame_ns: self.period,
        }
    }
}

/// Nanoseconds of `CLOCK_MONOTONIC` (vDSO: no allocation, no system call).
pub fn mono_now_ns() -> u64 {
    crate::audio::monotonic_ns()
}

fn read_clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and the clock id always exists.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `CLOCK_REALTIME` reading (the [`ClusterClock`]'s local clock) at the
/// `CLOCK_MONOTONIC` instant `mono_ns`: the two clocks are read back to back, the realtime
/// read bracketed by two monotonic ones. Wait-free (three vDSO reads).
pub fn realtime_of_mono(mono_ns: u64) -> u64 {
    let m1 = read_clock(libc::CLOCK_MONOTONIC);
    let rt = read_clock(libc::CLOCK_REALTIME);
    let m2 = read_clock(libc::CLOCK_MONOTONIC);
    let m = m1 / 2 + m2 / 2;
    rt.saturating_add_signed(mono_ns as i64 - m as i64)
}

/// The `CLOCK_MONOTONIC` instant at which `CLOCK_REALTIME` reads `realtime_ns` (the inverse
/// of [`realtime_of_mono`]).
pub fn mono_of_realtime(realtime_ns: u64) -> u64 {
    let m1 = read_clock(libc::CLOCK_MONOTONIC);
    let rt = read_clock(libc::CLOCK_REALTIME);
    let m2 = read_clock(libc::CLOCK_MONOTONIC);
    let m = m1 / 2 + m2 / 2;
    m.saturating_add_signed(realtime_ns as i64 - rt as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ClockModel;

    const SR: u32 = 48_000;
    const BLOCK: u64 = 256;

    /// A deterministic generator (xorshift64*), uniform in [-1, 1).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
            (v >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }
    }

    /// A simulated sound card: frame `f` is heard at `t0 + f × nominal × (1 + drift)`; each
    /// callback observes its block's first frame `jitter` late at most (uniform).
    struct Card {
        t0: u64,
        drift: f64,
    }
    impl Card {
        fn truth(&self, f: u64) -> f64 {
            self.t0 as f64 + f as f64 * 1e9 / f64::from(SR) * (1.0 + self.drift)
        }
    }

    /// Runs `seconds` of callbacks and returns the worst model error over the last half.
    fn run(card: &Card, jitter_ns: f64, seconds: u64, seed: u64) -> (f64, AudioClock) {
        let mut m = AudioClock::new(SR);
        let mut rng = Rng(seed);
        let blocks = seconds * u64::from(SR) / BLOCK;
        let mut worst: f64 = 0.0;
        for k in 0..blocks {
            let f = k * BLOCK;
            // Jitter is one-sided (a callback is never early) plus a symmetric part.
            let noise = jitter_ns * (0.5 + 0.5 * rng.next());
            m.observe(f, (card.truth(f) + noise) as u64);
            if k > blocks / 2 {
                // The model's line against the truth, offset by the mean of the jitter.
                let err = m.mono_of(f + BLOCK) as f64 - card.truth(f + BLOCK) - jitter_ns * 0.5;
                worst = worst.max(err.abs());
            }
        }
        (worst, m)
    }

    #[test]
    fn follows_drift_of_a_hundred_ppm_through_jitter() {
        for (i, drift) in [-100e-6, -37e-6, 0.0, 53e-6, 100e-6]
            .into_iter()
            .enumerate()
        {
            let card = Card {
                t0: 5_000_000_000,
                drift,
            };
            // 200 µs of callback jitter (a loaded VM), 60 s.
            let (worst, m) = run(&card, 200_000.0, 60, 0x9e37_79b9 + i as u64);
            assert!(
                worst < 10_000.0,
                "drift {drift}: worst error {worst} ns with 200 µs jitter"
            );
            assert!(
                (m.drift_ppm() - drift * 1e6).abs() < 2.0,
                "drift {drift}: estimated {} ppm",
                m.drift_ppm()
            );
            assert_eq!(m.resets(), 0);
        }
    }

    #[test]
    fn small_jitter_gives_sub_microsecond_error() {
        let card = Card {
            t0: 1_000,
            drift: 80e-6,
        };
        // JACK's own cycle times are µs-quantised: 1 µs of jitter.
        let (worst, _) = run(&card, 1_000.0, 30, 7);
        assert!(worst < 200.0, "worst {worst} ns");
    }

    #[test]
    fn without_the_filter_the_error_is_the_jitter() {
        // The claim the filter makes: raw callback times are off by up to the jitter.
        let card = Card { t0: 0, drift: 0.0 };
        let mut rng = Rng(3);
        let worst = (0..1000u64)
            .map(|k| {
                let f = k * BLOCK;
                let obs = card.truth(f) + 200_000.0 * (0.5 + 0.5 * rng.next());
                (obs - card.truth(f) - 100_000.0).abs()
            })
            .fold(0.0, f64::max);
        assert!(worst > 90_000.0);
    }

    #[test]
    fn a_device_discontinuity_reanchors_once() {
        let card = Card { t0: 0, drift: 0.0 };
        let mut m = AudioClock::new(SR);
        for k in 0..100u64 {
            m.observe(k * BLOCK, card.truth(k * BLOCK) as u64);
        }
        // An xrun: the device lost 10 ms of frames (the counter went on, the sound did not).
        let lost = 10_000_000u64;
        for k in 100..200u64 {
            m.observe(k * BLOCK, card.truth(k * BLOCK) as u64 + lost);
        }
        assert_eq!(m.resets(), 1);
        let f = 199 * BLOCK;
        assert!((m.mono_of(f) as f64 - card.truth(f) - lost as f64).abs() < 100.0);
    }

    #[test]
    fn ignores_frames_that_do_not_advance() {
        let mut m = AudioClock::new(SR);
        m.observe(1000, 1_000_000);
        m.observe(1000, 9_000_000);
        m.observe(500, 9_000_000);
        assert_eq!(m.mono_of(1000), 1_000_000);
        assert_eq!(m.resets(), 0);
    }

    #[test]
    fn long_runs_keep_resolution() {
        // A simulated day of 1024-frame blocks.
        let card = Card {
            t0: 1_000_000_000,
            drift: 20e-6,
        };
        let mut m = AudioClock::new(SR);
        let blocks = 24 * 3600 * u64::from(SR) / 1024;
        for k in 0..blocks {
            m.observe(k * 1024, card.truth(k * 1024).round() as u64);
        }
        let f = blocks * 1024;
        assert!((m.mono_of(f) as f64 - card.truth(f)).abs() < 50.0);
        assert!((m.drift_ppm() - 20.0).abs() < 0.01);
    }

    #[test]
    fn realtime_and_monotonic_conversions_invert() {
        let m = mono_now_ns();
        let rt = realtime_of_mono(m);
        let back = mono_of_realtime(rt);
        assert!((back as i64 - m as i64).abs() < 50_000, "{back} vs {m}");
        let rt_now = crate::clock::local_now_ns();
        assert!((rt as i64 - rt_now as i64).abs() < 50_000_000);
    }

    #[test]
    fn cluster_step_moves_the_time_map_not_the_loop() {
        let clock = ClusterClock::new();
        let mut m = AudioClock::new(SR);
        let now = mono_now_ns();
        m.observe(0, now);
        m.observe(BLOCK, now + 5_333_333);
        let before = m.block_time(2 * BLOCK, &clock);
        clock.step(1_000_000);
        let after = m.block_time(2 * BLOCK, &clock);
        assert_eq!(before.mono_ns, after.mono_ns, "the device did not move");
        let moved = after.cluster.nanos_since(before.cluster);
        assert!((moved - 1_000_000).abs() < 20_000, "moved {moved}");
        // A rate change of the cluster clock likewise changes only the map.
        clock.set_model(ClockModel {
            rate: 50e-6,
            ..clock.model()
        });
        assert_eq!(m.block_time(2 * BLOCK, &clock).mono_ns, before.mono_ns);
    }

    #[test]
    fn cluster_step_leaves_a_sounding_voice_untouched() {
        use crate::engine::{Control, Engine, EngineCounters, EngineEvent, EventKind};
        use std::sync::Arc;
        // Two identical nodes render the same note; one's cluster clock steps by 1 ms (as a
        // PTP step would) and then changes rate, in the middle of the note. The sounding voice
        // must be sample-identical: the step moves the time map, never the audio.
        let render = |step: bool| -> (Vec<f32>, u64) {
            let clock = ClusterClock::new();
            clock.set_model(ClockModel {
                anchor_local: 0,
                anchor_cluster: ClusterTime(1_000_000_000_000),
                rate: 0.0,
            });
            let (mut engine, mut tx) = Engine::new(4, SR, Arc::new(EngineCounters::default()));
            let mut onsets = engine.record_onsets();
            let mut dll = AudioClock::new(SR);
            let card = Card {
                t0: 0,
                drift: 30e-6,
            };
            let mut all = Vec::new();
            let mut out = [0.0f32; BLOCK as usize];
            let mut second_onset = 0;
            for k in 0..400u64 {
                let f = k * BLOCK;
                dll.observe(f, card.truth(f) as u64);
                // Fake the realtime conversion: monotonic == realtime in this test.
                let mono = dll.mono_of(f);
                let bt = BlockTime {
                    cluster: clock.model().to_cluster(mono),
                    mono_ns: mono,
                    frame_ns: dll.period_ns(),
                };
                if k == 10 {
                    tx.send(Control::Event(EngineEvent {
                        voice: 0,
                        at: bt.cluster.add_nanos(1_000_000),
                        kind: EventKind::On {
                            note: 57,
                            velocity: 100,
                            lease_until: ClusterTime(u64::MAX),
                        },
                    }));
                }
                if step && k == 100 {
                    let m = clock.model();
                    clock.set_model(ClockModel {
                        anchor_local: mono,
                        anchor_cluster: m.to_cluster(mono).add_nanos(1_000_000),
                        rate: 40e-6,
                    });
                }
                if k == 200 {
                    // A second note at a cluster time: after a step it lands where the new
                    // map puts that time.
                    tx.send(Control::Event(EngineEvent {
                        voice: 1,
                        at: ClusterTime(1_000_000_000_000 + 1_100_000_000),
                        kind: EventKind::On {
                            note: 64,
                            velocity: 100,
                            lease_until: ClusterTime(u64::MAX),
                        },
                    }));
                }
                engine.render_block(bt, &mut out);
                while let Ok(o) = onsets.pop() {
                    if o.voice == 1 {
                        second_onset = o.frame;
                    }
                }
                if k < 200 {
                    all.extend_from_slice(&out);
                }
            }
            (all, second_onset)
        };
        let (plain, onset_plain) = render(false);
        let (stepped, onset_stepped) = render(true);
        assert!(plain.iter().any(|s| s.abs() > 0.01), "the voice sounds");
        assert_eq!(plain, stepped, "a clock step changed a sounding voice");
        // 1 ms earlier in frames (48 frames), give or take the rate change's effect.
        let moved = onset_plain as i64 - onset_stepped as i64;
        assert!((moved - 48).abs() <= 3, "moved {moved} frames");
    }
}
