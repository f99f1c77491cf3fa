//! One synth voice: a PolyBLEP sawtooth through a linear attack/release envelope.

/// Gain of one voice at full velocity. Eight voices at full velocity sum to at most 0.96, so
/// the default pool of eight never clips.
pub const VOICE_GAIN: f32 = 0.12;
/// Attack time in seconds.
pub const ATTACK_S: f32 = 0.002;
/// Release time in seconds (from full level to silence).
pub const RELEASE_S: f32 = 0.060;

/// Oscillator phase (0–1) at note start.
pub const START_PHASE: f32 = 0.25;

/// Engine parameter: voice volume, 0.0–1.0 (multiplies the velocity gain).
pub const PARAM_VOLUME: u16 = 0;
/// Engine parameter: pitch offset in semitones (pitch bend), −48.0–48.0.
pub const PARAM_PITCH_SEMITONES: u16 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Idle,
    Attack,
    Sustain,
    Release,
}

/// A preallocated voice of the pool. All state is plain data; nothing here allocates.
#[derive(Clone, Copy, Debug)]
pub struct Voice {
    stage: Stage,
    level: f32,
    attack_step: f32,
    release_step: f32,
    phase: f32,
    inc: f32,
    note: u8,
    velocity_gain: f32,
    volume: f32,
    pitch_semitones: f32,
    sample_rate: f32,
    /// The engine releases the voice by itself when cluster time passes this (ns).
    pub lease_until: u64,
}

/// MIDI note number to frequency in Hz (A4 = note 69 = 440 Hz).
pub fn note_hz(note: f32) -> f32 {
    440.0 * ((note - 69.0) / 12.0).exp2()
}

impl Voice {
    /// A silent voice for a pool running at `sample_rate` Hz.
    pub fn new(sample_rate: u32) -> Self {
        let sr = sample_rate.max(1) as f32;
        Voice {
            stage: Stage::Idle,
            level: 0.0,
            attack_step: 1.0 / (ATTACK_S * sr).max(1.0),
            release_step: 1.0 / (RELEASE_S * sr).max(1.0),
            phase: 0.0,
            inc: 0.0,
            note: 0,
            velocity_gain: 0.0,
            volume: 1.0,
            pitch_semitones: 0.0,
            sample_rate: sr,
            lease_until: 0,
        }
    }

    /// Whether the voice makes sound (attack, sustain or release).
    pub fn is_active(&self) -> bool {
        self.stage != Stage::Idle
    }

    /// Whether the voice is held (attack or sustain), i.e. not yet released.
    pub fn is_gated(&self) -> bool {
        matches!(self.stage, Stage::Attack | Stage::Sustain)
    }

    /// The note the voice plays (meaningful while active).
    pub fn note(&self) -> u8 {
        self.note
    }

    /// Starts `note` at `velocity` (1–127); restarts from silence if the voice was sounding.
    pub fn note_on(&mut self, note: u8, velocity: u8, lease_until: u64) {
        self.note = note.min(127);
        self.velocity_gain = f32::from(velocity.min(127)) / 127.0;
        self.volume = 1.0;
        self.pitch_semitones = 0.0;
        // Start a quarter period in, so the very first frame of a note is already non-zero
        // (at phase 0 the band-limited saw is exactly 0): onsets are visible sample-exactly.
        self.phase = START_PHASE;
        self.level = 0.0;
        self.stage = Stage::Attack;
        self.lease_until = lease_until;
        self.update_inc();
    }

    /// Starts the release.
    pub fn note_off(&mut self) {
        if self.is_gated() {
            self.stage = Stage::Release;
        }
    }

    /// Sets an engine parameter; returns false for an unknown parameter number.
    pub fn set_param(&mut self, param: u16, value: f32) -> bool {
        if !value.is_finite() {
            return false;
        }
        match param {
            PARAM_VOLUME => self.volume = value.clamp(0.0, 1.0),
            PARAM_PITCH_SEMITONES => {
                self.pitch_semitones = value.clamp(-48.0, 48.0);
                self.update_inc();
            }
            _ => return false,
        }
        true
    }

    fn update_inc(&mut self) {
        let hz = note_hz(f32::from(self.note) + self.pitch_semitones);
        // Keep below Nyquist so PolyBLEP's one-sample correction stays valid.
        self.inc = (hz / self.sample_rate).min(0.45);
    }

    /// Adds the voice's next `out.len()` samples into `out`.
    pub fn render_add(&mut self, out: &mut [f32]) {
        if self.stage == Stage::Idle {
            return;
        }
        let gain = VOICE_GAIN * self.velocity_gain * self.volume;
        for s in out.iter_mut() {
            match self.stage {
                Stage::Attack => {
                    self.level += self.attack_step;
                    if self.level >= 1.0 {
                        self.level = 1.0;
                        self.stage = Stage::Sustain;
                    }
                }
                Stage::Sustain => {}
                Stage::Release => {
                    self.level -= self.release_step;
                    if self.level <= 0.0 {
                        self.level = 0.0;
                        self.stage = Stage::Idle;
                        return;
                    }
                }
                Stage::Idle => return,
            }
            let naive = 2.0 * self.phase - 1.0;
            let y = naive - poly_blep(self.phase, self.inc);
            *s += y * gain * self.level;
            self.phase += self.inc;
            if self.phase >= 1.0 {
                self.phase -= 1.0;
            }
        }
    }
}

/// The PolyBLEP residual that removes the aliasing step of a naive sawtooth at its wrap.
fn poly_blep(t: f32, dt: f32) -> f32 {
    if dt <= 0.0 {
        0.0
    } else if t < dt {
        let x = t / dt;
        x + x - x * x - 1.0
    } else if t > 1.0 - dt {
        let x = (t - 1.0) / dt;
        x * x + x + x + 1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a4_is_440() {
        assert!((note_hz(69.0) - 440.0).abs() < 1e-3);
        assert!((note_hz(81.0) - 880.0).abs() < 1e-2);
    }

    #[test]
    fn envelope_attacks_and_releases_in_time() {
        let sr = 48_000;
        let mut v = Voice::new(sr);
        v.note_on(60, 127, u64::MAX);
        let mut buf = vec![0.0f32; 96];
        v.render_add(&mut buf);
        assert_eq!(v.stage, Stage::Sustain, "2 ms attack = 96 frames");
        v.note_off();
        let mut buf = vec![0.0f32; 2880 + 2];
        v.render_add(&mut buf);
        assert!(!v.is_active(), "60 ms release = 2880 frames");
    }

    #[test]
    fn eight_full_voices_do_not_clip() {
        let mut out = vec![0.0f32; 48_000];
        for n in 0..8u8 {
            let mut v = Voice::new(48_000);
            v.note_on(40 + n * 7, 127, u64::MAX);
            v.render_add(&mut out);
        }
        let peak = out.iter().fold(0.0f32, |m, s| m.max(s.abs()));
        assert!(peak > 0.1 && peak <= 1.0, "peak {peak}");
    }
}
