//! The CV router: voices and MIDI sources to control voltages on MCU nodes.
//!
//! A sans-IO core like the allocator. Its configuration ([`CvConfig`]) says which output — a
//! (node id, CV channel) pair, [`CvOutput`] — carries what: the pitch, velocity and gate of a
//! voice slot the allocator hands out on an MCU node ([`CvVoice`]), or a continuous source
//! ([`CvRoute`]: pitch bend, a CC, channel aftertouch, a clock derived from the [`Timeline`], a
//! reset pulse at every bar start). Every change comes out as an [`Action`]: the node id and a
//! [`Message::CvSet`] in microvolts, stamped with the event's cluster time.
//!
//! Pitch is 1 V/octave: note `n` is `(n − base_note) / 12` V, plus the channel's pitch bend
//! scaled by `bend_semitones`. At the same `at`, the pitch `CvSet` is always emitted before the
//! gate `CvSet`, so an MCU applying them in order never opens a gate on the old pitch.
//!
//! Per-channel [`Calibration`] tables map volts to DAC codes, piecewise linear between
//! measured points; [`CvRouter::dac_code`] applies them. `CvSet` itself carries microvolts;
//! the MCU side converts with the same table.
//!
//! Call order (the glue does this; nothing here reads a clock):
//! 1. Build with [`CvRouter::new`] from a validated config; [`CvRouter::set_config`] replaces it
//!    at run time, [`CvRouter::set_timeline`] follows tempo changes.
//! 2. Feed every allocator message sent to a node through [`CvRouter::handle_voice_message`]
//!    (VoiceOn/VoiceOff on a routed voice slot produce pitch, velocity and gate), and MIDI
//!    controllers through [`CvRouter::handle_pitch_bend`], [`CvRouter::handle_cc`] and
//!    [`CvRouter::handle_aftertouch`].
//! 3. Call [`CvRouter::handle_timeout`] at or after [`CvRouter::poll_timeout`] for the clock
//!    and reset outputs; [`CvRouter::refresh`] re-sends every output's current value.
#![deny(clippy::disallowed_methods)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use voicemesh_protocol::{ClusterTime, CvSet, Message, Timeline, VoiceId};

use crate::allocator::MidiEvent;

/// Something the glue must send: a `CvSet` to a node — the allocator's action type, so the
/// glue sends both through one path.
pub use crate::allocator::Action;

/// Largest voltage magnitude a route may ask for, in volts (Eurorack rails are ±12 V).
pub const MAX_VOLTS: f64 = 15.0;
/// Most points in one calibration table.
pub const MAX_CAL_POINTS: usize = 256;
/// Most voices, routes and tables in one CV configuration (each).
pub const MAX_ENTRIES: usize = 256;
/// Longest trigger or clock pulse, in milliseconds.
pub const MAX_PULSE_MS: u32 = 1000;
/// Finest clock resolution, in pulses per quarter note.
pub const MAX_PPQN: u32 = 96;
/// Gap between gate low and gate high when a held gate is re-triggered, in nanoseconds.
pub const RETRIGGER_GAP_NS: u64 = 1_000_000;
const MICROS_PER_BEAT: i128 = 1_000_000;

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
    /// Pitch bend range added to the pitch output, in semitones (default 2).
    #[serde(default = "default_bend")]
    pub bend_semitones: f64,
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

/// A validated, piecewise-linear map from volts to DAC codes.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    points: Vec<CalPoint>,
}

impl Calibration {
    /// Checks a table: 2–256 points, finite volts within ±[`MAX_VOLTS`], volts strictly
    /// increasing (unsorted or duplicate points are refused, not sorted), codes strictly
    /// increasing or strictly decreasing. `field` names the table in errors.
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
        for (i, p) in points.iter().enumerate() {
            if !p.volts.is_finite() || p.volts.abs() > MAX_VOLTS {
                return Err(err(
                    format!("{field}[{i}].volts"),
                    format!("must be a finite number within ±{MAX_VOLTS} V"),
                ));
            }
        }
        let rising = points[1].code > points[0].code;
        for (i, w) in points.windows(2).enumerate() {
            if w[1].volts <= w[0].volts {
                return Err(err(
                    format!("{field}[{}].volts", i + 1),
                    format!(
                        "points must be sorted by volts with no duplicates ({} V after {} V)",
                        w[1].volts, w[0].volts
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
        Ok(Calibration {
            points: points.to_vec(),
        })
    }

    /// The DAC code for `volts`: linear between neighbouring points, clamped to the table's
    /// first and last code outside it (a DAC cannot go beyond what was measured). NaN gives the
    /// first point's code.
    pub fn code(&self, volts: f64) -> i32 {
        let (first, last) = (self.points[0], self.points[self.points.len() - 1]);
        if volts.is_nan() || volts <= first.volts {
            return first.code;
        }
        if volts >= last.volts {
            return last.code;
        }
        let i = self.points.partition_point(|p| p.volts <= volts);
        let (a, b) = (self.points[i - 1], self.points[i]);
        if volts == a.volts {
            return a.code;
        }
        let f = (volts - a.volts) / (b.volts - a.volts);
        let code = f64::from(a.code) + f * (f64::from(b.code) - f64::from(a.code));
        // Between two i32 codes, so the cast cannot saturate.
        code.round() as i32
    }
}

fn check_output(o: &CvOutput, field: &str) -> Result<(), CvConfigError> {
    if o.node.is_empty() || o.node.len() > 32 {
        return Err(err(
            format!("{field}.node"),
            "a node id of 1–32 bytes is required",
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
            if !v.bend_semitones.is_finite() || !(0.0..=48.0).contains(&v.bend_semitones) {
                return Err(err(format!("{f}.bend_semitones"), "must be 0–48"));
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

/// What a routed voice is playing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Playing {
    note: u8,
    channel: u8,
}

/// The per-pulse state of a clock or reset route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PulseState {
    /// Index of the next pulse to schedule (counted from micro-beat 0 of the timeline).
    next: i64,
}

/// Routes voices and MIDI sources to CV outputs. See the module docs for the call order.
#[derive(Debug)]
pub struct CvRouter {
    cfg: CvConfig,
    cal: BTreeMap<CvOutput, Calibration>,
    timeline: Timeline,
    lookahead_ns: u64,
    /// Current value of every output written so far, in microvolts.
    values: BTreeMap<CvOutput, i32>,
    playing: BTreeMap<(String, VoiceId), Playing>,
    /// Pitch bend per MIDI channel, −8192..=8191.
    bend: [i16; 16],
    pulses: BTreeMap<usize, PulseState>,
}

impl CvRouter {
    /// A router for `cfg` (checked with [`CvConfig::validate`]), clock outputs following
    /// `timeline`, events stamped `now + lookahead_ns`.
    pub fn new(
        cfg: CvConfig,
        timeline: Timeline,
        lookahead_ns: u64,
    ) -> Result<Self, CvConfigError> {
        let mut r = CvRouter {
            cfg: CvConfig::default(),
            cal: BTreeMap::new(),
            timeline,
            lookahead_ns,
            values: BTreeMap::new(),
            playing: BTreeMap::new(),
            bend: [0; 16],
            pulses: BTreeMap::new(),
        };
        r.set_config(cfg)?;
        Ok(r)
    }

    /// The configuration in force.
    pub fn config(&self) -> &CvConfig {
        &self.cfg
    }

    /// Replaces the configuration (validated first; on error nothing changes). Voices that are
    /// playing keep playing on their new outputs at the next event; outputs no longer routed
    /// keep their last value. Clocks restart from the next pulse after the last `now` seen.
    pub fn set_config(&mut self, cfg: CvConfig) -> Result<(), CvConfigError> {
        cfg.validate()?;
        let mut cal = BTreeMap::new();
        for (i, c) in cfg.calibration.iter().enumerate() {
            let table = Calibration::new(&c.points, &format!("calibration[{i}].points"))?;
            cal.insert(c.output.clone(), table);
        }
        self.cal = cal;
        self.cfg = cfg;
        self.pulses.clear();
        let known: Vec<CvOutput> = self.outputs().cloned().collect();
        self.values.retain(|o, _| known.contains(o));
        Ok(())
    }

    /// Follows a tempo change; clock outputs re-align from the next call.
    pub fn set_timeline(&mut self, timeline: Timeline) {
        self.timeline = timeline;
        self.pulses.clear();
    }

    /// The DAC code for `microvolts` on `output`, through its calibration table; `None`
    /// without a table.
    pub fn dac_code(&self, output: &CvOutput, microvolts: i32) -> Option<i32> {
        self.cal
            .get(output)
            .map(|c| c.code(f64::from(microvolts) / 1e6))
    }

    /// The value last written to `output`, in microvolts.
    pub fn value(&self, output: &CvOutput) -> Option<i32> {
        self.values.get(output).copied()
    }

    fn outputs(&self) -> impl Iterator<Item = &CvOutput> {
        self.cfg
            .voices
            .iter()
            .flat_map(|v| [&v.pitch, &v.velocity, &v.gate])
            .flatten()
            .chain(self.cfg.routes.iter().map(|r| &r.output))
    }

    fn at(&self, now: ClusterTime) -> ClusterTime {
        ClusterTime(now.0.saturating_add(self.lookahead_ns))
    }

    fn set(&mut self, out: &mut Vec<Action>, o: &CvOutput, microvolts: i32, at: ClusterTime) {
        self.values.insert(o.clone(), microvolts);
        out.push((
            o.node.as_str().into(),
            Message::CvSet(CvSet {
                channel: o.channel,
                microvolts,
                at,
            }),
        ));
    }

    fn pitch_uv(&self, v: &CvVoice, p: Playing) -> i32 {
        let bend = f64::from(self.bend[usize::from(p.channel & 15)]) / 8192.0;
        let semis = f64::from(i32::from(p.note) - i32::from(v.base_note)) + bend * v.bend_semitones;
        uv(semis / 12.0)
    }

    /// Feeds one allocator message sent to `node`: a `VoiceOn` of a routed voice slot writes
    /// pitch, then velocity, then gate at the event's `at`; a `VoiceOff` drops a held gate.
    /// Other messages and unrouted slots produce nothing.
    #[must_use]
    pub fn handle_voice_message(&mut self, node: &str, msg: &Message) -> Vec<Action> {
        let mut out = Vec::new();
        match msg {
            Message::VoiceOn(on) => {
                let Some(v) = self.voice(node, on.voice).cloned() else {
                    return out;
                };
                let p = Playing {
                    note: on.note,
                    channel: on.channel,
                };
                let was_held = self
                    .playing
                    .insert((node.to_owned(), on.voice), p)
                    .is_some();
                if let Some(o) = &v.pitch {
                    let uv = self.pitch_uv(&v, p);
                    self.set(&mut out, o, uv, on.at);
                }
                if let Some(o) = &v.velocity {
                    let uv = uv(f64::from(on.velocity.min(127)) / 127.0 * v.velocity_volts);
                    self.set(&mut out, o, uv, on.at);
                }
                if let Some(o) = &v.gate {
                    let high = uv(v.gate_volts);
                    match v.gate_mode {
                        GateMode::Gate => {
                            let gate_high = self.values.get(o).is_some_and(|&x| x != 0);
                            if was_held || gate_high {
                                self.set(&mut out, o, 0, on.at);
                                self.set(
                                    &mut out,
                                    o,
                                    high,
                                    on.at.add_nanos(RETRIGGER_GAP_NS as i64),
                                );
                            } else {
                                self.set(&mut out, o, high, on.at);
                            }
                        }
                        GateMode::Trigger { ms } => {
                            self.set(&mut out, o, high, on.at);
                            self.set(&mut out, o, 0, on.at.add_nanos(i64::from(ms) * 1_000_000));
                        }
                    }
                }
            }
            Message::VoiceOff(off) => {
                let Some(v) = self.voice(node, off.voice).cloned() else {
                    return out;
                };
                self.playing.remove(&(node.to_owned(), off.voice));
                if let (Some(o), GateMode::Gate) = (&v.gate, v.gate_mode) {
                    self.set(&mut out, o, 0, off.at);
                }
            }
            _ => {}
        }
        out
    }

    fn voice(&self, node: &str, voice: VoiceId) -> Option<&CvVoice> {
        self.cfg
            .voices
            .iter()
            .find(|v| v.node == node && v.voice == voice)
    }

    /// Pitch bend on `channel` (0–15), `value` −8192..=8191 (clamped): updates bend routes and
    /// the pitch of every routed voice playing on that channel.
    #[must_use]
    pub fn handle_pitch_bend(&mut self, now: ClusterTime, channel: u8, value: i16) -> Vec<Action> {
        let mut out = Vec::new();
        let ch = channel & 15;
        let value = value.clamp(-8192, 8191);
        self.bend[usize::from(ch)] = value;
        let at = self.at(now);
        let frac = (f64::from(value) + 8192.0) / 16383.0;
        self.continuous(
            &mut out,
            at,
            frac,
            |s| matches!(s, CvSource::PitchBend { channel } if channel == ch),
        );
        let voices: Vec<(CvVoice, Playing)> = self
            .playing
            .iter()
            .filter(|(_, p)| p.channel == ch)
            .filter_map(|((n, id), p)| self.voice(n, *id).map(|v| (v.clone(), *p)))
            .collect();
        for (v, p) in voices {
            if let Some(o) = &v.pitch {
                let uv = self.pitch_uv(&v, p);
                self.set(&mut out, o, uv, at);
            }
        }
        out
    }

    /// One MIDI event from the input, as the allocator gets it: pitch bend, control changes and
    /// channel aftertouch drive their routes; notes reach CV voices through the allocator's
    /// messages ([`handle_voice_message`](Self::handle_voice_message)), other events are
    /// ignored here.
    #[must_use]
    pub fn handle_midi(&mut self, now: ClusterTime, ev: &MidiEvent) -> Vec<Action> {
        match *ev {
            MidiEvent::PitchBend { channel, value } => self.handle_pitch_bend(now, channel, value),
            MidiEvent::ControlChange {
                channel,
                controller,
                value,
            } => self.handle_cc(now, channel, controller, value),
            MidiEvent::ChannelPressure { channel, value } => {
                self.handle_aftertouch(now, channel, value)
            }
            _ => Vec::new(),
        }
    }

    /// Control change `cc` = `value` (0–127, clamped) on `channel`.
    #[must_use]
    pub fn handle_cc(&mut self, now: ClusterTime, channel: u8, cc: u8, value: u8) -> Vec<Action> {
        let mut out = Vec::new();
        let at = self.at(now);
        let frac = f64::from(value.min(127)) / 127.0;
        self.continuous(
            &mut out,
            at,
            frac,
            |s| matches!(s, CvSource::Cc { channel: c, cc: n } if c == channel & 15 && n == cc),
        );
        out
    }

    /// Channel aftertouch `value` (0–127, clamped) on `channel`.
    #[must_use]
    pub fn handle_aftertouch(&mut self, now: ClusterTime, channel: u8, value: u8) -> Vec<Action> {
        let mut out = Vec::new();
        let at = self.at(now);
        let frac = f64::from(value.min(127)) / 127.0;
        self.continuous(
            &mut out,
            at,
            frac,
            |s| matches!(s, CvSource::Aftertouch { channel: c } if c == channel & 15),
        );
        out
    }

    fn continuous(
        &mut self,
        out: &mut Vec<Action>,
        at: ClusterTime,
        frac: f64,
        pick: impl Fn(CvSource) -> bool,
    ) {
        let hits: Vec<CvRoute> = self
            .cfg
            .routes
            .iter()
            .filter(|r| pick(r.source))
            .cloned()
            .collect();
        for r in hits {
            let v = r.min_volts + frac * (r.max_volts - r.min_volts);
            self.set(out, &r.output, uv(v), at);
        }
    }

    /// Micro-beat position of pulse `k` of a route with `per_beat_num / per_beat_den` pulses
    /// per beat.
    fn pulse_time(&self, k: i64, num: i64, den: i64) -> ClusterTime {
        let micro = (i128::from(k) * MICROS_PER_BEAT * i128::from(den)).div_euclid(i128::from(num));
        let micro = micro.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        self.timeline.time_at_micro_beats(micro)
    }

    fn pulse_rate(s: CvSource) -> Option<(i64, i64, u32)> {
        match s {
            CvSource::Clock { ppqn, pulse_ms } => Some((i64::from(ppqn), 1, pulse_ms)),
            CvSource::Reset {
                beats_per_bar,
                pulse_ms,
            } => Some((1, i64::from(beats_per_bar), pulse_ms)),
            _ => None,
        }
    }

    /// Index of the first pulse at or after `t`.
    fn first_pulse_from(&self, t: ClusterTime, num: i64, den: i64) -> i64 {
        let micro = i128::from(self.timeline.micro_beats_at(t));
        // Pulses per micro-beat = num / (den · 10⁶): ceil(micro · num / (den · 10⁶)).
        let d = i128::from(den) * MICROS_PER_BEAT;
        let k = (micro * i128::from(num) + d - 1).div_euclid(d);
        let mut k = k.clamp(i128::from(i64::MIN / 2), i128::from(i64::MAX / 2)) as i64;
        while self.pulse_time(k, num, den) < t {
            k += 1;
        }
        k
    }

    /// Emits every clock and reset pulse due up to `now + lookahead`, each `CvSet` stamped
    /// with the pulse's exact timeline time (high, then low `pulse_ms` later).
    #[must_use]
    pub fn handle_timeout(&mut self, now: ClusterTime) -> Vec<Action> {
        let mut out = Vec::new();
        let horizon = self.at(now);
        for i in 0..self.cfg.routes.len() {
            let r = self.cfg.routes[i].clone();
            let Some((num, den, pulse_ms)) = Self::pulse_rate(r.source) else {
                continue;
            };
            let mut k = match self.pulses.get(&i) {
                Some(s) => s.next,
                None => self.first_pulse_from(horizon, num, den),
            };
            // Never more than one bar of catch-up: a stalled glue skips missed pulses.
            let mut budget = 4 * MAX_PPQN as usize;
            loop {
                let t = self.pulse_time(k, num, den);
                if t > horizon {
                    break;
                }
                if budget == 0 {
                    k = self.first_pulse_from(horizon, num, den);
                    break;
                }
                budget -= 1;
                if t.0 >= now.0 {
                    self.set(&mut out, &r.output, uv(r.max_volts), t);
                    let low = t.add_nanos(i64::from(pulse_ms) * 1_000_000);
                    self.set(&mut out, &r.output, uv(r.min_volts), low);
                }
                k += 1;
            }
            self.pulses.insert(i, PulseState { next: k });
        }
        out
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to be called next: `lookahead`
    /// before the next pulse, or `None` without clock or reset routes.
    pub fn poll_timeout(&self, now: ClusterTime) -> Option<ClusterTime> {
        self.cfg
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let (num, den, _) = Self::pulse_rate(r.source)?;
                let k = match self.pulses.get(&i) {
                    Some(s) => s.next,
                    None => self.first_pulse_from(self.at(now), num, den),
                };
                let t = self.pulse_time(k, num, den);
                Some(ClusterTime(t.0.saturating_sub(self.lookahead_ns)))
            })
            .min()
    }

    /// Re-sends the current value of every output written so far (for MCUs that restarted or
    /// lost datagrams), stamped `now + lookahead`, pitch outputs first.
    #[must_use]
    pub fn refresh(&mut self, now: ClusterTime) -> Vec<Action> {
        let at = self.at(now);
        let pitches: Vec<&CvOutput> = self
            .cfg
            .voices
            .iter()
            .filter_map(|v| v.pitch.as_ref())
            .collect();
        let mut first = Vec::new();
        let mut rest = Vec::new();
        for (o, &microvolts) in &self.values {
            let a = (
                o.node.as_str().into(),
                Message::CvSet(CvSet {
                    channel: o.channel,
                    microvolts,
                    at,
                }),
            );
            if pitches.contains(&o) {
                first.push(a);
            } else {
                rest.push(a);
            }
        }
        first.extend(rest);
        first
    }
}

/// Volts to microvolts, rounded; the inputs are validated to ±[`MAX_VOLTS`] plus bends, so
/// the cast never saturates in practice (and saturates rather than wraps if it did).
fn uv(volts: f64) -> i32 {
    (volts * 1e6).round() as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use voicemesh_protocol::{VoiceOff, VoiceOn};

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
            gate_volts: 5.0,
            velocity_volts: 5.0,
        }
    }

    fn router(cfg: CvConfig) -> CvRouter {
        let tl = Timeline::from_milli_bpm(120_000, ClusterTime(0));
        CvRouter::new(cfg, tl, 5_000_000).expect("valid config")
    }

    fn on(note: u8, at: u64) -> Message {
        Message::VoiceOn(VoiceOn {
            voice: 0,
            note,
            velocity: 127,
            channel: 0,
            at: ClusterTime(at),
            lease_until: ClusterTime(at + 1_000_000_000),
        })
    }

    fn sets(a: &[Action]) -> Vec<(u16, i32, u64)> {
        a.iter()
            .map(|(_, m)| match m {
                Message::CvSet(c) => (c.channel, c.microvolts, c.at.0),
                other => panic!("not a CvSet: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn pitch_before_gate_one_volt_per_octave() {
        let mut r = router(CvConfig {
            voices: vec![voice(GateMode::Gate)],
            ..Default::default()
        });
        let a = r.handle_voice_message("mcu", &on(48, 100));
        assert!(a.iter().all(|(n, _)| &**n == "mcu"));
        assert_eq!(
            sets(&a),
            vec![
                (0, 1_000_000, 100),
                (1, 5_000_000, 100),
                (2, 5_000_000, 100)
            ]
        );
        // Another node's voice 0 is not routed.
        assert!(r.handle_voice_message("other", &on(48, 100)).is_empty());
        let off = Message::VoiceOff(VoiceOff {
            voice: 0,
            at: ClusterTime(200),
        });
        assert_eq!(
            sets(&r.handle_voice_message("mcu", &off)),
            vec![(2, 0, 200)]
        );
        // Semitone steps: 1/12 V, rounded to the microvolt; below the base note is negative.
        let a = r.handle_voice_message("mcu", &on(37, 300));
        assert_eq!(sets(&a)[0], (0, 83_333, 300));
        let a = r.handle_voice_message("mcu", &on(24, 400));
        assert_eq!(sets(&a)[0], (0, -1_000_000, 400));
    }

    #[test]
    fn held_gate_retriggers_and_trigger_mode_pulses() {
        let mut r = router(CvConfig {
            voices: vec![voice(GateMode::Gate)],
            ..Default::default()
        });
        let _ = r.handle_voice_message("mcu", &on(60, 0));
        let a = sets(&r.handle_voice_message("mcu", &on(62, 1000)));
        assert_eq!(a[2], (2, 0, 1000));
        assert_eq!(a[3], (2, 5_000_000, 1000 + RETRIGGER_GAP_NS));

        let mut r = router(CvConfig {
            voices: vec![voice(GateMode::Trigger { ms: 10 })],
            ..Default::default()
        });
        let a = sets(&r.handle_voice_message("mcu", &on(60, 0)));
        assert_eq!(&a[2..], &[(2, 5_000_000, 0), (2, 0, 10_000_000)]);
        let off = Message::VoiceOff(VoiceOff {
            voice: 0,
            at: ClusterTime(1),
        });
        assert!(r.handle_voice_message("mcu", &off).is_empty());
    }

    #[test]
    fn bend_cc_and_aftertouch_routes() {
        let mut r = router(CvConfig {
            voices: vec![voice(GateMode::Gate)],
            routes: vec![
                CvRoute {
                    source: CvSource::Cc { channel: 0, cc: 1 },
                    output: out("mcu", 3),
                    min_volts: 0.0,
                    max_volts: 10.0,
                },
                CvRoute {
                    source: CvSource::Aftertouch { channel: 0 },
                    output: out("mcu", 4),
                    min_volts: 0.0,
                    max_volts: 5.0,
                },
                CvRoute {
                    source: CvSource::PitchBend { channel: 0 },
                    output: out("mcu", 5),
                    min_volts: -5.0,
                    max_volts: 5.0,
                },
            ],
            ..Default::default()
        });
        let now = ClusterTime(1_000);
        assert_eq!(
            sets(&r.handle_cc(now, 0, 1, 127)),
            vec![(3, 10_000_000, 5_001_000)]
        );
        assert!(r.handle_cc(now, 1, 1, 127).is_empty());
        assert_eq!(
            sets(&r.handle_aftertouch(now, 0, 200)),
            vec![(4, 5_000_000, 5_001_000)]
        );
        let _ = r.handle_voice_message("mcu", &on(48, 0));
        let a = sets(&r.handle_pitch_bend(now, 0, 8191));
        assert_eq!(a[0], (5, 5_000_000, 5_001_000));
        // +2 semitones (almost: 8191/8192) on top of 1 V.
        assert_eq!(a[1].0, 0);
        assert!((a[1].1 - 1_166_666).abs() < 30, "{a:?}");
        let a = sets(&r.handle_pitch_bend(now, 0, -8192));
        assert_eq!(a[0], (5, -5_000_000, 5_001_000));
        assert_eq!(a[1], (0, 833_333, 5_001_000));
    }

    #[test]
    fn midi_events_reach_their_routes() {
        let mut r = router(CvConfig {
            routes: vec![CvRoute {
                source: CvSource::Cc { channel: 2, cc: 74 },
                output: out("mcu", 3),
                min_volts: 0.0,
                max_volts: 10.0,
            }],
            ..Default::default()
        });
        let ev = MidiEvent::ControlChange {
            channel: 2,
            controller: 74,
            value: 0,
        };
        assert_eq!(
            sets(&r.handle_midi(ClusterTime(0), &ev)),
            vec![(3, 0, 5_000_000)]
        );
        let ev = MidiEvent::NoteOn {
            channel: 2,
            note: 60,
            velocity: 1,
        };
        assert!(r.handle_midi(ClusterTime(0), &ev).is_empty());
    }

    #[test]
    fn clock_pulses_on_the_timeline_and_reset_at_bar_start() {
        let mut r = router(CvConfig {
            routes: vec![
                CvRoute {
                    source: CvSource::Clock {
                        ppqn: 4,
                        pulse_ms: 5,
                    },
                    output: out("mcu", 6),
                    min_volts: 0.0,
                    max_volts: 5.0,
                },
                CvRoute {
                    source: CvSource::Reset {
                        beats_per_bar: 4,
                        pulse_ms: 5,
                    },
                    output: out("mcu", 7),
                    min_volts: 0.0,
                    max_volts: 5.0,
                },
            ],
            ..Default::default()
        });
        // 120 BPM: a beat is 500 ms; 4 ppqn → a pulse every 125 ms; a bar every 2 s.
        let t = r.poll_timeout(ClusterTime(1)).expect("clock routes");
        assert_eq!(t, ClusterTime(125_000_000 - 5_000_000));
        let mut clock = Vec::new();
        let mut reset = Vec::new();
        let mut now = ClusterTime(1);
        while now.0 < 4_100_000_000 {
            for (ch, uv, at) in sets(&r.handle_timeout(now)) {
                if uv > 0 {
                    if ch == 6 {
                        clock.push(at)
                    } else {
                        reset.push(at)
                    }
                }
            }
            now = r.poll_timeout(now).expect("clock routes");
        }
        assert_eq!(clock.len(), 32, "{clock:?}");
        assert!(
            clock
                .iter()
                .enumerate()
                .all(|(i, &t)| t == (i as u64 + 1) * 125_000_000)
        );
        assert_eq!(reset, vec![2_000_000_000, 4_000_000_000]);
    }

    #[test]
    fn refresh_resends_every_value_pitch_first() {
        let mut r = router(CvConfig {
            voices: vec![voice(GateMode::Gate)],
            ..Default::default()
        });
        let _ = r.handle_voice_message("mcu", &on(60, 0));
        let a = sets(&r.refresh(ClusterTime(10)));
        assert_eq!(
            a,
            vec![
                (0, 2_000_000, 5_000_010),
                (1, 5_000_000, 5_000_010),
                (2, 5_000_000, 5_000_010)
            ]
        );
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
                    routes: vec![CvRoute {
                        source: CvSource::Clock {
                            ppqn: 0,
                            pulse_ms: 5,
                        },
                        output: out("m", 0),
                        min_volts: 0.0,
                        max_volts: f64::NAN,
                    }],
                    ..Default::default()
                },
                "routes[0].max_volts",
            ),
            (
                CvConfig {
                    calibration: vec![ChannelCalibration {
                        output: out("m", 0),
                        points: vec![
                            CalPoint {
                                volts: 1.0,
                                code: 10,
                            },
                            CalPoint {
                                volts: 1.0,
                                code: 20,
                            },
                        ],
                    }],
                    ..Default::default()
                },
                "calibration[0].points[1].volts",
            ),
        ];
        for (cfg, field) in cases {
            let e = cfg.validate().expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn calibration_interpolates_and_clamps() {
        let c = Calibration::new(
            &[
                CalPoint {
                    volts: -5.0,
                    code: 0,
                },
                CalPoint {
                    volts: 0.0,
                    code: 32_000,
                },
                CalPoint {
                    volts: 5.0,
                    code: 65_000,
                },
            ],
            "t",
        )
        .unwrap();
        assert_eq!(c.code(-10.0), 0);
        assert_eq!(c.code(0.0), 32_000);
        assert_eq!(c.code(2.5), 48_500);
        assert_eq!(c.code(9.0), 65_000);
        assert_eq!(c.code(f64::NAN), 0);
        let e = Calibration::new(
            &[
                CalPoint {
                    volts: 1.0,
                    code: 1,
                },
                CalPoint {
                    volts: 0.0,
                    code: 2,
                },
            ],
            "t",
        )
        .expect_err("unsorted");
        assert!(e.to_string().contains("sorted"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn calibration_is_monotone_and_exact_at_points(
            mut volts in proptest::collection::btree_set(-15_000i32..=15_000, 2..12),
            codes in proptest::collection::btree_set(-100_000i32..=100_000, 12),
            probes in proptest::collection::vec(-20.0f64..20.0, 1..20),
            falling in any::<bool>(),
        ) {
            let volts: Vec<f64> = std::mem::take(&mut volts).into_iter().map(|v| f64::from(v) / 1000.0).collect();
            let mut codes: Vec<i32> = codes.into_iter().take(volts.len()).collect();
            prop_assume!(codes.len() == volts.len());
            if falling { codes.reverse(); }
            let pts: Vec<CalPoint> = volts.iter().zip(&codes).map(|(&v, &c)| CalPoint { volts: v, code: c }).collect();
            let cal = Calibration::new(&pts, "t").expect("sorted, distinct");
            for p in &pts {
                prop_assert_eq!(cal.code(p.volts), p.code);
            }
            let mut probes = probes;
            probes.sort_by(f64::total_cmp);
            for w in probes.windows(2) {
                let (a, b) = (cal.code(w[0]), cal.code(w[1]));
                prop_assert!(if falling { a >= b } else { a <= b }, "{} → {}, {} → {}", w[0], a, w[1], b);
            }
        }

        #[test]
        fn hostile_tables_never_panic(
            pts in proptest::collection::vec((proptest::num::f64::ANY, any::<i32>()), 0..8),
            probe in proptest::num::f64::ANY,
        ) {
            let pts: Vec<CalPoint> = pts.into_iter().map(|(volts, code)| CalPoint { volts, code }).collect();
            let sorted = pts.windows(2).all(|w| w[0].volts < w[1].volts);
            match Calibration::new(&pts, "t") {
                Ok(c) => {
                    prop_assert!(sorted);
                    let _ = c.code(probe);
                }
                Err(e) => prop_assert!(e.field.starts_with('t')),
            }
        }

        #[test]
        fn router_never_panics_on_any_input(
            note in any::<u8>(), vel in any::<u8>(), ch in any::<u8>(), bend in any::<i16>(),
            cc in any::<u8>(), now in any::<u64>(),
        ) {
            let mut r = router(CvConfig { voices: vec![voice(GateMode::Trigger { ms: 1000 })], ..Default::default() });
            let m = Message::VoiceOn(VoiceOn { voice: 0, note, velocity: vel, channel: ch, at: ClusterTime(now), lease_until: ClusterTime(now) });
            let _ = r.handle_voice_message("mcu", &m);
            let _ = r.handle_pitch_bend(ClusterTime(now), ch, bend);
            let _ = r.handle_cc(ClusterTime(now), ch, cc, vel);
            let _ = r.handle_aftertouch(ClusterTime(now), ch, vel);
            let _ = r.handle_timeout(ClusterTime(now));
            let _ = r.refresh(ClusterTime(now));
        }
    }
}
