//! The CV router: which output of which MCU node carries what, and the MIDI controllers those
//! outputs follow.
//!
//! A sans-IO core like the allocator. Its configuration ([`CvConfig`]) says which output — a
//! (node id, CV channel) pair, [`CvOutput`] — carries what: the pitch, velocity and gate (or
//! trigger) of a voice slot the allocator hands out on an MCU node ([`CvVoice`]), or a
//! continuous source ([`CvRoute`]: pitch bend, a CC, channel aftertouch, a clock derived from
//! the tempo timeline, a reset pulse at every bar start), with a per-output [`Calibration`]
//! table (volts → DAC code).
//!
//! The MCU node computes the voltages itself, at each event's cluster time: the router turns
//! the configuration into one [`CvAssign`] per output ([`CvRouter::assignments`]), the
//! allocator's `VoiceOn`/`VoiceOff`/`LeaseRenew` reach the MCU's voice slots like any node's, and
//! MIDI controllers become [`Control`] messages to the MCUs whose outputs follow them
//! ([`CvRouter::handle_midi`]), stamped `now + lookahead`. Clock and reset pulses come from the
//! timeline the MCU got in its `Welcome`. Both ends compute with the same integer arithmetic,
//! `voicemesh_protocol::cv` (1 V/octave pitch, 7/14-bit scaling, calibration), so
//! [`CvRouter::dac_code`] gives exactly the code the MCU writes for a voltage.
//!
//! Call order (the glue does this; nothing here reads a clock):
//! 1. Build with [`CvRouter::new`] from a validated config; [`CvRouter::set_config`] replaces it
//!    at run time (and bumps [`CvRouter::generation`], so the MCU links re-send assignments).
//! 2. When an MCU joins, and again from time to time, send it [`CvRouter::assignments`].
//! 3. Feed MIDI controllers through [`CvRouter::handle_midi`] and send the `Control`s it returns;
//!    [`CvRouter::refresh_controls`] re-sends the last value of every controller a node follows.
#![deny(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use voicemesh_protocol::cv::calibrated_code;
use voicemesh_protocol::{
    ClusterTime, Control, ControlKind, CvAssign, CvFunction, Message, VoiceId,
};

use crate::allocator::MidiEvent;

/// Something the glue must send: a message to a node — the allocator's action type, so the
/// glue sends both through one path.
pub use crate::allocator::Action;

/// Largest voltage magnitude a route may ask for, in volts (Eurorack rails are ±12 V).
pub const MAX_VOLTS: f64 = 15.0;
/// Most points in one calibration table (what one `CvAssign` can carry to the MCU).
pub const MAX_CAL_POINTS: usize = voicemesh_protocol::MAX_CV_CAL_POINTS;
/// Most CV channels of one MCU node: outputs use channels `0 … MAX_CHANNELS − 1`.
pub const MAX_CHANNELS: u16 = voicemesh_protocol::MAX_CV_CHANNELS as u16;
/// Longest glide, in milliseconds.
pub const MAX_GLIDE_MS: u16 = 10_000;
/// Most voices, routes and tables in one CV configuration (each).
pub const MAX_ENTRIES: usize = 256;
/// Longest trigger or clock pulse, in milliseconds.
pub const MAX_PULSE_MS: u32 = 1000;
/// Finest clock resolution, in pulses per quarter note.
pub const MAX_PPQN: u32 = 96;

/// One CV output: a channel on an MCU node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CvOutput {
    /// The MCU node's id (as in its Hello).
    pub node: String,
    /// CV channel on that node.
    pub channel: u16,
}

/// How a voice's gate output behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum GateMode {
    /// High while the note is held.
    Gate,
    /// A pulse of `ms` milliseconds at every note-on, whatever the note's length.
    Trigger {
        /// Pulse length in milliseconds (1–1000).
        ms: u32,
    },
}

fn default_gate_volts() -> f64 {
    5.0
}
fn default_velocity_volts() -> f64 {
    5.0
}
fn default_base_note() -> u8 {
    36
}
fn default_bend() -> f64 {
    2.0
}
fn default_gate_mode() -> GateMode {
    GateMode::Gate
}

/// The outputs of one voice slot on an MCU node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CvVoice {
    /// The MCU node whose voice slot this is.
    pub node: String,
    /// The voice slot (as in `VoiceOn.voice`).
    pub voice: VoiceId,
    /// 1 V/oct pitch output.
    #[serde(default)]
    pub pitch: Option<CvOutput>,
    /// Velocity output: 0 V … `velocity_volts` for velocity 0 … 127.
    #[serde(default)]
    pub velocity: Option<CvOutput>,
    /// Gate or trigger output.
    #[serde(default)]
    pub gate: Option<CvOutput>,
    /// Gate or trigger.
    #[serde(default = "default_gate_mode")]
    pub gate_mode: GateMode,
    /// The note that is 0 V on the pitch output (default 36, C2).
    #[serde(default = "default_base_note")]
    pub base_note: u8,
    /// Pitch bend range added to the pitch output, in whole semitones 0–48 (default 2).
    #[serde(default = "default_bend")]
    pub bend_semitones: f64,
    /// Portamento of the pitch output from one note to the next, in ms (default 0: jump).
    #[serde(default)]
    pub glide_ms: u16,
    /// Gate-high level in volts (default 5).
    #[serde(default = "default_gate_volts")]
    pub gate_volts: f64,
    /// Velocity 127 in volts (default 5).
    #[serde(default = "default_velocity_volts")]
    pub velocity_volts: f64,
}

/// A continuous source for a [`CvRoute`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CvSource {
    /// Pitch bend of a MIDI channel: −8192 → `min_volts`, +8191 → `max_volts`.
    PitchBend {
        /// MIDI channel, 0–15.
        channel: u8,
    },
    /// A control change: 0 → `min_volts`, 127 → `max_volts`.
    Cc {
        /// MIDI channel, 0–15.
        channel: u8,
        /// Controller number, 0–127.
        cc: u8,
    },
    /// Channel aftertouch (pressure): 0 → `min_volts`, 127 → `max_volts`.
    Aftertouch {
        /// MIDI channel, 0–15.
        channel: u8,
    },
    /// Clock pulses from the timeline: `max_volts` for `pulse_ms`, then `min_volts`.
    Clock {
        /// Pulses per quarter note (1–96); pulse 0 of every beat is on the beat.
        ppqn: u32,
        /// Pulse length in milliseconds.
        pulse_ms: u32,
    },
    /// A pulse at the start of every bar of the timeline.
    Reset {
        /// Beats per bar (1–64).
        beats_per_bar: u32,
        /// Pulse length in milliseconds.
        pulse_ms: u32,
    },
}

/// A continuous source routed to an output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CvRoute {
    /// What drives the output.
    pub source: CvSource,
    /// Where it goes.
    pub output: CvOutput,
    /// Voltage at the source's lowest value (or a pulse's low level), default 0.
    #[serde(default)]
    pub min_volts: f64,
    /// Voltage at the source's highest value (or a pulse's high level), default 5.
    #[serde(default = "default_gate_volts")]
    pub max_volts: f64,
}

/// One measured point of a calibration table.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalPoint {
    /// Output voltage measured.
    pub volts: f64,
    /// DAC code that produced it.
    pub code: i32,
}

/// The calibration table of one output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelCalibration {
    /// The output it belongs to.
    pub output: CvOutput,
    /// At least two points, volts strictly increasing, codes strictly monotone.
    pub points: Vec<CalPoint>,
}

/// The whole CV configuration: voices, continuous routes and calibration tables.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CvConfig {
    /// Voice slots on MCU nodes and their pitch/velocity/gate outputs.
    #[serde(default)]
    pub voices: Vec<CvVoice>,
    /// Continuous sources.
    #[serde(default)]
    pub routes: Vec<CvRoute>,
    /// Calibration tables, at most one per output.
    #[serde(default)]
    pub calibration: Vec<ChannelCalibration>,
}

/// Why a CV configuration was refused: the field (a JSON path such as `routes[2].source.ppqn`)
/// and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct CvConfigError {
    /// Path of the offending field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> CvConfigError {
    CvConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// A validated, piecewise-linear map from microvolts to DAC codes (the points of a
/// [`ChannelCalibration`], in microvolts as the wire carries them).
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    points: Vec<voicemesh_protocol::CalPoint>,
}

impl Calibration {
    /// Checks a table: 2–16 points, finite volts within ±[`MAX_VOLTS`], volts strictly
    /// increasing to the microvolt (unsorted or duplicate points are refused, not sorted),
    /// codes strictly increasing or strictly decreasing. `field` names the table in errors.
    pub fn new(points: &[CalPoint], field: &str) -> Result<Self, CvConfigError> {
        if points.len() < 2 {
            return Err(err(field, "a calibration table needs at least 2 points"));
        }
        if points.len() > MAX_CAL_POINTS {
            return Err(err(
                field,
                format!("at most {MAX_CAL_POINTS} points per table"),
            ));
        }
        let mut wire = Vec::with_capacity(points.len());
        for (i, p) in points.iter().enumerate() {
            check_volts(p.volts, &format!("{field}[{i}].volts"))?;
            wire.push(voicemesh_protocol::CalPoint {
                microvolts: uv(p.volts),
                code: p.code,
            });
        }
        let rising = points[1].code > points[0].code;
        for (i, w) in wire.windows(2).enumerate() {
            if w[1].microvolts <= w[0].microvolts {
                return Err(err(
                    format!("{field}[{}].volts", i + 1),
                    format!(
                        "points must be sorted by volts with no duplicates ({} V after {} V)",
                        points[i + 1].volts,
                        points[i].volts
                    ),
                ));
            }
            if w[1].code == w[0].code || (w[1].code > w[0].code) != rising {
                return Err(err(
                    format!("{field}[{}].code", i + 1),
                    "codes must be strictly increasing or strictly decreasing",
                ));
            }
        }
        Ok(Calibration { points: wire })
    }

    /// The DAC code for `microvolts`: linear between neighbouring points, clamped to the
    /// table's first and last code outside it (a DAC cannot go beyond what was measured) —
    /// `voicemesh_protocol::cv::calibrated_code`, the function the MCU uses.
    pub fn code(&self, microvolts: i32) -> i32 {
        // The table was checked in `new`, so the shared function always has an answer.
        calibrated_code(&self.points, microvolts).unwrap_or(self.points[0].code)
    }

    /// The points as the wire carries them.
    pub fn points(&self) -> &[voicemesh_protocol::CalPoint] {
        &self.points
    }
}

fn check_output(o: &CvOutput, field: &str) -> Result<(), CvConfigError> {
    if o.node.is_empty() || o.node.len() > 32 {
        return Err(err(
            format!("{field}.node"),
            "a node id of 1–32 bytes is required",
        ));
    }
    if o.channel >= MAX_CHANNELS {
        return Err(err(
            format!("{field}.channel"),
            format!("must be 0–{}", MAX_CHANNELS - 1),
        ));
    }
    Ok(())
}

fn check_volts(v: f64, field: &str) -> Result<(), CvConfigError> {
    if !v.is_finite() || v.abs() > MAX_VOLTS {
        return Err(err(
            field,
            format!("must be a finite number within ±{MAX_VOLTS} V"),
        ));
    }
    Ok(())
}

fn check_pulse(ms: u32, field: &str) -> Result<(), CvConfigError> {
    if !(1..=MAX_PULSE_MS).contains(&ms) {
        return Err(err(field, format!("must be 1–{MAX_PULSE_MS} ms")));
    }
    Ok(())
}

fn check_channel(c: u8, field: &str) -> Result<(), CvConfigError> {
    if c > 15 {
        return Err(err(field, "MIDI channel must be 0–15"));
    }
    Ok(())
}

impl CvConfig {
    /// Checks every value and that no output is driven by two things. The error names the
    /// first offending field.
    pub fn validate<'a>(&'a self) -> Result<(), CvConfigError> {
        for (name, n) in [
            ("voices", self.voices.len()),
            ("routes", self.routes.len()),
            ("calibration", self.calibration.len()),
        ] {
            if n > MAX_ENTRIES {
                return Err(err(name, format!("at most {MAX_ENTRIES} entries")));
            }
        }
        let mut used: BTreeMap<&CvOutput, String> = BTreeMap::new();
        let mut claim = |out: &'a CvOutput, field: String| match used.get(out) {
            Some(other) => Err(err(
                field,
                format!(
                    "output {}/{} is already driven by {other}",
                    out.node, out.channel
                ),
            )),
            None => {
                used.insert(out, field);
                Ok(())
            }
        };
        let mut slots = BTreeMap::new();
        for (i, v) in self.voices.iter().enumerate() {
            let f = format!("voices[{i}]");
            if v.node.is_empty() || v.node.len() > 32 {
                return Err(err(
                    format!("{f}.node"),
                    "a node id of 1–32 bytes is required",
                ));
            }
            if let Some(j) = slots.insert((&v.node, v.voice), i) {
                return Err(err(
                    format!("{f}.voice"),
                    format!(
                        "voice {} of {} is already routed by voices[{j}]",
                        v.voice, v.node
                    ),
                ));
            }
            if v.base_note > 127 {
                return Err(err(format!("{f}.base_note"), "must be 0–127"));
            }
            if !(0.0..=48.0).contains(&v.bend_semitones) || v.bend_semitones.fract() != 0.0 {
                return Err(err(
                    format!("{f}.bend_semitones"),
                    "must be a whole number of semitones, 0–48",
                ));
            }
            if v.glide_ms > MAX_GLIDE_MS {
                return Err(err(
                    format!("{f}.glide_ms"),
                    format!("must be 0–{MAX_GLIDE_MS}"),
                ));
            }
            check_volts(v.gate_volts, &format!("{f}.gate_volts"))?;
            check_volts(v.velocity_volts, &format!("{f}.velocity_volts"))?;
            if let GateMode::Trigger { ms } = v.gate_mode {
                check_pulse(ms, &format!("{f}.gate_mode.ms"))?;
            }
            for (name, o) in [
                ("pitch", &v.pitch),
                ("velocity", &v.velocity),
                ("gate", &v.gate),
            ] {
                if let Some(o) = o {
                    let g = format!("{f}.{name}");
                    check_output(o, &g)?;
                    claim(o, g)?;
                }
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let f = format!("routes[{i}]");
            check_volts(r.min_volts, &format!("{f}.min_volts"))?;
            check_volts(r.max_volts, &format!("{f}.max_volts"))?;
            let s = format!("{f}.source");
            match r.source {
                CvSource::PitchBend { channel } | CvSource::Aftertouch { channel } => {
                    check_channel(channel, &format!("{s}.channel"))?;
                }
                CvSource::Cc { channel, cc } => {
                    check_channel(channel, &format!("{s}.channel"))?;
                    if cc > 127 {
                        return Err(err(format!("{s}.cc"), "controller must be 0–127"));
                    }
                }
                CvSource::Clock { ppqn, pulse_ms } => {
                    if !(1..=MAX_PPQN).contains(&ppqn) {
                        return Err(err(format!("{s}.ppqn"), format!("must be 1–{MAX_PPQN}")));
                    }
                    check_pulse(pulse_ms, &format!("{s}.pulse_ms"))?;
                }
                CvSource::Reset {
                    beats_per_bar,
                    pulse_ms,
                } => {
                    if !(1..=64).contains(&beats_per_bar) {
                        return Err(err(format!("{s}.beats_per_bar"), "must be 1–64"));
                    }
                    check_pulse(pulse_ms, &format!("{s}.pulse_ms"))?;
                }
            }
            let g = format!("{f}.output");
            check_output(&r.output, &g)?;
            claim(&r.output, g)?;
        }
        let mut tables = BTreeMap::new();
        for (i, c) in self.calibration.iter().enumerate() {
            let f = format!("calibration[{i}]");
            check_output(&c.output, &format!("{f}.output"))?;
            if let Some(j) = tables.insert(&c.output, i) {
                return Err(err(
                    format!("{f}.output"),
                    format!("output already has a table in calibration[{j}]"),
                ));
            }
            Calibration::new(&c.points, &format!("{f}.points"))?;
        }
        Ok(())
    }
}

/// A MIDI controller an output can follow: (kind, MIDI channel, controller number).
type ControlKey = (ControlKindKey, u8, u8);

/// [`ControlKind`] as an ordered map key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ControlKindKey {
    PitchBend,
    Cc,
    Aftertouch,
}

impl ControlKindKey {
    fn wire(self) -> ControlKind {
        match self {
            ControlKindKey::PitchBend => ControlKind::PitchBend,
            ControlKindKey::Cc => ControlKind::Cc,
            ControlKindKey::Aftertouch => ControlKind::Aftertouch,
        }
    }
}

/// Turns the CV configuration into assignments and MIDI controllers into `Control`s. See the
/// module docs for the call order.
#[derive(Debug)]
pub struct CvRouter {
    cfg: CvConfig,
    cal: BTreeMap<CvOutput, Calibration>,
    lookahead_ns: u64,
    generation: u64,
    /// Last value of every controller some output follows, and the `at` it was sent with.
    controls: BTreeMap<ControlKey, (u16, ClusterTime)>,
}

impl CvRouter {
    /// A router for `cfg` (checked with [`CvConfig::validate`]), events stamped
    /// `now + lookahead_ns`.
    pub fn new(cfg: CvConfig, lookahead_ns: u64) -> Result<Self, CvConfigError> {
        let mut r = CvRouter {
            cfg: CvConfig::default(),
            cal: BTreeMap::new(),
            lookahead_ns,
            generation: 0,
            controls: BTreeMap::new(),
        };
        r.set_config(cfg)?;
        Ok(r)
    }

    /// The configuration in force.
    pub fn config(&self) -> &CvConfig {
        &self.cfg
    }

    /// Counts configuration changes: the MCU links re-send assignments when it moves.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Replaces the configuration (validated first; on error nothing changes). The MCUs get
    /// the new assignments from their links; voices keep playing.
    pub fn set_config(&mut self, cfg: CvConfig) -> Result<(), CvConfigError> {
        cfg.validate()?;
        let mut cal = BTreeMap::new();
        for (i, c) in cfg.calibration.iter().enumerate() {
            let table = Calibration::new(&c.points, &format!("calibration[{i}].points"))?;
            cal.insert(c.output.clone(), table);
        }
        self.cal = cal;
        self.cfg = cfg;
        self.generation += 1;
        Ok(())
    }

    /// The DAC code for `microvolts` on `output`, through its calibration table (the code the
    /// MCU writes); `None` without a table (the MCU then uses its DAC's nominal line).
    pub fn dac_code(&self, output: &CvOutput, microvolts: i32) -> Option<i32> {
        self.cal.get(output).map(|c| c.code(microvolts))
    }

    /// Every node an output of the configuration is on.
    pub fn nodes(&self) -> BTreeSet<&str> {
        self.outputs().map(|(o, _)| o.node.as_str()).collect()
    }

    /// Every configured output and the assignment it gets (calibration still empty).
    fn outputs(&self) -> impl Iterator<Item = (&CvOutput, CvAssign)> {
        let voices = self.cfg.voices.iter().flat_map(|v| {
            let base = CvAssign {
                voice: v.voice,
                ..off(0)
            };
            let pitch = v.pitch.as_ref().map(|o| {
                let a = CvAssign {
                    function: CvFunction::Pitch,
                    base_note: v.base_note,
                    // Validated: a whole number 0–48.
                    bend_semitones: v.bend_semitones as u8,
                    glide_ms: v.glide_ms,
                    ..base.clone()
                };
                (o, a)
            });
            let velocity = v.velocity.as_ref().map(|o| {
                let a = CvAssign {
                    function: CvFunction::Velocity,
                    max_uv: uv(v.velocity_volts),
                    ..base.clone()
                };
                (o, a)
            });
            let gate = v.gate.as_ref().map(|o| {
                let (function, pulse_ms) = match v.gate_mode {
                    GateMode::Gate => (CvFunction::Gate, 0),
                    GateMode::Trigger { ms } => (CvFunction::Trigger, ms),
                };
                let a = CvAssign {
                    function,
                    max_uv: uv(v.gate_volts),
                    // Validated: at most MAX_PULSE_MS.
                    pulse_ms: pulse_ms as u16,
                    ..base.clone()
                };
                (o, a)
            });
            [pitch, velocity, gate].into_iter().flatten()
        });
        let routes = self.cfg.routes.iter().map(|r| {
            let base = CvAssign {
                min_uv: uv(r.min_volts),
                max_uv: uv(r.max_volts),
                ..off(0)
            };
            let a = match r.source {
                CvSource::PitchBend { channel } => CvAssign {
                    function: CvFunction::PitchBend,
                    midi_channel: channel,
                    ..base
                },
                CvSource::Cc { channel, cc } => CvAssign {
                    function: CvFunction::Cc,
                    midi_channel: channel,
                    param: u16::from(cc),
                    ..base
                },
                CvSource::Aftertouch { channel } => CvAssign {
                    function: CvFunction::Aftertouch,
                    midi_channel: channel,
                    ..base
                },
                // Validated: ppqn ≤ 96, beats per bar ≤ 64, pulses ≤ 1000 ms.
                CvSource::Clock { ppqn, pulse_ms } => CvAssign {
                    function: CvFunction::Clock,
                    param: ppqn as u16,
                    pulse_ms: pulse_ms as u16,
                    ..base
                },
                CvSource::Reset {
                    beats_per_bar,
                    pulse_ms,
                } => CvAssign {
                    function: CvFunction::Reset,
                    param: beats_per_bar as u16,
                    pulse_ms: pulse_ms as u16,
                    ..base
                },
            };
            (&r.output, a)
        });
        voices.chain(routes)
    }

    /// What each of `node`'s first `channels` outputs does: one `CvAssign` per channel, channel 0
    /// first, `off` where nothing is routed, each with its calibration table. At most
    /// [`MAX_CHANNELS`].
    pub fn assignments(&self, node: &str, channels: u16) -> Vec<CvAssign> {
        let channels = channels.min(MAX_CHANNELS);
        let mut out: Vec<CvAssign> = (0..channels).map(off).collect();
        for (o, a) in self.outputs().filter(|(o, _)| o.node == node) {
            if let Some(slot) = out.get_mut(usize::from(o.channel)) {
                *slot = CvAssign {
                    channel: o.channel,
                    ..a
                };
            }
        }
        for a in &mut out {
            let o = CvOutput {
                node: node.to_owned(),
                channel: a.channel,
            };
            if let Some(c) = self.cal.get(&o) {
                // A validated table has at most MAX_CAL_POINTS = the wire's capacity.
                a.calibration = c.points().iter().copied().take(MAX_CAL_POINTS).collect();
            }
        }
        out
    }

    /// Whether an output on `node` follows controller `key`: pitch bend moves every pitch
    /// output (the MCU applies a voice's channel's bend) and the bend routes of its channel;
    /// CCs and aftertouch their routes.
    fn follows(&self, node: &str, key: ControlKey) -> bool {
        self.outputs().any(|(o, a)| {
            o.node == node
                && match (key.0, a.function) {
                    (ControlKindKey::PitchBend, CvFunction::Pitch) => true,
                    (ControlKindKey::PitchBend, CvFunction::PitchBend)
                    | (ControlKindKey::Aftertouch, CvFunction::Aftertouch) => {
                        a.midi_channel == key.1
                    }
                    (ControlKindKey::Cc, CvFunction::Cc) => {
                        a.midi_channel == key.1 && a.param == u16::from(key.2)
                    }
                    _ => false,
                }
        })
    }

    fn control(key: ControlKey, value: u16, at: ClusterTime) -> Message {
        Message::Control(Control {
            midi_channel: key.1,
            kind: key.0.wire(),
            number: key.2,
            value,
            at,
        })
    }

    /// One MIDI event from the input, as the allocator gets it: pitch bend, control changes and
    /// channel aftertouch become a [`Control`] at `now + lookahead` for every MCU node with an
    /// output that follows them. Notes reach MCU voice slots through the allocator; other
    /// events are ignored here.
    #[must_use]
    pub fn handle_midi(&mut self, now: ClusterTime, ev: &MidiEvent) -> Vec<Action> {
        let (key, value) = match *ev {
            MidiEvent::PitchBend { channel, value } => (
                (ControlKindKey::PitchBend, channel & 15, 0),
                // −8192 … 8191 → the 14-bit wire value 0 … 16383.
                (i32::from(value).clamp(-8192, 8191) + 8192) as u16,
            ),
            MidiEvent::ControlChange {
                channel,
                controller,
                value,
            } => (
                (ControlKindKey::Cc, channel & 15, controller & 127),
                u16::from(value.min(127)),
            ),
            MidiEvent::ChannelPressure { channel, value } => (
                (ControlKindKey::Aftertouch, channel & 15, 0),
                u16::from(value.min(127)),
            ),
            _ => return Vec::new(),
        };
        let at = ClusterTime(now.0.saturating_add(self.lookahead_ns));
        let nodes: Vec<String> = self
            .nodes()
            .into_iter()
            .filter(|n| self.follows(n, key))
            .map(str::to_owned)
            .collect();
        if nodes.is_empty() {
            return Vec::new();
        }
        self.controls.insert(key, (value, at));
        nodes
            .into_iter()
            .map(|n| (n, Self::control(key, value, at)))
            .collect()
    }

    /// The last value of every controller an output of `node` follows, stamped
    /// `now + lookahead` or with its own `at` if that is later (a refresh never brings a change
    /// forward). For an MCU that restarted or lost a datagram.
    #[must_use]
    pub fn refresh_controls(&self, now: ClusterTime, node: &str) -> Vec<Message> {
        let soonest = ClusterTime(now.0.saturating_add(self.lookahead_ns));
        self.controls
            .iter()
            .filter(|(k, _)| self.follows(node, **k))
            .map(|(&k, &(value, at))| Self::control(k, value, at.max(soonest)))
            .collect()
    }
}

/// An output that is not driven (`off`, resting at 0 V), every other field 0.
fn off(channel: u16) -> CvAssign {
    CvAssign::new(channel, CvFunction::Off)
}

/// Volts to microvolts, rounded; the inputs are validated to ±[`MAX_VOLTS`], so the cast
/// never saturates.
fn uv(volts: f64) -> i32 {
    (volts * 1e6).round() as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn out(node: &str, channel: u16) -> CvOutput {
        CvOutput {
            node: node.into(),
            channel,
        }
    }

    fn voice(gate_mode: GateMode) -> CvVoice {
        CvVoice {
            node: "mcu".into(),
            voice: 0,
            pitch: Some(out("mcu", 0)),
            velocity: Some(out("mcu", 1)),
            gate: Some(out("mcu", 2)),
            gate_mode,
            base_note: 36,
            bend_semitones: 2.0,
            glide_ms: 0,
            gate_volts: 5.0,
            velocity_volts: 5.0,
        }
    }

    fn route(source: CvSource, channel: u16, min_volts: f64, max_volts: f64) -> CvRoute {
        CvRoute {
            source,
            output: out("mcu", channel),
            min_volts,
            max_volts,
        }
    }

    fn router(cfg: CvConfig) -> CvRouter {
        CvRouter::new(cfg, 5_000_000).expect("valid config")
    }

    fn cal(points: &[(f64, i32)]) -> Vec<CalPoint> {
        points
            .iter()
            .map(|&(volts, code)| CalPoint { volts, code })
            .collect()
    }

    fn full() -> CvConfig {
        CvConfig {
            voices: vec![CvVoice {
                glide_ms: 40,
                ..voice(GateMode::Trigger { ms: 10 })
            }],
            routes: vec![
                route(CvSource::Cc { channel: 2, cc: 74 }, 3, 0.0, 10.0),
                route(CvSource::Aftertouch { channel: 1 }, 4, 0.0, 5.0),
                route(CvSource::PitchBend { channel: 0 }, 5, -5.0, 5.0),
                route(
                    CvSource::Clock {
                        ppqn: 24,
                        pulse_ms: 5,
                    },
                    6,
                    0.0,
                    5.0,
                ),
                route(
                    CvSource::Reset {
                        beats_per_bar: 4,
                        pulse_ms: 7,
                    },
                    7,
                    0.0,
                    5.0,
                ),
            ],
            calibration: vec![ChannelCalibration {
                output: out("mcu", 0),
                points: cal(&[(-5.0, 0), (0.0, 2048), (5.0, 4095)]),
            }],
        }
    }

    #[test]
    fn assignments_say_what_every_channel_does() {
        let r = router(full());
        let a = r.assignments("mcu", 10);
        assert_eq!(a.len(), 10);
        assert!(
            a.iter()
                .enumerate()
                .all(|(i, a)| usize::from(a.channel) == i)
        );
        let f: Vec<CvFunction> = a.iter().map(|a| a.function).collect();
        use CvFunction::*;
        assert_eq!(
            f,
            vec![
                Pitch, Velocity, Trigger, Cc, Aftertouch, PitchBend, Clock, Reset, Off, Off
            ]
        );
        assert_eq!(
            (
                a[0].voice,
                a[0].base_note,
                a[0].bend_semitones,
                a[0].glide_ms
            ),
            (0, 36, 2, 40)
        );
        assert_eq!(
            a[0].calibration.as_slice(),
            &[
                voicemesh_protocol::CalPoint {
                    microvolts: -5_000_000,
                    code: 0
                },
                voicemesh_protocol::CalPoint {
                    microvolts: 0,
                    code: 2048
                },
                voicemesh_protocol::CalPoint {
                    microvolts: 5_000_000,
                    code: 4095
                },
            ]
        );
        assert_eq!((a[1].min_uv, a[1].max_uv), (0, 5_000_000));
        assert_eq!((a[2].max_uv, a[2].pulse_ms), (5_000_000, 10));
        assert_eq!(
            (a[3].midi_channel, a[3].param, a[3].max_uv),
            (2, 74, 10_000_000)
        );
        assert_eq!(a[4].midi_channel, 1);
        assert_eq!((a[5].min_uv, a[5].max_uv), (-5_000_000, 5_000_000));
        assert_eq!((a[6].param, a[6].pulse_ms), (24, 5));
        assert_eq!((a[7].param, a[7].pulse_ms), (4, 7));
        assert!(a[1..].iter().all(|a| a.calibration.is_empty()));
        // Gate mode and another node.
        let r = router(CvConfig {
            voices: vec![voice(GateMode::Gate)],
            ..Default::default()
        });
        assert_eq!(r.assignments("mcu", 3)[2].function, Gate);
        assert!(r.assignments("other", 4).iter().all(|a| a.function == Off));
        // Fewer channels than routed: the rest is not sent; never more than the wire carries.
        assert_eq!(r.assignments("mcu", 1).len(), 1);
        assert_eq!(r.assignments("mcu", u16::MAX).len(), 32);
    }

    #[test]
    fn controllers_reach_the_nodes_whose_outputs_follow_them() {
        let mut cfg = full();
        cfg.routes.push(CvRoute {
            output: out("other", 0),
            ..route(CvSource::Cc { channel: 0, cc: 1 }, 0, 0.0, 5.0)
        });
        let mut r = router(cfg);
        let now = ClusterTime(1_000);
        let ctl = |a: &[Action]| -> Vec<(String, u8, ControlKind, u8, u16, u64)> {
            a.iter()
                .map(|(n, m)| match m {
                    Message::Control(c) => {
                        (n.clone(), c.midi_channel, c.kind, c.number, c.value, c.at.0)
                    }
                    other => panic!("not a Control: {other:?}"),
                })
                .collect()
        };
        let a = r.handle_midi(
            now,
            &MidiEvent::ControlChange {
                channel: 2,
                controller: 74,
                value: 127,
            },
        );
        assert_eq!(
            ctl(&a),
            vec![("mcu".into(), 2, ControlKind::Cc, 74, 127, 5_001_000)]
        );
        let a = r.handle_midi(
            now,
            &MidiEvent::ControlChange {
                channel: 0,
                controller: 1,
                value: 64,
            },
        );
        assert_eq!(
            ctl(&a),
            vec![("other".into(), 0, ControlKind::Cc, 1, 64, 5_001_000)]
        );
        // Nobody follows CC 7 or aftertouch on channel 0.
        for e in [
            MidiEvent::ControlChange {
                channel: 0,
                controller: 7,
                value: 1,
            },
            MidiEvent::ChannelPressure {
                channel: 0,
                value: 1,
            },
            MidiEvent::NoteOn {
                channel: 0,
                note: 60,
                velocity: 1,
            },
        ] {
            assert!(r.handle_midi(now, &e).is_empty(), "{e:?}");
        }
        let a = r.handle_midi(
            now,
            &MidiEvent::ChannelPressure {
                channel: 1,
                value: 200,
            },
        );
        assert_eq!(
            ctl(&a),
            vec![("mcu".into(), 1, ControlKind::Aftertouch, 0, 127, 5_001_000)]
        );
        // Pitch bend on any channel moves the pitch outputs: 14-bit on the wire.
        for (bend, wire) in [(-8192, 0), (0, 8192), (8191, 16383)] {
            let a = r.handle_midi(
                now,
                &MidiEvent::PitchBend {
                    channel: 9,
                    value: bend,
                },
            );
            assert_eq!(
                ctl(&a),
                vec![("mcu".into(), 9, ControlKind::PitchBend, 0, wire, 5_001_000)]
            );
        }
    }

    #[test]
    fn refresh_resends_last_controller_values_never_earlier() {
        let mut r = router(full());
        let cc = MidiEvent::ControlChange {
            channel: 2,
            controller: 74,
            value: 100,
        };
        let _ = r.handle_midi(ClusterTime(1_000_000_000), &cc);
        let bend = MidiEvent::PitchBend {
            channel: 0,
            value: 100,
        };
        let _ = r.handle_midi(ClusterTime(1_000_000_000), &bend);
        // Before the changes' own time: they keep it.
        let m = r.refresh_controls(ClusterTime(990_000_000), "mcu");
        assert_eq!(m.len(), 2);
        assert!(
            m.iter()
                .all(|m| matches!(m, Message::Control(c) if c.at.0 == 1_005_000_000)),
            "{m:?}"
        );
        // Later: stamped now + lookahead.
        let m = r.refresh_controls(ClusterTime(2_000_000_000), "mcu");
        assert!(
            m.iter()
                .all(|m| matches!(m, Message::Control(c) if c.at.0 == 2_005_000_000)),
            "{m:?}"
        );
        assert!(r.refresh_controls(ClusterTime(0), "other").is_empty());
        // A new configuration bumps the generation; unrelated controllers are not re-sent.
        let g = r.generation();
        r.set_config(CvConfig::default()).unwrap();
        assert_eq!(r.generation(), g + 1);
        assert!(r.refresh_controls(ClusterTime(0), "mcu").is_empty());
    }

    #[test]
    fn dac_code_is_the_shared_calibration() {
        let r = router(full());
        assert_eq!(r.dac_code(&out("mcu", 0), 2_500_000), Some(3072));
        assert_eq!(r.dac_code(&out("mcu", 0), 9_000_000), Some(4095));
        assert_eq!(r.dac_code(&out("mcu", 1), 0), None);
        // The note the MCU plays: 1 V above the base note, through the table.
        let uv = voicemesh_protocol::cv::pitch_microvolts(48, 36, 0, 200);
        assert_eq!(r.dac_code(&out("mcu", 0), uv), Some(2457));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut two = voice(GateMode::Gate);
        two.voice = 1;
        let cases: Vec<(CvConfig, &str)> = vec![
            (
                CvConfig {
                    voices: vec![voice(GateMode::Gate), two.clone()],
                    ..Default::default()
                },
                "voices[1].pitch",
            ),
            (
                CvConfig {
                    voices: vec![CvVoice {
                        gate_mode: GateMode::Trigger { ms: 0 },
                        ..voice(GateMode::Gate)
                    }],
                    ..Default::default()
                },
                "voices[0].gate_mode.ms",
            ),
            (
                CvConfig {
                    voices: vec![CvVoice {
                        bend_semitones: 2.5,
                        ..voice(GateMode::Gate)
                    }],
                    ..Default::default()
                },
                "voices[0].bend_semitones",
            ),
            (
                CvConfig {
                    voices: vec![CvVoice {
                        glide_ms: 10_001,
                        ..voice(GateMode::Gate)
                    }],
                    ..Default::default()
                },
                "voices[0].glide_ms",
            ),
            (
                CvConfig {
                    routes: vec![route(
                        CvSource::Clock {
                            ppqn: 0,
                            pulse_ms: 5,
                        },
                        0,
                        0.0,
                        f64::NAN,
                    )],
                    ..Default::default()
                },
                "routes[0].max_volts",
            ),
            (
                CvConfig {
                    routes: vec![route(CvSource::Aftertouch { channel: 0 }, 32, 0.0, 5.0)],
                    ..Default::default()
                },
                "routes[0].output.channel",
            ),
            (
                CvConfig {
                    calibration: vec![ChannelCalibration {
                        output: out("m", 0),
                        points: cal(&[(1.0, 10), (1.0, 20)]),
                    }],
                    ..Default::default()
                },
                "calibration[0].points[1].volts",
            ),
            (
                CvConfig {
                    calibration: vec![ChannelCalibration {
                        output: out("m", 0),
                        points: (0..17)
                            .map(|i| CalPoint {
                                volts: f64::from(i) / 4.0,
                                code: i,
                            })
                            .collect(),
                    }],
                    ..Default::default()
                },
                "calibration[0].points",
            ),
        ];
        for (cfg, field) in cases {
            let e = cfg.validate().expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn calibration_interpolates_and_clamps() {
        let c = Calibration::new(&cal(&[(-5.0, 0), (0.0, 32_000), (5.0, 65_000)]), "t").unwrap();
        assert_eq!(c.code(-10_000_000), 0);
        assert_eq!(c.code(0), 32_000);
        assert_eq!(c.code(2_500_000), 48_500);
        assert_eq!(c.code(9_000_000), 65_000);
        let e = Calibration::new(&cal(&[(1.0, 1), (0.0, 2)]), "t").expect_err("unsorted");
        assert!(e.to_string().contains("sorted"), "{e}");
        // Distinct in f64 but the same microvolt: refused, the MCU could not tell them apart.
        let e = Calibration::new(&cal(&[(1.0, 1), (1.000_000_1, 2)]), "t").expect_err("same µV");
        assert_eq!(e.field, "t[1].volts");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn calibration_is_monotone_and_exact_at_points(
            mut volts in proptest::collection::btree_set(-15_000i32..=15_000, 2..=16),
            codes in proptest::collection::btree_set(-100_000i32..=100_000, 16),
            probes in proptest::collection::vec(-20_000_000i32..20_000_000, 1..20),
            falling in any::<bool>(),
        ) {
            let volts: Vec<f64> = std::mem::take(&mut volts).into_iter().map(|v| f64::from(v) / 1000.0).collect();
            let mut codes: Vec<i32> = codes.into_iter().take(volts.len()).collect();
            prop_assume!(codes.len() == volts.len());
            if falling { codes.reverse(); }
            let pts: Vec<CalPoint> = volts.iter().zip(&codes).map(|(&v, &c)| CalPoint { volts: v, code: c }).collect();
            let cal = Calibration::new(&pts, "t").expect("sorted, distinct");
            for p in &pts {
                prop_assert_eq!(cal.code(uv(p.volts)), p.code);
            }
            let mut probes = probes;
            probes.sort();
            for w in probes.windows(2) {
                let (a, b) = (cal.code(w[0]), cal.code(w[1]));
                prop_assert!(if falling { a >= b } else { a <= b }, "{} → {}, {} → {}", w[0], a, w[1], b);
            }
        }

        #[test]
        fn hostile_tables_never_panic(
            pts in proptest::collection::vec((proptest::num::f64::ANY, any::<i32>()), 0..20),
            probe in any::<i32>(),
        ) {
            let pts: Vec<CalPoint> = pts.into_iter().map(|(volts, code)| CalPoint { volts, code }).collect();
            let sorted = pts.windows(2).all(|w| w[0].volts < w[1].volts);
            match Calibration::new(&pts, "t") {
                Ok(c) => {
                    prop_assert!(sorted && pts.len() <= MAX_CAL_POINTS);
                    let _ = c.code(probe);
                }
                Err(e) => prop_assert!(e.field.starts_with('t')),
            }
        }

        #[test]
        fn router_never_panics_on_any_input(
            vel in any::<u8>(), ch in any::<u8>(), bend in any::<i16>(),
            cc in any::<u8>(), now in any::<u64>(), channels in any::<u16>(),
        ) {
            let mut r = router(full());
            let _ = r.handle_midi(ClusterTime(now), &MidiEvent::PitchBend { channel: ch, value: bend });
            let _ = r.handle_midi(ClusterTime(now), &MidiEvent::ControlChange { channel: ch, controller: cc, value: vel });
            let _ = r.handle_midi(ClusterTime(now), &MidiEvent::ChannelPressure { channel: ch, value: vel });
            let _ = r.refresh_controls(ClusterTime(now), "mcu");
            prop_assert!(r.assignments("mcu", channels).len() <= usize::from(MAX_CHANNELS));
        }
    }
}
