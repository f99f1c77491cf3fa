//! The engine plugin API: a versioned [`SynthEngine`] trait and a static registry.
//!
//! An engine owns every voice of the pool and renders them all at once, so it can lay their
//! state out as structure-of-arrays and vectorise across voices. The scheduler
//! ([`Engine`](super::Engine)) owns time: it splits each block at the frame of every event and
//! calls the engine's event methods between two [`SynthEngine::render_add`] calls, so an event
//! always applies at frame 0 of the next `render_add` — engines never see offsets and never need
//! to sort events, and a block without events is one uninterrupted call.
//!
//! Engines are registered in [`engines`] (a static table, no dynamic loading); [`create`] builds
//! one by name. The names the node announces (`Hello.engines`, the mDNS `engines` TXT key) come
//! from [`ENGINE_NAMES`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the [`SynthEngine`] trait. An engine reports the version it was written against
/// and [`create`] refuses one that differs.
pub const API_VERSION: u32 = 1;

/// Parameter common to every engine: voice volume, 0–1 (multiplies the velocity gain).
pub const PARAM_VOLUME: u16 = 0;
/// Parameter common to every engine: pitch offset in semitones (pitch bend), −48–48.
pub const PARAM_PITCH_SEMITONES: u16 = 1;

/// The tempo the scheduler passes down before each render call (from the cluster
/// [`Timeline`](voicemesh_protocol::Timeline), or 120 BPM free-running without one).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tempo {
    /// Beat position at the first frame of the next render call.
    pub beat: f64,
    /// Beats per second.
    pub beats_per_second: f64,
    /// Whether `beat` comes from a cluster timeline (then tempo-synced LFOs lock their phase to
    /// it, so every node's LFOs agree).
    pub from_timeline: bool,
}

impl Default for Tempo {
    fn default() -> Self {
        Tempo {
            beat: 0.0,
            beats_per_second: 2.0,
            from_timeline: false,
        }
    }
}

/// One parameter of an engine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamInfo {
    /// Parameter number (the `param` of a `Param` event).
    pub id: u16,
    /// Name used in presets.
    pub name: &'static str,
    /// Smallest value; smaller values are clamped.
    pub min: f32,
    /// Largest value; larger values are clamped.
    pub max: f32,
    /// Value of a fresh voice.
    pub default: f32,
    /// Unit or meaning of the value.
    pub unit: &'static str,
}

/// A built-in preset: parameter names and values; the rest keep their defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BuiltinPreset {
    /// Preset name.
    pub name: &'static str,
    /// `(parameter name, value)` pairs.
    pub values: &'static [(&'static str, f32)],
}

/// A registry entry.
#[derive(Clone, Copy, Debug)]
pub struct EngineInfo {
    /// Engine name (announced in `Hello` and the TXT record).
    pub name: &'static str,
    /// One line about the engine.
    pub description: &'static str,
    /// The [`API_VERSION`] the engine implements.
    pub api_version: u32,
    /// Its parameters, in id order.
    pub params: &'static [ParamInfo],
    /// Its built-in presets; the first is the default patch of a fresh voice.
    pub presets: &'static [BuiltinPreset],
    /// Builds the engine: sample rate (Hz), largest render call (frames), voices.
    pub factory: fn(u32, usize, usize) -> Box<dyn SynthEngine>,
}

impl EngineInfo {
    /// The parameter called `name`.
    pub fn param(&self, name: &str) -> Option<&'static ParamInfo> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The built-in preset called `name`, as a [`Preset`].
    pub fn preset(&self, name: &str) -> Option<Preset> {
        let b = self.presets.iter().find(|p| p.name == name)?;
        Some(Preset {
            engine: self.name.to_string(),
            name: b.name.to_string(),
            params: b.values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        })
    }

    /// Parameter values of the built-in preset `preset`, indexed by id (defaults elsewhere).
    pub fn preset_values(&self, preset: &BuiltinPreset) -> Vec<f32> {
        let mut v: Vec<f32> = self.params.iter().map(|p| p.default).collect();
        for (name, value) in preset.values {
            if let Some(p) = self.param(name) {
                v[usize::from(p.id)] = value.clamp(p.min, p.max);
            }
        }
        v
    }
}

/// A synth engine: every voice of a pool, rendered together.
///
/// Contract: `render_add` and the event methods run on the audio thread and must not allocate,
/// lock, block or log; a voice index is always below the pool size given at creation; bad
/// values (unknown parameter, NaN) are refused by returning `false`, never by panicking.
/// `save_state`/`load_state` may allocate and are for the control side (before the engine is
/// handed to the audio thread, or in offline renders).
pub trait SynthEngine: Send + std::fmt::Debug {
    /// The [`API_VERSION`] this engine implements.
    fn api_version(&self) -> u32;
    /// Its registry entry.
    fn info(&self) -> &'static EngineInfo;
    /// (Re)initialises for `sample_rate` Hz and render calls of at most `max_block` frames:
    /// every voice silent, every parameter at its default. May allocate.
    fn init(&mut self, sample_rate: u32, max_block: usize);
    /// Number of voices.
    fn voices(&self) -> usize;
    /// Starts `note` at `velocity` on `voice`. A sounding voice is stolen without a click: it
    /// keeps its phase and attacks from its current level.
    fn note_on(&mut self, voice: usize, note: u8, velocity: u8);
    /// Releases `voice`.
    fn note_off(&mut self, voice: usize);
    /// Sets parameter `param` of `voice` (clamped to its range, smoothed); false for an unknown
    /// parameter or a non-finite value.
    fn set_param(&mut self, voice: usize, param: u16, value: f32) -> bool;
    /// Current target value of a parameter of a voice.
    fn param(&self, voice: usize, param: u16) -> Option<f32>;
    /// The tempo at the first frame of the next render call.
    fn set_tempo(&mut self, tempo: Tempo);
    /// Adds the next `out.len()` frames (at most `max_block`) of every voice into `out`.
    fn render_add(&mut self, out: &mut [f32]);
    /// Whether `voice` makes sound.
    fn is_active(&self, voice: usize) -> bool;
    /// Number of voices making sound.
    fn active_voices(&self) -> usize;

    /// Every voice's parameter values (not real-time safe).
    fn save_state(&self) -> EngineState {
        let n = self.info().params.len() as u16;
        EngineState {
            engine: self.info().name.to_string(),
            api_version: self.api_version(),
            voices: (0..self.voices())
                .map(|v| (0..n).map(|p| self.param(v, p).unwrap_or(0.0)).collect())
                .collect(),
        }
    }

    /// Restores parameter values saved by [`SynthEngine::save_state`] (not real-time safe).
    /// Voices beyond the saved ones keep theirs; extra values are ignored.
    fn load_state(&mut self, state: &EngineState) -> Result<(), StateError> {
        if state.engine != self.info().name {
            return Err(StateError::WrongEngine(state.engine.clone()));
        }
        if state.api_version != self.api_version() {
            return Err(StateError::Version(state.api_version));
        }
        for (v, values) in state.voices.iter().take(self.voices()).enumerate() {
            for (p, value) in values.iter().enumerate().take(self.info().params.len()) {
                self.set_param(v, p as u16, *value);
            }
        }
        Ok(())
    }
}

/// Saved engine state (serde): parameter values of every voice, indexed by parameter id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineState {
    /// Engine name.
    pub engine: String,
    /// [`API_VERSION`] it was saved with.
    pub api_version: u32,
    /// Per voice, per parameter id.
    pub voices: Vec<Vec<f32>>,
}

/// Why a saved state was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum StateError {
    /// Saved by another engine.
    #[error("state belongs to engine {0:?}")]
    WrongEngine(String),
    /// Saved with another API version.
    #[error("state has API version {0}, engine has {API_VERSION}")]
    Version(u32),
}

/// A preset (serde): an engine's parameters by name. Unknown names are ignored and missing ones
/// keep their value, so presets survive parameters being added.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preset {
    /// Engine name.
    pub engine: String,
    /// Preset name.
    pub name: String,
    /// Parameter name → value.
    pub params: BTreeMap<String, f32>,
}

impl Preset {
    /// `(param id, value)` pairs for the engine `info` (values clamped to their ranges); the
    /// control side sends them as `Param` events. Unknown names are skipped.
    pub fn param_values(&self, info: &EngineInfo) -> Vec<(u16, f32)> {
        self.params
            .iter()
            .filter_map(|(k, v)| {
                let p = info.param(k)?;
                v.is_finite().then(|| (p.id, v.clamp(p.min, p.max)))
            })
            .collect()
    }

    /// Applies the preset to `voice` of `engine` (not real-time safe); returns how many values
    /// were refused (unknown name or wrong engine counts every value).
    pub fn apply(&self, engine: &mut dyn SynthEngine, voice: usize) -> usize {
        if engine.info().name != self.engine {
            return self.params.len();
        }
        let values = self.param_values(engine.info());
        let refused = self.params.len() - values.len();
        for (p, v) in values {
            engine.set_param(voice, p, v);
        }
        refused
    }
}

/// An engine name the registry does not know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown engine {0:?} (known: subtractive, fm2)")]
pub struct UnknownEngine(pub String);

/// Name of the default engine.
pub const DEFAULT_ENGINE: &str = "subtractive";

static REGISTRY: [EngineInfo; 2] = [super::subtractive::INFO, super::fm2::INFO];

/// Number of registered engines.
pub const ENGINE_COUNT: usize = 2;

/// Names of the registered engines, default first (what the node announces).
pub const ENGINE_NAMES: [&str; ENGINE_COUNT] = [super::subtractive::NAME, super::fm2::NAME];

/// Every registered engine.
pub fn engines() -> &'static [EngineInfo] {
    &REGISTRY
}

/// The registry entry called `name`.
pub fn engine_info(name: &str) -> Result<&'static EngineInfo, UnknownEngine> {
    REGISTRY
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| UnknownEngine(name.to_string()))
}

/// Builds engine `name` for `voices` voices at `sample_rate` Hz and render calls of at most
/// `max_block` frames.
pub fn create(
    name: &str,
    sample_rate: u32,
    max_block: usize,
    voices: usize,
) -> Result<Box<dyn SynthEngine>, UnknownEngine> {
    let info = engine_info(name)?;
    let e = (info.factory)(sample_rate.max(1), max_block.max(1), voices);
    if e.api_version() != API_VERSION {
        return Err(UnknownEngine(format!(
            "{name} (API version {} ≠ {API_VERSION})",
            e.api_version()
        )));
    }
    Ok(e)
}
