//! DSP building blocks shared by the engines: band-limiting residuals, a polynomial sine, a
//! lane-wise ADSR and small helpers. Everything here is branch-free arithmetic on `f32` so the
//! compiler turns loops over [`LANES`] voices into SIMD.

// Lane loops index several structure-of-arrays fields in step; that is the layout.
#![allow(clippy::needless_range_loop)]

/// Voices processed together (one group); a multiple of every SIMD width we target.
pub const LANES: usize = 8;
/// One `f32` per voice of a group.
pub type Lanes = [f32; LANES];
/// Oscillator phase (0–1) at the start of a note from silence: a quarter period in, so a saw or
/// sine is already non-zero on the note's first frame (onsets are visible sample-exactly).
pub const START_PHASE: f32 = 0.25;
/// Gain of one voice at full velocity and volume (eight such voices sum to at most 0.96).
pub const VOICE_GAIN: f32 = 0.12;
/// Frames between two control-rate updates (pitch, cutoff, LFO, smoothing); values computed
/// there are ramped linearly across the frames in between.
pub const CONTROL_FRAMES: usize = 32;
/// Time constant of parameter smoothing, seconds.
pub const SMOOTHING_S: f32 = 0.005;
/// Values below this in recursive state are flushed to zero (no denormals).
pub const FLUSH: f32 = 1e-15;

/// Residual of a unit step band-limited by a cubic B-spline kernel (4 samples wide): add
/// `jump × blep4(x)` to a naive signal with a step of `jump` at `x` samples before this one
/// (`x` < 0: the step is still ahead). Zero for |x| ≥ 2. The spectrum of the kernel is
/// sinc⁴(f/sr), which is what keeps the saw's aliases low.
#[inline(always)]
pub fn blep4(x: f32) -> f32 {
    let a = x.abs().min(2.0);
    let b = 2.0 - a;
    let b2 = b * b;
    let outer = b2 * b2 * (1.0 / 24.0);
    let a2 = a * a;
    let inner = 1.0 / 24.0 + (2.75 - 4.0 * a + 2.0 * a2 * a - 0.75 * a2 * a2) * (1.0 / 6.0);
    let r = if a > 1.0 { outer } else { inner };
    if x < 0.0 { r } else { -r }
}

/// Band-limited sawtooth (−1 → 1 rising) at phase `p` (0–1) and `inv_inc` = 1 / phase increment.
#[inline(always)]
pub fn saw(p: f32, inv_inc: f32) -> f32 {
    // The naive saw falls by 2 at every wrap: correct for the last wrap and the next one.
    2.0 * p - 1.0 - 2.0 * (blep4(p * inv_inc) + blep4((p - 1.0) * inv_inc))
}

/// Residual of a unit slope change band-limited by a linear B-spline kernel, at `d` samples
/// from the corner (symmetric).
#[inline(always)]
pub fn blamp2(d: f32) -> f32 {
    let c = 1.0 - d.abs().min(1.0);
    c * c * c * (1.0 / 6.0)
}

/// Band-limited triangle (1 at phase 0, −1 at phase ½).
#[inline(always)]
pub fn triangle(p: f32, inc: f32, inv_inc: f32) -> f32 {
    let naive = 4.0 * (p - 0.5).abs() - 1.0;
    let d0 = p.min(1.0 - p) * inv_inc;
    let d5 = (p - 0.5) * inv_inc;
    naive + 8.0 * inc * (blamp2(d5) - blamp2(d0))
}

/// sin(2π·x) for x in [−0.5, 0.5] (max error about 4e-6).
#[inline(always)]
pub fn sin_turns_centered(x: f32) -> f32 {
    // sin(π − θ) = sin θ folds the outer quarters in; then an odd Taylor polynomial.
    let half = if x < 0.0 { -0.5 } else { 0.5 };
    let y = if x.abs() > 0.25 { half - x } else { x };
    let z = y * core::f32::consts::TAU;
    let z2 = z * z;
    z * (1.0
        + z2 * (-1.0 / 6.0 + z2 * (1.0 / 120.0 + z2 * (-1.0 / 5040.0 + z2 * (1.0 / 362_880.0)))))
}

/// sin(2π·p) for a phase `p` in [0, 1).
#[inline(always)]
pub fn sin_phase(p: f32) -> f32 {
    -sin_turns_centered(p - 0.5)
}

/// sin(2π·x) for |x| < 2²².
#[inline(always)]
pub fn sin_turns(x: f32) -> f32 {
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer in plain float arithmetic,
    // which vectorises everywhere (unlike `round`/`floor` on baseline x86-64).
    const MAGIC: f32 = 12_582_912.0;
    let r = (x + MAGIC) - MAGIC;
    sin_turns_centered(x - r)
}

/// Whether this CPU runs the AVX2 build of the render loops (checked once per engine).
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// MIDI note (fractional) to Hz, A4 = 69 = 440 Hz.
#[inline]
pub fn note_hz(note: f32) -> f32 {
    440.0 * ((note - 69.0) * (1.0 / 12.0)).exp2()
}

/// Flushes a tiny value to zero.
#[inline(always)]
pub fn flush(x: f32) -> f32 {
    if x.abs() < FLUSH { 0.0 } else { x }
}

/// Next value of a per-lane xorshift32 noise generator, in [−1, 1).
#[inline(always)]
pub fn noise(state: &mut u32) -> f32 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *state = x;
    (x as i32) as f32 * (1.0 / 2_147_483_648.0)
}

/// ADSR stage: silent.
pub const IDLE: f32 = 0.0;
/// ADSR stage: rising to 1.
pub const ATTACK: f32 = 1.0;
/// ADSR stage: falling to the sustain level.
pub const DECAY: f32 = 2.0;
/// ADSR stage: holding the sustain level.
pub const SUSTAIN: f32 = 3.0;
/// ADSR stage: falling to 0.
pub const RELEASE: f32 = 4.0;

/// Linear ADSR envelopes for a group of voices. Attack rises at 1/(A·sr) per frame (from the
/// current level, so a stolen voice does not jump), decay falls from 1 to the sustain level in
/// D, release falls from the level at note-off to 0 in R.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdsrLanes {
    /// Stage per lane ([`IDLE`] … [`RELEASE`]).
    pub stage: Lanes,
    /// Level per lane.
    pub level: Lanes,
    /// Attack increment per frame.
    pub a_step: Lanes,
    /// Decay decrement per frame.
    pub d_step: Lanes,
    /// Release decrement per frame (set at note-off).
    pub r_step: Lanes,
    /// Sustain level.
    pub sustain: Lanes,
    /// Release time in frames (turned into `r_step` at note-off).
    pub r_frames: Lanes,
}

impl AdsrLanes {
    /// Sets lane `l`'s times (seconds) and sustain level at `sr` Hz.
    pub fn set(&mut self, l: usize, a: f32, d: f32, s: f32, r: f32, sr: f32) {
        self.a_step[l] = 1.0 / (a * sr).max(1.0);
        self.d_step[l] = (1.0 - s) / (d * sr).max(1.0);
        self.sustain[l] = s;
        self.r_frames[l] = (r * sr).max(1.0);
    }

    /// Starts the attack of lane `l` from its current level.
    pub fn gate_on(&mut self, l: usize) {
        self.stage[l] = ATTACK;
    }

    /// Starts the release of lane `l`.
    pub fn gate_off(&mut self, l: usize) {
        if self.stage[l] != IDLE {
            self.stage[l] = RELEASE;
            self.r_step[l] = self.level[l] / self.r_frames[l];
        }
    }

    /// Advances every lane by `frames` frames' worth of one step (1 per audio frame; the
    /// control-rate filter envelope passes its update interval).
    #[inline(always)]
    pub fn tick(&mut self, frames: f32) {
        for l in 0..LANES {
            let st = self.stage[l];
            let att = st == ATTACK;
            let dec = st == DECAY;
            let rel = st == RELEASE;
            let s = self.sustain[l];
            let step = if att {
                self.a_step[l]
            } else if dec {
                -self.d_step[l]
            } else if rel {
                -self.r_step[l]
            } else {
                0.0
            };
            let mut lv = self.level[l] + step * frames;
            let mut ns = st;
            if att && lv >= 1.0 {
                lv = 1.0;
                ns = DECAY;
            }
            if dec && lv <= s {
                lv = s;
                ns = SUSTAIN;
            }
            if st == SUSTAIN {
                lv = s;
            }
            if rel && lv <= 0.0 {
                lv = 0.0;
                ns = IDLE;
            }
            self.level[l] = lv;
            self.stage[l] = ns;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blep4_is_continuous_and_odd() {
        assert!((blep4(-1e-6) - 0.5).abs() < 1e-4);
        assert!((blep4(1e-6) + 0.5).abs() < 1e-4);
        assert!((blep4(-1.0) - 1.0 / 24.0).abs() < 1e-6);
        assert_eq!(blep4(2.5), 0.0);
        assert_eq!(blep4(-2.0), 0.0);
    }

    #[test]
    fn polynomial_sine_is_accurate() {
        for i in 0..1000 {
            let p = i as f32 / 1000.0;
            let e = (sin_phase(p) - (core::f32::consts::TAU * p).sin()).abs();
            assert!(e < 2e-5, "phase {p}: error {e}");
            let x = p * 700.3 - 300.0;
            let e = (sin_turns(x) - (core::f32::consts::TAU * x).sin()).abs();
            assert!(e < 2e-4, "turns {x}: error {e}");
        }
    }
}
