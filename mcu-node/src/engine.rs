//! The CV engine: assignments, voices and MIDI controllers in; DAC codes per channel out, each
//! change at its cluster time.
//!
//! Every output channel has a [`CvAssign`] (unassigned channels are `direct`: they follow
//! `CvSet`). Events (`VoiceOn`, `VoiceOff`, `Control`, `CvSet`) wait in a time-ordered queue
//! until their `at`; [`CvEngine::handle_timeout`] applies the due ones in order, drops expired
//! leases, advances glides and pulses, and recomputes every channel's target voltage from the
//! state, then its code through the channel's calibration table (or the DAC's nominal line).
//! A channel whose code changed gets a new sequence number; [`CvEngine::poll_write`] hands out
//! the channels to write, pitch-type outputs before gates and pulses (so a gate never opens
//! on the old pitch), and every channel again every [`REFRESH_NS`] so nothing stays stale,
//! while a value re-sent unchanged costs no I2C write. A DAC whose write or init fails is
//! marked failed: its channels report 0 V, it is re-initialised every refresh period, and the
//! other DACs carry on.
//!
//! Call order: `assign` / `schedule` / `renew` / `set_timeline` as messages arrive, then
//! `handle_timeout(now)`, then `poll_write` / `write_done` until `poll_write` returns `None`;
//! `next_deadline()` says when to call `handle_timeout` again. All times are cluster times.

use heapless::Vec;
use voicemesh_protocol::cv::{
    bend_from_14bit, calibrated_code, first_pulse_at_or_after, nominal_code, pitch_microvolts,
    pulse_time, scale_u16, u7_to_u16, u14_to_u16,
};
use voicemesh_protocol::{
    ClusterTime, Control, ControlKind, CvAssign, CvFunction, CvSet, MAX_BPM, MIN_BPM, Timeline,
    VoiceId, VoiceOff, VoiceOn,
};

use crate::{DacSpec, MAX_CHANNELS, MAX_DACS};

/// Every channel is re-written at least this often, in ns.
pub const REFRESH_NS: u64 = 100_000_000;
/// A gliding pitch is updated this often, in ns.
pub const GLIDE_STEP_NS: u64 = 1_000_000;
/// Shortest gate: a `VoiceOff` sooner than this after its `VoiceOn` is delayed to it, in ns.
pub const MIN_GATE_NS: u64 = 2_000_000;
/// Shortest trigger, clock or reset pulse, in ns (a `pulse_ms` of 0 gets this).
pub const MIN_PULSE_NS: u64 = 1_000_000;
/// Gate low time when a held gate is re-triggered by a new note, in ns.
pub const RETRIGGER_GAP_NS: u64 = 1_000_000;
/// An event applied later than this after its `at` counts as late, in ns.
pub const LATE_NS: u64 = 2_000_000;
/// Most voice slots.
pub const MAX_VOICES: usize = 16;
/// Most events waiting for their time.
pub const MAX_PENDING: usize = 64;

/// Why a message was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EngineError {
    /// The channel does not exist on this node.
    NoSuchChannel(u16),
    /// The voice slot does not exist on this node.
    NoSuchVoice(VoiceId),
    /// The calibration table is not strictly increasing in volts (or has one point).
    BadCalibration(u16),
    /// The event queue is full; the event was dropped.
    QueueFull,
}

impl core::fmt::Display for EngineError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            EngineError::NoSuchChannel(c) => write!(f, "no CV channel {c} on this node"),
            EngineError::NoSuchVoice(v) => write!(f, "no voice slot {v} on this node"),
            EngineError::BadCalibration(c) => {
                write!(f, "channel {c}: calibration volts must strictly increase")
            }
            EngineError::QueueFull => write!(f, "event queue full, event dropped"),
        }
    }
}

impl core::error::Error for EngineError {}

/// One DAC write the glue must perform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelWrite {
    /// Node channel.
    pub channel: u16,
    /// DAC index in the configuration.
    pub dac: u8,
    /// Channel on that DAC.
    pub dac_channel: u8,
    /// Code to write.
    pub code: u16,
    /// The channel's sequence number this write carries.
    pub seq: u32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Event {
    On(VoiceOn),
    Off(VoiceOff),
    Control(Control),
    Set(CvSet),
}

impl Event {
    fn at(&self) -> ClusterTime {
        match self {
            Event::On(e) => e.at,
            Event::Off(e) => e.at,
            Event::Control(e) => e.at,
            Event::Set(e) => e.at,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Voice {
    held: bool,
    note: u8,
    velocity: u8,
    midi_channel: u8,
    on_at: ClusterTime,
    lease_until: ClusterTime,
    /// Gate held low until then (a re-trigger).
    gap_until: ClusterTime,
    /// Trigger pulse high until then.
    trigger_until: ClusterTime,
    /// Count of note-ons, so pitch channels notice a new note.
    generation: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Glide {
    from_uv: i32,
    to_uv: i32,
    start: ClusterTime,
    dur_ns: u64,
}

#[derive(Clone, Debug)]
struct Channel {
    assign: CvAssign,
    dac: u8,
    dac_channel: u8,
    bits: u8,
    full_scale_uv: u32,
    /// `direct`: the last `CvSet`; cc/aftertouch: the last value (16-bit).
    value: i32,
    /// Pitch: the note voltage (without bend) it glides towards, and the glide.
    glide: Glide,
    seen_generation: u32,
    /// Clock/reset: next pulse index and the end of the current pulse.
    next_pulse: Option<i64>,
    pulse_until: ClusterTime,
    /// Touched by an event this pass (to count redundant writes).
    touched: bool,
    code: u16,
    seq: u32,
    written: Option<(u16, u32)>,
    in_flight: bool,
    refresh: bool,
    changed_at: ClusterTime,
}

/// The scalar part of a [`CvAssign`] (without its calibration table).
#[derive(Clone, Copy, Debug)]
struct Params {
    function: CvFunction,
    voice: VoiceId,
    midi_channel: u8,
    param: u16,
    min_uv: i32,
    max_uv: i32,
    base_note: u8,
    bend_semitones: u8,
    glide_ms: u16,
    pulse_ms: u16,
}

impl Params {
    fn of(a: &CvAssign) -> Self {
        Params {
            function: a.function,
            voice: a.voice,
            midi_channel: a.midi_channel,
            param: a.param,
            min_uv: a.min_uv,
            max_uv: a.max_uv,
            base_note: a.base_note,
            bend_semitones: a.bend_semitones,
            glide_ms: a.glide_ms,
            pulse_ms: a.pulse_ms,
        }
    }

    /// Clock and reset: pulses per beat as `num / den`.
    fn pulse_rate(&self) -> (i64, i64) {
        if self.function == CvFunction::Clock {
            (i64::from(self.param.clamp(1, 96)), 1)
        } else {
            (1, i64::from(self.param.clamp(1, 64)))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DacState {
    Uninit,
    Initialising,
    Ready,
    Failed { retry_at: ClusterTime },
}

/// Counters of the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// DAC writes handed out.
    pub writes: u32,
    /// Changes that left the code as it was (no write needed).
    pub skipped_writes: u32,
    /// Failed writes and inits.
    pub write_errors: u32,
    /// Events applied more than [`LATE_NS`] after their `at`.
    pub late_events: u32,
    /// Voices released because their lease ran out.
    pub lease_expiries: u32,
    /// Events dropped: queue full, unknown voice or channel.
    pub dropped_events: u32,
}

/// The CV engine. See the module docs for the call order.
#[derive(Debug)]
pub struct CvEngine {
    channels: Vec<Channel, MAX_CHANNELS>,
    dacs: Vec<DacState, MAX_DACS>,
    voices: Vec<Voice, MAX_VOICES>,
    bend: [u16; 16],
    pending: Vec<(ClusterTime, u32, Event), MAX_PENDING>,
    order: u32,
    timeline: Option<Timeline>,
    next_refresh: ClusterTime,
    now: ClusterTime,
    stats: EngineStats,
}

fn pulse_ns(ms: u16) -> u64 {
    (u64::from(ms) * 1_000_000).max(MIN_PULSE_NS)
}

fn after(t: ClusterTime, ns: u64) -> ClusterTime {
    ClusterTime(t.0.saturating_add(ns))
}

impl CvEngine {
    /// An engine for `dacs` (channels numbered across them in order, at most
    /// [`MAX_CHANNELS`]) and `voices` voice slots (at most [`MAX_VOICES`]). Every channel
    /// starts `direct` at 0 V; every DAC is initialised first.
    pub fn new(dacs: &[DacSpec], voices: u16) -> Self {
        let mut channels = Vec::new();
        let mut states = Vec::new();
        for (d, spec) in dacs.iter().enumerate().take(MAX_DACS) {
            let _ = states.push(DacState::Uninit);
            for c in 0..spec.channels {
                let n = channels.len() as u16;
                let ch = Channel {
                    assign: CvAssign::new(n, CvFunction::Direct),
                    dac: d as u8,
                    dac_channel: c,
                    bits: spec.bits,
                    full_scale_uv: spec.full_scale_uv,
                    value: 0,
                    glide: Glide::default(),
                    seen_generation: 0,
                    next_pulse: None,
                    pulse_until: ClusterTime::ZERO,
                    touched: false,
                    code: 0,
                    seq: 1,
                    written: None,
                    in_flight: false,
                    refresh: true,
                    changed_at: ClusterTime::ZERO,
                };
                if channels.push(ch).is_err() {
                    break;
                }
            }
        }
        let mut vs = Vec::new();
        for _ in 0..usize::from(voices).min(MAX_VOICES) {
            let _ = vs.push(Voice::default());
        }
        CvEngine {
            channels,
            dacs: states,
            voices: vs,
            bend: [8192; 16],
            pending: Vec::new(),
            order: 0,
            timeline: None,
            next_refresh: ClusterTime::ZERO,
            now: ClusterTime::ZERO,
            stats: EngineStats::default(),
        }
    }

    /// Number of output channels.
    pub fn channels(&self) -> usize {
        self.channels.len()
    }

    /// Number of voice slots.
    pub fn voices(&self) -> usize {
        self.voices.len()
    }

    /// The counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// The assignment of `channel`.
    pub fn assignment(&self, channel: u16) -> Option<&CvAssign> {
        self.channels.get(usize::from(channel)).map(|c| &c.assign)
    }

    /// What DAC `channel` holds: its last written code, 0 while its DAC has failed or before
    /// the first write.
    pub fn code(&self, channel: u16) -> u16 {
        let Some(c) = self.channels.get(usize::from(channel)) else {
            return 0;
        };
        if self.dac_failed(c.dac) {
            return 0;
        }
        c.written.map_or(0, |(code, _)| code)
    }

    /// When `channel`'s current code was written.
    pub fn changed_at(&self, channel: u16) -> ClusterTime {
        self.channels
            .get(usize::from(channel))
            .map_or(ClusterTime::ZERO, |c| c.changed_at)
    }

    /// The code `channel` should hold now (written or not yet).
    pub fn target_code(&self, channel: u16) -> u16 {
        self.channels
            .get(usize::from(channel))
            .map_or(0, |c| c.code)
    }

    /// Bit `d` set: DAC `d` has failed.
    pub fn dac_faults(&self) -> u32 {
        (0..self.dacs.len())
            .filter(|&d| self.dac_failed(d as u8))
            .fold(0, |m, d| m | (1 << d))
    }

    fn dac_failed(&self, dac: u8) -> bool {
        matches!(
            self.dacs.get(usize::from(dac)),
            Some(DacState::Failed { .. })
        )
    }

    /// Sets what `a.channel` does. An identical assignment changes nothing.
    pub fn assign(&mut self, a: &CvAssign) -> Result<(), EngineError> {
        if a.calibration.len() == 1
            || (a.calibration.len() > 1 && calibrated_code(&a.calibration, 0).is_none())
        {
            return Err(EngineError::BadCalibration(a.channel));
        }
        let ch = self
            .channels
            .get_mut(usize::from(a.channel))
            .ok_or(EngineError::NoSuchChannel(a.channel))?;
        if ch.assign == *a {
            return Ok(());
        }
        let same_function = ch.assign.function == a.function;
        ch.assign = a.clone();
        if !same_function {
            ch.value = 0;
            ch.glide = Glide::default();
            ch.next_pulse = None;
            ch.pulse_until = ClusterTime::ZERO;
            ch.seen_generation = 0;
        }
        ch.touched = true;
        Ok(())
    }

    /// Follows a tempo change: clock and reset outputs re-align from their next pulse.
    pub fn set_timeline(&mut self, mut timeline: Timeline) {
        // The tempo range a timeline may have (20–999 BPM); a hostile one cannot make a clock
        // output spin.
        let fastest = 60_000_000_000 / u64::from(MAX_BPM);
        let slowest = 60_000_000_000 / u64::from(MIN_BPM);
        timeline.ns_per_beat = timeline.ns_per_beat.clamp(fastest, slowest);
        if self.timeline != Some(timeline) {
            self.timeline = Some(timeline);
            for c in &mut self.channels {
                c.next_pulse = None;
            }
        }
    }

    /// Queues `VoiceOn`, `VoiceOff`, `Control` or `CvSet` for its `at`.
    fn push(&mut self, ev: Event) -> Result<(), EngineError> {
        let at = ev.at();
        self.order = self.order.wrapping_add(1);
        let i = self
            .pending
            .iter()
            .position(|(t, _, _)| *t > at)
            .unwrap_or(self.pending.len());
        self.pending.insert(i, (at, self.order, ev)).map_err(|_| {
            self.stats.dropped_events += 1;
            EngineError::QueueFull
        })
    }

    /// Queues a voice start. A `VoiceOn` equal to the one playing (same note, `at`) only
    /// extends the lease: the coordinator may re-send held notes. One that starts no later
    /// than the note the voice already played is stale (a re-send that crossed the `VoiceOff`)
    /// and is ignored, so a released note never sounds again.
    pub fn voice_on(&mut self, on: VoiceOn) -> Result<(), EngineError> {
        let v = self.voice_mut(on.voice)?;
        if v.generation > 0 && on.at <= v.on_at {
            if v.held && v.note == on.note && v.on_at == on.at {
                v.lease_until = v.lease_until.max(on.lease_until);
            }
            return Ok(());
        }
        // The same note still waiting for its `at` (a re-send before it started): only the
        // lease moves.
        for (_, _, e) in self.pending.iter_mut() {
            if let Event::On(p) = e
                && p.voice == on.voice
                && p.note == on.note
                && p.at == on.at
            {
                p.lease_until = p.lease_until.max(on.lease_until);
                return Ok(());
            }
        }
        self.push(Event::On(on))
    }

    /// Queues a voice release.
    pub fn voice_off(&mut self, off: VoiceOff) -> Result<(), EngineError> {
        self.voice_mut(off.voice)?;
        if self
            .pending
            .iter()
            .any(|(_, _, e)| matches!(e, Event::Off(p) if *p == off))
        {
            return Ok(());
        }
        self.push(Event::Off(off))
    }

    /// Queues a MIDI controller change.
    pub fn control(&mut self, c: Control) -> Result<(), EngineError> {
        self.push(Event::Control(c))
    }

    /// Queues a `direct` output change.
    pub fn cv_set(&mut self, s: CvSet) -> Result<(), EngineError> {
        if usize::from(s.channel) >= self.channels.len() {
            self.stats.dropped_events += 1;
            return Err(EngineError::NoSuchChannel(s.channel));
        }
        self.push(Event::Set(s))
    }

    /// Extends the leases of held `voices` to `until`.
    pub fn renew(&mut self, voices: &[VoiceId], until: ClusterTime) {
        for &v in voices {
            if let Some(v) = self.voices.get_mut(usize::from(v))
                && v.held
            {
                v.lease_until = v.lease_until.max(until);
            }
        }
    }

    /// Releases every voice now (the session is gone): every gate drops at the next
    /// [`Self::handle_timeout`].
    pub fn release_all(&mut self) {
        for v in &mut self.voices {
            v.held = false;
        }
        self.pending
            .retain(|(_, _, e)| !matches!(e, Event::On(_) | Event::Off(_)));
    }

    fn voice_mut(&mut self, voice: VoiceId) -> Result<&mut Voice, EngineError> {
        match self.voices.get_mut(usize::from(voice)) {
            Some(v) => Ok(v),
            None => {
                self.stats.dropped_events += 1;
                Err(EngineError::NoSuchVoice(voice))
            }
        }
    }

    fn apply(&mut self, ev: Event, now: ClusterTime) {
        if now.0 > ev.at().0.saturating_add(LATE_NS) {
            self.stats.late_events += 1;
        }
        let at = ev.at().min(now);
        match ev {
            Event::On(on) => {
                let Some(v) = self.voices.get_mut(usize::from(on.voice)) else {
                    return;
                };
                let retrigger = v.held;
                *v = Voice {
                    held: true,
                    note: on.note.min(127),
                    velocity: on.velocity.min(127),
                    midi_channel: on.channel & 15,
                    on_at: on.at,
                    lease_until: on.lease_until,
                    gap_until: if retrigger {
                        after(at, RETRIGGER_GAP_NS)
                    } else {
                        ClusterTime::ZERO
                    },
                    trigger_until: ClusterTime::ZERO,
                    generation: v.generation.wrapping_add(1),
                };
                let voice = on.voice;
                for c in &mut self.channels {
                    if c.assign.voice != voice {
                        continue;
                    }
                    match c.assign.function {
                        CvFunction::Trigger => {
                            c.pulse_until = after(at, pulse_ns(c.assign.pulse_ms))
                        }
                        CvFunction::Pitch | CvFunction::Gate | CvFunction::Velocity => {}
                        _ => continue,
                    }
                    c.touched = true;
                }
            }
            Event::Off(off) => {
                let Some(v) = self.voices.get(usize::from(off.voice)).copied() else {
                    return;
                };
                if !v.held {
                    return;
                }
                let earliest = after(v.on_at, MIN_GATE_NS);
                if off.at < earliest && now < earliest {
                    // Too short a gate: keep it open until the minimum length.
                    let _ = self.push(Event::Off(VoiceOff {
                        voice: off.voice,
                        at: earliest,
                    }));
                    return;
                }
                if let Some(v) = self.voices.get_mut(usize::from(off.voice)) {
                    v.held = false;
                }
                for c in &mut self.channels {
                    if c.assign.voice == off.voice && c.assign.function == CvFunction::Gate {
                        c.touched = true;
                    }
                }
            }
            Event::Control(ctl) => {
                let mc = ctl.midi_channel & 15;
                if ctl.kind == ControlKind::PitchBend {
                    self.bend[usize::from(mc)] = ctl.value.min(16383);
                }
                for c in &mut self.channels {
                    let a = &c.assign;
                    let hit = match (a.function, ctl.kind) {
                        (CvFunction::Cc, ControlKind::Cc) => {
                            a.midi_channel == mc && a.param == u16::from(ctl.number)
                        }
                        (CvFunction::Aftertouch, ControlKind::Aftertouch) => a.midi_channel == mc,
                        (CvFunction::PitchBend, ControlKind::PitchBend) => a.midi_channel == mc,
                        (CvFunction::Pitch, ControlKind::PitchBend) => true,
                        _ => false,
                    };
                    if hit {
                        if matches!(a.function, CvFunction::Cc | CvFunction::Aftertouch) {
                            c.value = i32::from(u7_to_u16(ctl.value.min(127) as u8));
                        }
                        c.touched = true;
                    }
                }
            }
            Event::Set(s) => {
                if let Some(c) = self.channels.get_mut(usize::from(s.channel))
                    && c.assign.function == CvFunction::Direct
                {
                    c.value = s.microvolts;
                    c.touched = true;
                }
            }
        }
    }

    /// Applies everything due at cluster time `now`: queued events, lease expiries, glides,
    /// pulses, the periodic refresh, DAC re-init retries; then recomputes every code.
    pub fn handle_timeout(&mut self, now: ClusterTime) {
        if now < self.now {
            // Cluster time stepped back (a new coordinator's clock): restart the periodic
            // work from here instead of waiting for the old deadlines to come round again.
            self.next_refresh = now;
            for c in &mut self.channels {
                c.next_pulse = None;
                c.pulse_until = c.pulse_until.min(now);
            }
        }
        self.now = now;
        while let Some(&(at, _, ev)) = self.pending.first() {
            if at > now {
                break;
            }
            self.pending.remove(0);
            self.apply(ev, now);
        }
        for v in &mut self.voices {
            if v.held && v.lease_until < now {
                v.held = false;
                self.stats.lease_expiries += 1;
            }
        }
        if now >= self.next_refresh {
            self.next_refresh = after(now, REFRESH_NS);
            for c in &mut self.channels {
                c.refresh = true;
            }
            for d in &mut self.dacs {
                if let DacState::Failed { retry_at } = *d
                    && retry_at <= now
                {
                    *d = DacState::Uninit;
                }
            }
        }
        for i in 0..self.channels.len() {
            let uv = self.output_uv(i, now);
            let c = &mut self.channels[i];
            let code = match calibrated_code(&c.assign.calibration, uv) {
                Some(code) => code.clamp(0, (1i32 << c.bits) - 1) as u16,
                None => nominal_code(uv, c.bits, c.full_scale_uv),
            };
            if code != c.code {
                c.code = code;
                c.seq = c.seq.wrapping_add(1);
            } else if c.touched {
                self.stats.skipped_writes += 1;
            }
            c.touched = false;
        }
    }

    /// The voltage channel `i` should output at `now`, advancing its pulse and glide state.
    fn output_uv(&mut self, i: usize, now: ClusterTime) -> i32 {
        let timeline = self.timeline;
        let bend = self.bend;
        let c = &mut self.channels[i];
        let a = Params::of(&c.assign);
        let voice = self.voices.get(usize::from(a.voice)).copied();
        let (lo, hi) = (a.min_uv, a.max_uv);
        match a.function {
            CvFunction::Off => lo,
            CvFunction::Direct => c.value,
            CvFunction::Cc | CvFunction::Aftertouch => scale_u16(lo, hi, c.value as u16),
            CvFunction::PitchBend => {
                scale_u16(lo, hi, u14_to_u16(bend[usize::from(a.midi_channel & 15)]))
            }
            CvFunction::Velocity => match voice {
                Some(v) if v.generation > 0 => scale_u16(lo, hi, u7_to_u16(v.velocity)),
                _ => lo,
            },
            CvFunction::Gate => match voice {
                Some(v) if v.held && now >= v.gap_until => hi,
                _ => lo,
            },
            CvFunction::Trigger => {
                if now < c.pulse_until {
                    hi
                } else {
                    lo
                }
            }
            CvFunction::Clock | CvFunction::Reset => {
                let Some(tl) = timeline else {
                    return lo;
                };
                let (num, den) = a.pulse_rate();
                let mut k = match c.next_pulse {
                    Some(k) => k,
                    None => first_pulse_at_or_after(&tl, now, num, den),
                };
                // Start the latest pulse that is due; skip any missed before it.
                let mut started = None;
                for _ in 0..1024 {
                    let t = pulse_time(&tl, k, num, den);
                    if t > now {
                        break;
                    }
                    started = Some(t);
                    k += 1;
                }
                if pulse_time(&tl, k, num, den) <= now {
                    // More than 1024 pulses behind (a stalled glue): skip to the present.
                    k = first_pulse_at_or_after(&tl, now, num, den);
                }
                if let Some(t) = started {
                    c.pulse_until = after(t, pulse_ns(a.pulse_ms));
                }
                c.next_pulse = Some(k);
                if now < c.pulse_until { hi } else { lo }
            }
            CvFunction::Pitch => {
                let Some(v) = voice else {
                    return lo;
                };
                if v.generation == 0 {
                    return c.glide.to_uv;
                }
                let note_uv = pitch_microvolts(v.note, a.base_note, 0, 0);
                if v.generation != c.seen_generation {
                    let from = Self::glide_uv(&c.glide, now);
                    let first = c.seen_generation == 0;
                    c.seen_generation = v.generation;
                    c.glide = Glide {
                        from_uv: if first { note_uv } else { from },
                        to_uv: note_uv,
                        start: v.on_at.min(now),
                        dur_ns: u64::from(a.glide_ms) * 1_000_000,
                    };
                }
                let b = bend_from_14bit(bend[usize::from(v.midi_channel)]);
                let bend_uv = pitch_microvolts(0, 0, b, u32::from(a.bend_semitones) * 100);
                Self::glide_uv(&c.glide, now).saturating_add(bend_uv)
            }
            _ => lo,
        }
    }

    fn glide_uv(g: &Glide, now: ClusterTime) -> i32 {
        let el = now.0.saturating_sub(g.start.0);
        if g.dur_ns == 0 || el >= g.dur_ns {
            return g.to_uv;
        }
        let span = i64::from(g.to_uv) - i64::from(g.from_uv);
        (i64::from(g.from_uv) + (i128::from(span) * i128::from(el) / i128::from(g.dur_ns)) as i64)
            as i32
    }

    /// When [`Self::handle_timeout`] must run next (cluster time).
    pub fn next_deadline(&self) -> ClusterTime {
        let now = self.now;
        let mut t = self.next_refresh;
        let mut consider = |x: ClusterTime| {
            if x > now && x < t {
                t = x;
            }
        };
        if let Some(&(at, _, _)) = self.pending.first() {
            consider(at.max(after(now, 1)));
        }
        for v in &self.voices {
            if v.held {
                consider(after(v.lease_until, 1));
                consider(v.gap_until);
            }
        }
        for c in &self.channels {
            consider(c.pulse_until);
            if let (Some(k), Some(tl)) = (c.next_pulse, self.timeline) {
                let (num, den) = Params::of(&c.assign).pulse_rate();
                consider(pulse_time(&tl, k, num, den));
            }
            let g = &c.glide;
            if c.assign.function == CvFunction::Pitch
                && g.dur_ns > 0
                && now.0 < g.start.0.saturating_add(g.dur_ns)
            {
                consider(after(now, GLIDE_STEP_NS));
            }
        }
        for d in &self.dacs {
            if let DacState::Failed { retry_at } = *d {
                consider(retry_at);
            }
        }
        t
    }

    /// The next DAC to initialise, if any (each DAC is initialised before its first write,
    /// and re-initialised after a failure every refresh period).
    pub fn poll_init(&mut self) -> Option<u8> {
        let d = self.dacs.iter().position(|d| *d == DacState::Uninit)?;
        self.dacs[d] = DacState::Initialising;
        Some(d as u8)
    }

    /// Result of initialising DAC `dac`.
    pub fn init_done(&mut self, dac: u8, ok: bool, now: ClusterTime) {
        let Some(d) = self.dacs.get_mut(usize::from(dac)) else {
            return;
        };
        if ok {
            *d = DacState::Ready;
            for c in self.channels.iter_mut().filter(|c| c.dac == dac) {
                c.refresh = true;
                c.in_flight = false;
                c.written = None;
            }
        } else {
            *d = DacState::Failed {
                retry_at: after(now, REFRESH_NS),
            };
            self.stats.write_errors += 1;
        }
    }

    /// The next channel write: changed channels, then refreshes; within each, pitch-type
    /// outputs first, gates and pulses last — and a gate not before every pitch-type write
    /// handed out has been reported done, so a gate never lands before its pitch even when
    /// the glue drives several I2C buses in parallel. `None` when everything is written (or waiting for its DAC or for
    /// writes in flight).
    pub fn poll_write(&mut self) -> Option<ChannelWrite> {
        let gate_like = |f: CvFunction| {
            matches!(
                f,
                CvFunction::Gate | CvFunction::Trigger | CvFunction::Clock | CvFunction::Reset
            )
        };
        // Changes before mere refreshes; within each, pitch-type outputs before gates.
        for changed_only in [true, false] {
            for pass_gates in [false, true] {
                if pass_gates
                    && self
                        .channels
                        .iter()
                        .any(|c| c.in_flight && !gate_like(c.assign.function))
                {
                    // A gate never overtakes a pitch: a glue running several buses at once
                    // gets the gates only once every pitch-type write has completed.
                    return None;
                }
                for i in 0..self.channels.len() {
                    let c = &self.channels[i];
                    if gate_like(c.assign.function) != pass_gates
                        || c.in_flight
                        || self.dacs.get(usize::from(c.dac)) != Some(&DacState::Ready)
                    {
                        continue;
                    }
                    let stale = c.written != Some((c.code, c.seq));
                    if !stale && (changed_only || !c.refresh) {
                        continue;
                    }
                    let c = &mut self.channels[i];
                    c.refresh = false;
                    c.in_flight = true;
                    self.stats.writes += 1;
                    return Some(ChannelWrite {
                        channel: i as u16,
                        dac: c.dac,
                        dac_channel: c.dac_channel,
                        code: c.code,
                        seq: c.seq,
                    });
                }
            }
        }
        None
    }

    /// Result of a write handed out by [`Self::poll_write`], finished at cluster time `now`.
    /// Returns whether the channel's code on the DAC changed.
    pub fn write_done(&mut self, w: ChannelWrite, ok: bool, now: ClusterTime) -> bool {
        let Some(c) = self.channels.get_mut(usize::from(w.channel)) else {
            return false;
        };
        c.in_flight = false;
        if ok {
            let changed = c.written.map(|(code, _)| code) != Some(w.code);
            c.written = Some((w.code, w.seq));
            if changed {
                c.changed_at = now;
            }
            changed
        } else {
            self.stats.write_errors += 1;
            let dac = c.dac;
            if let Some(d) = self.dacs.get_mut(usize::from(dac)) {
                *d = DacState::Failed {
                    retry_at: after(now, REFRESH_NS),
                };
            }
            for c in self.channels.iter_mut().filter(|c| c.dac == dac) {
                c.written = None;
                c.changed_at = now;
            }
            true
        }
    }
}
