//! The 2-operator FM engine ("fm2"): a sine modulator (ratio, index, self-feedback, its own
//! ADSR) phase-modulating a sine carrier (its own ADSR), through the same plugin API as the
//! subtractive engine and with the same layout: groups of [`LANES`] voices as structure of
//! arrays, control updates every [`CONTROL_FRAMES`] frames ramped per frame, every continuous
//! parameter smoothed.

// Lane loops index several structure-of-arrays fields in step; that is the layout.
#![allow(clippy::needless_range_loop)]

use super::dsp::{
    AdsrLanes, CONTROL_FRAMES, IDLE, LANES, Lanes, SMOOTHING_S, START_PHASE, VOICE_GAIN, flush,
    note_hz, sin_turns,
};
use super::plugin::{API_VERSION, BuiltinPreset, EngineInfo, ParamInfo, SynthEngine, Tempo};

/// Registry name.
pub const NAME: &str = "fm2";

params! {
    0 VOLUME "volume" 0.0 1.0 1.0 "gain, multiplies the velocity gain";
    1 PITCH_BEND "pitch_bend" -48.0 48.0 0.0 "semitones";
    2 RATIO "ratio" 0.25 16.0 2.0 "modulator frequency / carrier frequency";
    3 INDEX "index" 0.0 20.0 3.0 "modulation index, radians of carrier phase at full modulator envelope";
    4 FEEDBACK "feedback" 0.0 1.0 0.0 "modulator self-modulation";
    5 CARRIER_ATTACK "carrier_attack" 0.0 10.0 0.002 "seconds";
    6 CARRIER_DECAY "carrier_decay" 0.0 10.0 0.6 "seconds";
    7 CARRIER_SUSTAIN "carrier_sustain" 0.0 1.0 0.7 "level";
    8 CARRIER_RELEASE "carrier_release" 0.0 10.0 0.1 "seconds";
    9 MOD_ATTACK "mod_attack" 0.0 10.0 0.002 "seconds";
    10 MOD_DECAY "mod_decay" 0.0 10.0 0.4 "seconds";
    11 MOD_SUSTAIN "mod_sustain" 0.0 1.0 0.4 "level";
    12 MOD_RELEASE "mod_release" 0.0 10.0 0.1 "seconds";
    13 VELOCITY "velocity" 0.0 1.0 1.0 "velocity sensitivity of the gain";
    14 VELOCITY_INDEX "velocity_index" 0.0 1.0 0.5 "velocity sensitivity of the index";
    15 MOD_DETUNE "mod_detune" -20.0 20.0 0.0 "Hz added to the modulator";
}

const NP: usize = 16;

/// Built-in presets; the first is the default patch.
pub static PRESETS: &[BuiltinPreset] = &[
    BuiltinPreset {
        name: "init",
        values: &[],
    },
    BuiltinPreset {
        name: "e-piano",
        values: &[
            ("ratio", 1.0),
            ("index", 2.2),
            ("mod_decay", 0.9),
            ("mod_sustain", 0.1),
            ("carrier_decay", 2.5),
            ("carrier_sustain", 0.2),
            ("carrier_release", 0.3),
            ("mod_detune", 1.5),
        ],
    },
    BuiltinPreset {
        name: "bell",
        values: &[
            ("ratio", 3.5),
            ("index", 5.0),
            ("mod_decay", 2.0),
            ("mod_sustain", 0.0),
            ("carrier_decay", 4.0),
            ("carrier_sustain", 0.0),
            ("carrier_release", 1.5),
        ],
    },
    BuiltinPreset {
        name: "fm-bass",
        values: &[
            ("ratio", 1.0),
            ("index", 4.0),
            ("feedback", 0.4),
            ("mod_decay", 0.15),
            ("mod_sustain", 0.2),
            ("carrier_sustain", 0.9),
            ("carrier_release", 0.05),
        ],
    },
];

/// Registry entry.
pub const INFO: EngineInfo = EngineInfo {
    name: NAME,
    description: "2-operator FM: sine modulator with feedback into a sine carrier, 2 ADSR",
    api_version: API_VERSION,
    params: PARAMS,
    presets: PRESETS,
    factory: |sr, max_block, voices| Box::new(Fm2::new(sr, max_block, voices)),
};

/// Feedback at 1.0, in turns of modulator phase per unit of modulator output.
const FEEDBACK_TURNS: f32 = 0.25;

#[derive(Clone, Debug)]
struct Group {
    target: [Lanes; NP],
    smooth: [Lanes; NP],
    snap: [bool; LANES],
    note: Lanes,
    vel: Lanes,
    pc: Lanes,
    pm: Lanes,
    incc: Lanes,
    incm: Lanes,
    index: Lanes,
    gain: Lanes,
    fb: Lanes,
    m1: Lanes,
    m2: Lanes,
    car: AdsrLanes,
    modu: AdsrLanes,
}

#[derive(Clone, Copy, Debug, Default)]
struct Segment {
    dincc: Lanes,
    dincm: Lanes,
    dindex: Lanes,
    dgain: Lanes,
}

impl Group {
    fn new(sr: f32) -> Self {
        let mut target = [[0.0; LANES]; NP];
        for p in PARAMS {
            target[usize::from(p.id)] = [p.default; LANES];
        }
        let mut g = Group {
            target,
            smooth: target,
            snap: [true; LANES],
            note: [60.0; LANES],
            vel: [0.0; LANES],
            pc: [0.0; LANES],
            pm: [0.0; LANES],
            incc: [0.0; LANES],
            incm: [0.0; LANES],
            index: [0.0; LANES],
            gain: [0.0; LANES],
            fb: [0.0; LANES],
            m1: [0.0; LANES],
            m2: [0.0; LANES],
            car: AdsrLanes::default(),
            modu: AdsrLanes::default(),
        };
        for l in 0..LANES {
            g.set_envelopes(l, sr);
        }
        g
    }

    fn set_envelopes(&mut self, l: usize, sr: f32) {
        let s = |p: u16| self.smooth[usize::from(p)][l];
        let (ca, cd, cs, cr) = (
            s(CARRIER_ATTACK),
            s(CARRIER_DECAY),
            s(CARRIER_SUSTAIN),
            s(CARRIER_RELEASE),
        );
        let (ma, md, ms, mr) = (s(MOD_ATTACK), s(MOD_DECAY), s(MOD_SUSTAIN), s(MOD_RELEASE));
        self.car.set(l, ca, cd, cs, cr, sr);
        self.modu.set(l, ma, md, ms, mr, sr);
    }

    fn control(&mut self, n: usize, sr: f32, seg: &mut Segment) {
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
            let hz = note_hz(self.note[l] + sm(PITCH_BEND));
            let incc = (hz / sr).clamp(0.0, 0.49);
            let incm = ((hz * sm(RATIO) + sm(MOD_DETUNE)) / sr).clamp(0.0, 0.49);
            let v = self.vel[l];
            let vs = sm(VELOCITY);
            let vi = sm(VELOCITY_INDEX);
            let index = sm(INDEX) * (1.0 - vi + vi * v) * (1.0 / core::f32::consts::TAU);
            let gain = VOICE_GAIN * sm(VOLUME) * (1.0 - vs + vs * v);
            self.fb[l] = sm(FEEDBACK) * FEEDBACK_TURNS;
            if snap {
                self.incc[l] = incc;
                self.incm[l] = incm;
                self.index[l] = index;
                self.gain[l] = gain;
            }
            seg.dincc[l] = (incc - self.incc[l]) * inv_n;
            seg.dincm[l] = (incm - self.incm[l]) * inv_n;
            seg.dindex[l] = (index - self.index[l]) * inv_n;
            seg.dgain[l] = (gain - self.gain[l]) * inv_n;
        }
    }

    #[inline(always)]
    fn run(&mut self, s: &Segment, out: &mut [f32]) {
        for o in out.iter_mut() {
            self.modu.tick(1.0);
            self.car.tick(1.0);
            let mut sum = 0.0;
            for l in 0..LANES {
                let incc = self.incc[l] + s.dincc[l];
                let incm = self.incm[l] + s.dincm[l];
                let index = self.index[l] + s.dindex[l];
                let gain = self.gain[l] + s.dgain[l];
                self.incc[l] = incc;
                self.incm[l] = incm;
                self.index[l] = index;
                self.gain[l] = gain;
                let pm = self.pm[l];
                let pc = self.pc[l];
                // Feedback from the mean of the last two outputs, which keeps it from
                // oscillating at Nyquist.
                let fbp = self.fb[l] * 0.5 * (self.m1[l] + self.m2[l]);
                let m = sin_turns(pm + fbp);
                self.m2[l] = self.m1[l];
                self.m1[l] = m;
                let c = sin_turns(pc + m * index * self.modu.level[l]);
                sum += c * gain * self.car.level[l];
                let npm = pm + incm;
                let npc = pc + incc;
                self.pm[l] = if npm >= 1.0 { npm - 1.0 } else { npm };
                self.pc[l] = if npc >= 1.0 { npc - 1.0 } else { npc };
            }
            *o += sum;
        }
    }
}

/// The 2-operator FM engine.
#[derive(Debug)]
pub struct Fm2 {
    sr: f32,
    voices: usize,
    groups: Box<[Group]>,
    avx2: bool,
}

impl Fm2 {
    /// The render loop; inlined into a baseline and an AVX2 build.
    #[inline(always)]
    fn render_groups(&mut self, out: &mut [f32]) {
        let sr = self.sr;
        let mut seg = Segment::default();
        for g in self.groups.iter_mut() {
            if g.car.stage.iter().all(|s| *s == IDLE) {
                continue;
            }
            for chunk in out.chunks_mut(CONTROL_FRAMES) {
                g.control(chunk.len(), sr, &mut seg);
                g.run(&seg, chunk);
            }
            for l in 0..LANES {
                g.m1[l] = flush(g.m1[l]);
                g.m2[l] = flush(g.m2[l]);
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
        let mut e = Fm2 {
            sr: 48_000.0,
            voices,
            groups: Box::new([]),
            avx2: super::dsp::has_avx2(),
        };
        e.init(sample_rate, max_block);
        e
    }
}

impl SynthEngine for Fm2 {
    fn api_version(&self) -> u32 {
        API_VERSION
    }

    fn info(&self) -> &'static EngineInfo {
        &super::plugin::engines()[1]
    }

    fn init(&mut self, sample_rate: u32, _max_block: usize) {
        self.sr = sample_rate.max(1) as f32;
        self.groups = (0..self.voices.div_ceil(LANES))
            .map(|_| Group::new(self.sr))
            .collect();
    }

    fn voices(&self) -> usize {
        self.voices
    }

    fn note_on(&mut self, voice: usize, note: u8, velocity: u8) {
        if voice >= self.voices {
            return;
        }
        let g = &mut self.groups[voice / LANES];
        let l = voice % LANES;
        g.note[l] = f32::from(note.min(127));
        g.vel[l] = f32::from(velocity.min(127)) / 127.0;
        if g.car.stage[l] == IDLE {
            g.snap[l] = true;
            // A quarter turn in: the carrier is non-zero on the note's first frame.
            g.pc[l] = START_PHASE;
            g.pm[l] = 0.0;
            g.m1[l] = 0.0;
            g.m2[l] = 0.0;
            g.car.level[l] = 0.0;
            g.modu.level[l] = 0.0;
        }
        g.car.gate_on(l);
        g.modu.gate_on(l);
    }

    fn note_off(&mut self, voice: usize) {
        if voice >= self.voices {
            return;
        }
        let g = &mut self.groups[voice / LANES];
        g.car.gate_off(voice % LANES);
        g.modu.gate_off(voice % LANES);
    }

    fn set_param(&mut self, voice: usize, param: u16, value: f32) -> bool {
        let Some(info) = PARAMS.get(usize::from(param)) else {
            return false;
        };
        if voice >= self.voices || !value.is_finite() {
            return false;
        }
        self.groups[voice / LANES].target[usize::from(param)][voice % LANES] =
            value.clamp(info.min, info.max);
        true
    }

    fn param(&self, voice: usize, param: u16) -> Option<f32> {
        if voice >= self.voices || usize::from(param) >= NP {
            return None;
        }
        Some(self.groups[voice / LANES].target[usize::from(param)][voice % LANES])
    }

    fn set_tempo(&mut self, _tempo: Tempo) {}

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
        voice < self.voices && self.groups[voice / LANES].car.stage[voice % LANES] != IDLE
    }

    fn active_voices(&self) -> usize {
        self.groups
            .iter()
            .map(|g| g.car.stage.iter().filter(|s| **s != IDLE).count())
            .sum()
    }
}
