//! A naive scalar implementation of the subtractive voice, for the benchmark's baseline only:
//! one voice at a time, one frame at a time, branching on waveform and envelope stage, and
//! pitch, cutoff and filter coefficients recomputed every frame. It produces the same kind of
//! sound with the same building blocks as [`subtractive`](super::subtractive) (two saw
//! oscillators, the state-variable filter, two ADSRs, an LFO, smoothing); it is not an engine.

use super::dsp::{START_PHASE, VOICE_GAIN, blep4, note_hz, sin_turns};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Stage {
    Idle,
    Attack,
    Decay,
    Sustain,
    Release,
}

#[derive(Clone, Copy, Debug)]
struct Adsr {
    stage: Stage,
    level: f32,
    a: f32,
    d: f32,
    s: f32,
    r: f32,
    r_step: f32,
}

impl Adsr {
    fn next(&mut self, sr: f32) -> f32 {
        match self.stage {
            Stage::Idle => {}
            Stage::Attack => {
                self.level += 1.0 / (self.a * sr).max(1.0);
                if self.level >= 1.0 {
                    self.level = 1.0;
                    self.stage = Stage::Decay;
                }
            }
            Stage::Decay => {
                self.level -= (1.0 - self.s) / (self.d * sr).max(1.0);
                if self.level <= self.s {
                    self.level = self.s;
                    self.stage = Stage::Sustain;
                }
            }
            Stage::Sustain => self.level = self.s,
            Stage::Release => {
                self.level -= self.r_step;
                if self.level <= 0.0 {
                    self.level = 0.0;
                    self.stage = Stage::Idle;
                }
            }
        }
        self.level
    }
}

/// One naive voice.
#[derive(Clone, Copy, Debug)]
pub struct NaiveVoice {
    note: f32,
    vel: f32,
    p1: f32,
    p2: f32,
    lfo: f32,
    ic1: f32,
    ic2: f32,
    cutoff: f32,
    cutoff_target: f32,
    amp: Adsr,
    fenv: Adsr,
}

impl NaiveVoice {
    /// A silent voice.
    pub fn new() -> Self {
        let env = Adsr {
            stage: Stage::Idle,
            level: 0.0,
            a: 0.002,
            d: 0.2,
            s: 0.7,
            r: 0.1,
            r_step: 0.0,
        };
        NaiveVoice {
            note: 60.0,
            vel: 1.0,
            p1: START_PHASE,
            p2: START_PHASE,
            lfo: 0.0,
            ic1: 0.0,
            ic2: 0.0,
            cutoff: 2000.0,
            cutoff_target: 2000.0,
            amp: env,
            fenv: env,
        }
    }

    /// Starts a note.
    pub fn note_on(&mut self, note: u8, velocity: u8) {
        self.note = f32::from(note);
        self.vel = f32::from(velocity) / 127.0;
        self.amp.stage = Stage::Attack;
        self.fenv.stage = Stage::Attack;
    }

    /// Releases the note.
    pub fn note_off(&mut self, sr: f32) {
        for e in [&mut self.amp, &mut self.fenv] {
            if e.stage != Stage::Idle {
                e.stage = Stage::Release;
                e.r_step = e.level / (e.r * sr).max(1.0);
            }
        }
    }

    /// Adds the voice's next `out.len()` frames into `out`.
    pub fn render_add(&mut self, out: &mut [f32], sr: f32) {
        if self.amp.stage == Stage::Idle {
            return;
        }
        for o in out.iter_mut() {
            let lfo = sin_turns(self.lfo);
            self.lfo = (self.lfo + 5.0 / sr).fract();
            self.cutoff += (self.cutoff_target - self.cutoff) * 0.004;
            let inc1 = (note_hz(self.note + 0.1 * lfo) / sr).min(0.45);
            let inc2 = (note_hz(self.note + 0.07 + 0.1 * lfo) / sr).min(0.45);
            let mut x = 0.0;
            for (p, inc) in [(&mut self.p1, inc1), (&mut self.p2, inc2)] {
                let t = *p;
                let mut y = 2.0 * t - 1.0;
                if t * inc.recip() < 2.0 {
                    y -= 2.0 * blep4(t / inc);
                }
                if (1.0 - t) / inc < 2.0 {
                    y -= 2.0 * blep4((t - 1.0) / inc);
                }
                x += 0.5 * y;
                *p += inc;
                if *p >= 1.0 {
                    *p -= 1.0;
                }
            }
            let fenv = self.fenv.next(sr);
            let fc = (self.cutoff * (2.0 * fenv).exp2()).min(0.45 * sr);
            let g = (core::f32::consts::PI * fc / sr).tan();
            let k = 1.0;
            let a1 = 1.0 / (1.0 + g * (g + k));
            let a2 = g * a1;
            let a3 = g * a2;
            let v3 = x - self.ic2;
            let v1 = a1 * self.ic1 + a2 * v3;
            let v2 = self.ic2 + a2 * self.ic1 + a3 * v3;
            self.ic1 = 2.0 * v1 - self.ic1;
            self.ic2 = 2.0 * v2 - self.ic2;
            let amp = self.amp.next(sr);
            *o += v2 * amp * VOICE_GAIN * self.vel;
        }
    }
}

impl Default for NaiveVoice {
    fn default() -> Self {
        Self::new()
    }
}
