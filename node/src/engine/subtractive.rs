//! The reference subtractive voice ("subtractive", the default engine).
//!
//! Per voice: two band-limited oscillators (saw, square, triangle, sine; cubic-B-spline BLEP
//! for the steps, BLAMP for the triangle's corners; osc 2 detunable and optionally hard-synced
//! to osc 1), white noise, a trapezoidal state-variable filter (LP/BP/HP, cutoff with key
//! tracking, filter-envelope and LFO modulation, resonance), an amp and a filter ADSR, an LFO
//! (free-running in Hz or locked to the cluster timeline in beats), velocity response and glide.
//!
//! Layout: voices are processed in groups of [`LANES`]; every piece of state is an array over
//! the lanes of a group, and the per-frame loop runs over lanes, so it compiles to SIMD. Groups
//! with no sounding voice are skipped. Every [`CONTROL_FRAMES`] frames a control update smooths
//! the parameters (one-pole, [`SMOOTHING_S`]), advances glide, LFO and filter envelope and
//! computes the phase increments, filter coefficient and gain for the end of the next segment;
//! the audio loop ramps linearly to them, so no parameter change steps. Discrete choices
//! (waveform, filter mode) are smoothed too: the weight of choice k is max(0, 1 − |m − k|) for
//! the smoothed index m, which crossfades between neighbours.

// Lane loops index several structure-of-arrays fields in step; that is the layout.
#![allow(clippy::needless_range_loop)]

use super::dsp::{
    AdsrLanes, CONTROL_FRAMES, IDLE, LANES, Lanes, SMOOTHING_S, START_PHASE, VOICE_GAIN, flush,
    noise, note_hz, saw, sin_phase, sin_turns, triangle,
};
use super::plugin::{API_VERSION, BuiltinPreset, EngineInfo, ParamInfo, SynthEngine, Tempo};

/// Registry name.
pub const NAME: &str = "subtractive";

params! {
    0 VOLUME "volume" 0.0 1.0 1.0 "gain, multiplies the velocity gain";
    1 PITCH_BEND "pitch_bend" -48.0 48.0 0.0 "semitones";
    2 OSC1_WAVE "osc1_wave" 0.0 3.0 0.0 "0 saw, 1 square, 2 triangle, 3 sine";
    3 OSC2_WAVE "osc2_wave" 0.0 3.0 0.0 "0 saw, 1 square, 2 triangle, 3 sine";
    4 OSC2_SEMITONES "osc2_semitones" -24.0 24.0 0.0 "semitones";
    5 OSC2_DETUNE "osc2_detune" -100.0 100.0 0.0 "cents";
    6 OSC_MIX "osc_mix" 0.0 1.0 0.0 "0 osc 1 only … 1 osc 2 only";
    7 NOISE "noise" 0.0 1.0 0.0 "noise level";
    8 HARD_SYNC "hard_sync" 0.0 1.0 0.0 "0 off, 1 osc 2 restarts with osc 1";
    9 FILTER_MODE "filter_mode" 0.0 2.0 0.0 "0 low-pass, 1 band-pass, 2 high-pass";
    10 CUTOFF "cutoff" 20.0 20000.0 20000.0 "Hz";
    11 RESONANCE "resonance" 0.0 1.0 0.0 "0 (Q 0.707) … 1 (Q 50)";
    12 KEY_TRACK "key_track" 0.0 1.0 0.0 "octaves of cutoff per octave of pitch (from C4)";
    13 FILTER_ENV "filter_env" -8.0 8.0 0.0 "octaves of cutoff at full filter envelope";
    14 AMP_ATTACK "amp_attack" 0.0 10.0 0.002 "seconds";
    15 AMP_DECAY "amp_decay" 0.0 10.0 0.0 "seconds";
    16 AMP_SUSTAIN "amp_sustain" 0.0 1.0 1.0 "level";
    17 AMP_RELEASE "amp_release" 0.0 10.0 0.06 "seconds";
    18 FILTER_ATTACK "filter_attack" 0.0 10.0 0.002 "seconds";
    19 FILTER_DECAY "filter_decay" 0.0 10.0 0.2 "seconds";
    20 FILTER_SUSTAIN "filter_sustain" 0.0 1.0 0.0 "level";
    21 FILTER_RELEASE "filter_release" 0.0 10.0 0.1 "seconds";
    22 LFO_RATE "lfo_rate" 0.01 50.0 5.0 "Hz (when lfo_sync_beats is 0)";
    23 LFO_SYNC_BEATS "lfo_sync_beats" 0.0 64.0 0.0 "0 free; else one LFO cycle per this many beats of the cluster timeline";
    24 LFO_PITCH "lfo_pitch" 0.0 12.0 0.0 "semitones of vibrato";
    25 LFO_CUTOFF "lfo_cutoff" 0.0 8.0 0.0 "octaves of cutoff";
    26 LFO_AMP "lfo_amp" 0.0 1.0 0.0 "tremolo depth";
    27 VELOCITY "velocity" 0.0 1.0 1.0 "velocity sensitivity of the gain (and of filter_env)";
    28 GLIDE "glide" 0.0 5.0 0.0 "seconds (time constant) from the voice's previous note";
}

const NP: usize = 29;

/// Built-in presets; the first is the default patch.
pub static PRESETS: &[BuiltinPreset] = &[
    BuiltinPreset {
        name: "init",
        values: &[],
    },
    BuiltinPreset {
        name: "warm-pad",
        values: &[
            ("osc2_detune", 9.0),
            ("osc_mix", 0.5),
            ("cutoff", 1800.0),
            ("resonance", 0.2),
            ("key_track", 0.5),
            ("filter_env", 1.5),
            ("filter_attack", 0.4),
            ("filter_decay", 1.0),
            ("filter_sustain", 0.3),
            ("amp_attack", 0.35),
            ("amp_decay", 0.5),
            ("amp_sustain", 0.8),
            ("amp_release", 1.2),
            ("lfo_rate", 0.5),
            ("lfo_cutoff", 0.5),
        ],
    },
    BuiltinPreset {
        name: "acid-bass",
        values: &[
            ("osc1_wave", 1.0),
            ("cutoff", 300.0),
            ("resonance", 0.8),
            ("filter_env", 4.0),
            ("filter_decay", 0.18),
            ("amp_decay", 0.3),
            ("amp_sustain", 0.6),
            ("amp_release", 0.05),
            ("glide", 0.04),
        ],
    },
    BuiltinPreset {
        name: "sync-lead",
        values: &[
            ("osc2_semitones", 7.0),
            ("osc_mix", 1.0),
            ("hard_sync", 1.0),
            ("cutoff", 6000.0),
            ("key_track", 1.0),
            ("lfo_rate", 5.5),
            ("lfo_pitch", 0.15),
            ("amp_release", 0.2),
        ],
    },
    BuiltinPreset {
        name: "tempo-wobble",
        values: &[
            ("osc1_wave", 0.0),
            ("osc2_wave", 1.0),
            ("osc2_detune", -12.0),
            ("osc_mix", 0.4),
            ("cutoff", 400.0),
            ("resonance", 0.6),
            ("lfo_sync_beats", 0.5),
            ("lfo_cutoff", 3.0),
        ],
    },
];

/// Registry entry.
pub const INFO: EngineInfo = EngineInfo {
    name: NAME,
    description: "two PolyBLEP oscillators, noise, state-variable filter, 2 ADSR, LFO, glide",
    api_version: API_VERSION,
    params: PARAMS,
    presets: PRESETS,
    factory: |sr, max_block, voices| Box::new(Subtractive::new(sr, max_block, voices)),
};

/// Largest phase increment (cycles per frame): keeps one wrap per two frames at most, which
/// the 4-frame BLEP needs.
const MAX_INC: f32 = 0.45;
const MIN_INC: f32 = 1e-7;

/// State of one group of [`LANES`] voices (structure of arrays).
#[derive(Clone, Debug)]
struct Group {
    target: [Lanes; NP],
    smooth: [Lanes; NP],
    snap: [bool; LANES],
    note_target: Lanes,
    note: Lanes,
    vel: Lanes,
    p1: Lanes,
    p2: Lanes,
    inc1: Lanes,
    inc2: Lanes,
    g: Lanes,
    k: Lanes,
    gain: Lanes,
    ic1: Lanes,
    ic2: Lanes,
    lfo_phase: Lanes,
    amp: AdsrLanes,
    fenv: AdsrLanes,
    noise: [u32; LANES],
}

/// Per-frame ramps and per-segment constants computed by the control update.
#[derive(Clone, Copy, Debug, Default)]
struct Segment {
    dinc1: Lanes,
    dinc2: Lanes,
    dg: Lanes,
    dgain: Lanes,
    w1: [Lanes; 4],
    w2: [Lanes; 4],
    mix: Lanes,
    noise: Lanes,
    sync: Lanes,
    mode: [Lanes; 3],
}

/// The subtractive engine.
#[derive(Debug)]
pub struct Subtractive {
    sr: f32,
    voices: usize,
    groups: Box<[Group]>,
    avx2: bool,
    tempo: Tempo,
}

fn wave_weights(m: f32) -> [f32; 4] {
    core::array::from_fn(|k| (1.0 - (m - k as f32).abs()).max(0.0))
}

impl Subtractive {
    /// The render loop; inlined into a baseline and an AVX2 build.
    #[inline(always)]
    fn render_groups(&mut self, out: &mut [f32]) {
        let sr = self.sr;
        let start = self.tempo;
        let mut seg = Segment::default();
        for g in self.groups.iter_mut() {
            if !g.active() {
                continue;
            }
            let mut done = 0usize;
            for chunk in out.chunks_mut(CONTROL_FRAMES) {
                let mut tempo = start;
                tempo.beat += start.beats_per_second * done as f64 / f64::from(sr);
                g.control(chunk.len(), sr, tempo, &mut seg);
                g.fenv.tick(chunk.len() as f32);
                let sq = seg.w1[1].iter().chain(seg.w2[1].iter()).any(|w| *w > 0.0);
                let tri = seg.w1[2].iter().chain(seg.w2[2].iter()).any(|w| *w > 0.0);
                let sin = seg.w1[3].iter().chain(seg.w2[3].iter()).any(|w| *w > 0.0);
                match (sq, tri, sin) {
                    (false, false, false) => run::<false, false, false>(g, &seg, chunk),
                    (true, false, false) => run::<true, false, false>(g, &seg, chunk),
                    (false, true, false) => run::<false, true, false>(g, &seg, chunk),
                    (false, false, true) => run::<false, false, true>(g, &seg, chunk),
                    _ => run::<true, true, true>(g, &seg, chunk),
                }
                done += chunk.len();
            }
            for l in 0..LANES {
                g.ic1[l] = flush(g.ic1[l]);
                g.ic2[l] = flush(g.ic2[l]);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn render_avx2(&mut self, out: &mut [f32]) {
        self.render_groups(out);
    }

    /// An engine of `voices` voices at `sample_rate` Hz.
    pub fn new(sample_rate: u32, max_block: usize, voices: usize) -> Self {
        let mut e = Subtractive {
            sr: 48_000.0,
            voices,
            groups: Box::new([]),
            avx2: super::dsp::has_avx2(),
            tempo: Tempo::default(),
        };
        e.init(sample_rate, max_block);
        e
    }

    fn lane(voice: usize) -> (usize, usize) {
        (voice / LANES, voice % LANES)
    }

    fn stored(param: u16, value: f32) -> f32 {
        match param {
            CUTOFF => value.log2(),
            OSC1_WAVE | OSC2_WAVE | FILTER_MODE | HARD_SYNC => value.round(),
            _ => value,
        }
    }
}

impl Group {
    fn new(sr: f32, seed: u32) -> Self {
        let defaults: Lanes = [0.0; LANES];
        let mut target = [defaults; NP];
        for p in PARAMS {
            target[usize::from(p.id)] = [Subtractive::stored(p.id, p.default); LANES];
        }
        let mut g = Group {
            target,
            smooth: target,
            snap: [true; LANES],
            note_target: [60.0; LANES],
            note: [60.0; LANES],
            vel: [0.0; LANES],
            p1: [0.0; LANES],
            p2: [0.0; LANES],
            inc1: [MIN_INC; LANES],
            inc2: [MIN_INC; LANES],
            g: [0.0; LANES],
            k: [1.4; LANES],
            gain: [0.0; LANES],
            ic1: [0.0; LANES],
            ic2: [0.0; LANES],
            lfo_phase: [0.0; LANES],
            amp: AdsrLanes::default(),
            fenv: AdsrLanes::default(),
            noise: core::array::from_fn(|l| {
                (seed.wrapping_mul(LANES as u32) + l as u32).wrapping_mul(0x9E37_79B9) | 1
            }),
        };
        for l in 0..LANES {
            g.set_envelopes(l, sr);
        }
        g
    }

    fn set_envelopes(&mut self, l: usize, sr: f32) {
        let s = &self.smooth;
        self.amp.set(
            l,
            s[usize::from(AMP_ATTACK)][l],
            s[usize::from(AMP_DECAY)][l],
            s[usize::from(AMP_SUSTAIN)][l],
            s[usize::from(AMP_RELEASE)][l],
            sr,
        );
        self.fenv.set(
            l,
            s[usize::from(FILTER_ATTACK)][l],
            s[usize::from(FILTER_DECAY)][l],
            s[usize::from(FILTER_SUSTAIN)][l],
            s[usize::from(FILTER_RELEASE)][l],
            sr,
        );
    }

    fn active(&self) -> bool {
        self.amp.stage.iter().any(|s| *s != IDLE)
    }

    /// Control update for a segment of `n` frames: smooths, advances the slow modulators and
    /// sets the ramps the audio loop follows.
    fn control(&mut self, n: usize, sr: f32, tempo: Tempo, seg: &mut Segment) {
        let nf = n as f32;
        let ks = 1.0 - (-nf / (SMOOTHING_S * sr)).exp();
        let inv_n = 1.0 / nf;
        for l in 0..LANES {
            let snap = self.snap[l];
            self.snap[l] = false;
            for p in 0..NP {
                let t = self.target[p][l];
                let s = &mut self.smooth[p][l];
                *s = if snap { t } else { *s + (t - *s) * ks };
            }
            self.set_envelopes(l, sr);
            let sm = |p: u16| self.smooth[usize::from(p)][l];
            // Glide: one-pole towards the target note.
            let glide = sm(GLIDE);
            let kg = if glide <= 0.0 || snap {
                1.0
            } else {
                1.0 - (-nf / (glide * sr)).exp()
            };
            self.note[l] += (self.note_target[l] - self.note[l]) * kg;
            // LFO: free-running, or locked to the cluster beat.
            let beats = sm(LFO_SYNC_BEATS);
            let lfo_inc;
            if beats > 0.0 {
                lfo_inc = tempo.beats_per_second as f32 / (beats * sr);
                if tempo.from_timeline {
                    let ph = (tempo.beat / f64::from(beats)).rem_euclid(1.0) as f32;
                    self.lfo_phase[l] = ph;
                }
            } else {
                lfo_inc = sm(LFO_RATE) / sr;
            }
            let lfo = sin_turns(self.lfo_phase[l]);
            self.lfo_phase[l] = (self.lfo_phase[l] + lfo_inc * nf).fract();
            let note = self.note[l];
            let pitch1 = note + sm(PITCH_BEND) + lfo * sm(LFO_PITCH);
            let pitch2 = pitch1 + sm(OSC2_SEMITONES) + sm(OSC2_DETUNE) * 0.01;
            let inc1 = (note_hz(pitch1) / sr).clamp(MIN_INC, MAX_INC);
            let inc2 = (note_hz(pitch2) / sr).clamp(MIN_INC, MAX_INC);
            let vsens = sm(VELOCITY);
            let vel = 1.0 - vsens + vsens * self.vel[l];
            let oct = sm(CUTOFF)
                + sm(KEY_TRACK) * (note - 60.0) * (1.0 / 12.0)
                + sm(FILTER_ENV) * self.fenv.level[l] * vel
                + sm(LFO_CUTOFF) * lfo;
            let fc = oct.exp2().clamp(20.0, (0.45 * sr).min(20_000.0));
            let g = (core::f32::consts::PI * fc / sr).tan();
            let gain = VOICE_GAIN * sm(VOLUME) * vel * (1.0 - sm(LFO_AMP) * (0.5 + 0.5 * lfo));
            if snap {
                self.inc1[l] = inc1;
                self.inc2[l] = inc2;
                self.g[l] = g;
                self.gain[l] = gain;
            }
            seg.dinc1[l] = (inc1 - self.inc1[l]) * inv_n;
            seg.dinc2[l] = (inc2 - self.inc2[l]) * inv_n;
            seg.dg[l] = (g - self.g[l]) * inv_n;
            seg.dgain[l] = (gain - self.gain[l]) * inv_n;
            let w1 = wave_weights(sm(OSC1_WAVE));
            let w2 = wave_weights(sm(OSC2_WAVE));
            for k in 0..4 {
                seg.w1[k][l] = w1[k];
                seg.w2[k][l] = w2[k];
            }
            seg.mix[l] = sm(OSC_MIX);
            seg.noise[l] = sm(NOISE);
            seg.sync[l] = sm(HARD_SYNC);
            let m = sm(FILTER_MODE);
            for k in 0..3 {
                seg.mode[k][l] = (1.0 - (m - k as f32).abs()).max(0.0);
            }
            self.k[l] = core::f32::consts::SQRT_2 - 1.394_2 * sm(RESONANCE);
        }
    }
}

/// The per-frame loop of one group over `out`, for the waveforms in use (`SQ`, `TRI`, `SIN`;
/// the saw always runs, it is also half of the square).
#[inline(always)]
fn run<const SQ: bool, const TRI: bool, const SIN: bool>(
    g: &mut Group,
    s: &Segment,
    out: &mut [f32],
) {
    for o in out.iter_mut() {
        let mut y = [0.0f32; LANES];
        for l in 0..LANES {
            let inc1 = g.inc1[l] + s.dinc1[l];
            let inc2 = g.inc2[l] + s.dinc2[l];
            g.inc1[l] = inc1;
            g.inc2[l] = inc2;
            let ii1 = 1.0 / inc1;
            let ii2 = 1.0 / inc2;
            let p1 = g.p1[l];
            let p2 = g.p2[l];
            let mut o1 = s.w1[0][l] * saw(p1, ii1);
            let mut o2 = s.w2[0][l] * saw(p2, ii2);
            if SQ {
                let q1 = if p1 >= 0.5 { p1 - 0.5 } else { p1 + 0.5 };
                let q2 = if p2 >= 0.5 { p2 - 0.5 } else { p2 + 0.5 };
                o1 += s.w1[1][l] * (saw(q1, ii1) - saw(p1, ii1));
                o2 += s.w2[1][l] * (saw(q2, ii2) - saw(p2, ii2));
            }
            if TRI {
                o1 += s.w1[2][l] * triangle(p1, inc1, ii1);
                o2 += s.w2[2][l] * triangle(p2, inc2, ii2);
            }
            if SIN {
                o1 += s.w1[3][l] * sin_phase(p1);
                o2 += s.w2[3][l] * sin_phase(p2);
            }
            let n = noise(&mut g.noise[l]);
            let x = o1 + (o2 - o1) * s.mix[l] + n * s.noise[l];
            // Advance the oscillators; osc 2 restarts where osc 1 wrapped when synced.
            let mut np1 = p1 + inc1;
            let wrapped = np1 >= 1.0;
            if wrapped {
                np1 -= 1.0;
            }
            let mut np2 = p2 + inc2;
            if np2 >= 1.0 {
                np2 -= 1.0;
            }
            if wrapped && s.sync[l] > 0.5 {
                np2 = np1 * inc2 * ii1;
            }
            g.p1[l] = np1;
            g.p2[l] = np2;
            // Trapezoidal state-variable filter.
            let gg = g.g[l] + s.dg[l];
            g.g[l] = gg;
            let k = g.k[l];
            let a1 = 1.0 / (1.0 + gg * (gg + k));
            let a2 = gg * a1;
            let a3 = gg * a2;
            let ic1 = g.ic1[l];
            let ic2 = g.ic2[l];
            let v3 = x - ic2;
            let v1 = a1 * ic1 + a2 * v3;
            let v2 = ic2 + a2 * ic1 + a3 * v3;
            g.ic1[l] = 2.0 * v1 - ic1;
            g.ic2[l] = 2.0 * v2 - ic2;
            let f = s.mode[0][l] * v2 + s.mode[1][l] * v1 + s.mode[2][l] * (x - k * v1 - v2);
            let gain = g.gain[l] + s.dgain[l];
            g.gain[l] = gain;
            y[l] = f * gain;
        }
        g.amp.tick(1.0);
        let mut sum = 0.0;
        for l in 0..LANES {
            sum += y[l] * g.amp.level[l];
        }
        *o += sum;
    }
}

impl SynthEngine for Subtractive {
    fn api_version(&self) -> u32 {
        API_VERSION
    }

    fn info(&self) -> &'static EngineInfo {
        &super::plugin::engines()[0]
    }

    fn init(&mut self, sample_rate: u32, _max_block: usize) {
        // Render calls of any length work: they are cut into control segments.
        self.sr = sample_rate.max(1) as f32;
        let groups = self.voices.div_ceil(LANES);
        self.groups = (0..groups)
            .map(|i| Group::new(self.sr, i as u32 + 1))
            .collect();
    }

    fn voices(&self) -> usize {
        self.voices
    }

    fn note_on(&mut self, voice: usize, note: u8, velocity: u8) {
        if voice >= self.voices {
            return;
        }
        let (gi, l) = Self::lane(voice);
        let g = &mut self.groups[gi];
        let from_silence = g.amp.stage[l] == IDLE;
        g.note_target[l] = f32::from(note.min(127));
        g.vel[l] = f32::from(velocity.min(127)) / 127.0;
        if from_silence {
            g.snap[l] = true;
            g.note[l] = g.note_target[l];
            g.p1[l] = START_PHASE;
            g.p2[l] = START_PHASE;
            g.ic1[l] = 0.0;
            g.ic2[l] = 0.0;
            g.amp.level[l] = 0.0;
            g.fenv.level[l] = 0.0;
        }
        g.amp.gate_on(l);
        g.fenv.gate_on(l);
    }

    fn note_off(&mut self, voice: usize) {
        if voice >= self.voices {
            return;
        }
        let (gi, l) = Self::lane(voice);
        self.groups[gi].amp.gate_off(l);
        self.groups[gi].fenv.gate_off(l);
    }

    fn set_param(&mut self, voice: usize, param: u16, value: f32) -> bool {
        let Some(info) = PARAMS.get(usize::from(param)) else {
            return false;
        };
        if voice >= self.voices || !value.is_finite() {
            return false;
        }
        let (gi, l) = Self::lane(voice);
        let v = Self::stored(param, value.clamp(info.min, info.max));
        self.groups[gi].target[usize::from(param)][l] = v;
        true
    }

    fn param(&self, voice: usize, param: u16) -> Option<f32> {
        if voice >= self.voices || usize::from(param) >= NP {
            return None;
        }
        let (gi, l) = Self::lane(voice);
        let v = self.groups[gi].target[usize::from(param)][l];
        Some(if param == CUTOFF { v.exp2() } else { v })
    }

    fn set_tempo(&mut self, tempo: Tempo) {
        self.tempo = tempo;
    }

    fn render_add(&mut self, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is only set when the CPU reported AVX2 (`dsp::has_avx2`).
            unsafe { self.render_avx2(out) };
            return;
        }
        self.render_groups(out);
    }

    fn is_active(&self, voice: usize) -> bool {
        if voice >= self.voices {
            return false;
        }
        let (gi, l) = Self::lane(voice);
        self.groups[gi].amp.stage[l] != IDLE
    }

    fn active_voices(&self) -> usize {
        self.groups
            .iter()
            .map(|g| g.amp.stage.iter().filter(|s| **s != IDLE).count())
            .sum()
    }
}
