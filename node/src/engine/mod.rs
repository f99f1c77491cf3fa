//! The real-time synth engine: a preallocated voice pool that plays timestamped events at
//! their exact frame.
//!
//! The control side (the session) holds an [`EventSender`], the producer end of a wait-free
//! SPSC queue (rtrb); the audio thread owns the [`Engine`], which drains the queue at the start
//! of every block into a fixed-capacity pending list kept sorted by `at` (stable: events with
//! the same `at` keep their arrival order). The backend tells [`Engine::render`] the cluster
//! time of the block's first frame; an event at `at` lands on frame
//! `round((at − block_start) × sr)`. Events before the block play at frame 0 and are counted as
//! late; events after it wait. Nothing in the render path allocates, locks or blocks (proved by
//! the counting-allocator test in `tests/no_alloc.rs`).
//!
//! Counters the session reads live in [`EngineCounters`] (atomics).
//!
//! The sound comes from a [`SynthEngine`] plugin (see [`plugin`]): the scheduler splits each
//! block at its events' frames and renders the span before each event with one
//! [`SynthEngine::render_add`] call, so events are frame-exact and blocks without events render
//! in one vectorised pass. The scheduler keeps the gates and leases; the engine only the sound.

/// Declares an engine's parameters: a `pub const` id per parameter (documented with its unit,
/// range and default) and `PARAMS`, the engine's [`plugin::ParamInfo`] table in id order. Used by
/// every engine so their parameter tables have one shape.
macro_rules! params {
    ($($id:literal $c:ident $name:literal $min:literal $max:literal $def:literal $unit:literal;)*) => {
        $(
            #[doc = concat!("Parameter `", $name, "`: ", $unit, " (", stringify!($min), " – ", stringify!($max), ", default ", stringify!($def), ").")]
            pub const $c: u16 = $id;
        )*
        /// Every parameter, in id order.
        pub static PARAMS: &[ParamInfo] = &[
            $(ParamInfo { id: $id, name: $name, min: $min, max: $max, default: $def, unit: $unit },)*
        ];
    };
}

pub mod bench;
pub mod dsp;
pub mod fm2;
pub mod naive;
pub mod plugin;
pub mod subtractive;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use voicemesh_protocol::{ClusterTime, Timeline, VoiceId};

pub use crate::clock::audio::BlockTime;

pub use plugin::{
    API_VERSION, DEFAULT_ENGINE, ENGINE_COUNT, ENGINE_NAMES, EngineInfo, EngineState,
    PARAM_PITCH_SEMITONES, PARAM_VOLUME, ParamInfo, Preset, SynthEngine, Tempo, UnknownEngine,
    create, engine_info, engines,
};

/// Largest render call the scheduler makes into an engine (longer blocks are cut).
pub const DEFAULT_MAX_BLOCK: usize = 1024;

/// Capacity of the control → audio event queue.
pub const EVENT_QUEUE_CAPACITY: usize = 1024;
/// Capacity of the list of events waiting for a later block.
pub const PENDING_CAPACITY: usize = 1024;
/// Capacity of the onset queue (audio → recorder).
pub const ONSET_QUEUE_CAPACITY: usize = 4096;

/// What an event does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EventKind {
    /// Start `note` at `velocity` on the voice, held until `lease_until` unless renewed.
    On {
        /// MIDI note.
        note: u8,
        /// MIDI velocity.
        velocity: u8,
        /// Lease end.
        lease_until: ClusterTime,
    },
    /// Release the voice.
    Off,
    /// Set an engine parameter of the voice.
    Param {
        /// Parameter number ([`PARAM_VOLUME`], [`PARAM_PITCH_SEMITONES`], or one of the
        /// engine's, see [`EngineInfo::params`]).
        param: u16,
        /// New value.
        value: f32,
    },
    /// Extend the voice's lease (applies on arrival; `at` is ignored).
    Renew {
        /// New lease end.
        until: ClusterTime,
    },
}

/// One event for one voice, at a cluster time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineEvent {
    /// Voice slot.
    pub voice: VoiceId,
    /// When it applies.
    pub at: ClusterTime,
    /// What it does.
    pub kind: EventKind,
}

/// A message on the control → audio queue.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Control {
    /// A voice event.
    Event(EngineEvent),
    /// A new tempo timeline.
    Timeline(Timeline),
    /// Release every held voice now and drop every voice event still waiting for its time:
    /// the coordinator session they came from is gone or replaced, so nobody will renew or
    /// release them (a new coordinator session starts from nothing).
    ReleaseAll,
}

/// A voice start as it was rendered, for the WAV recorder's JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Onset {
    /// Voice slot.
    pub voice: VoiceId,
    /// MIDI note.
    pub note: u8,
    /// MIDI velocity.
    pub velocity: u8,
    /// The event's `at`.
    pub at_ns: u64,
    /// Engine frame (since the engine started) on which the voice started.
    pub frame: u64,
    /// Cluster time of that frame, from the backend's model.
    pub frame_cluster_ns: u64,
    /// `CLOCK_MONOTONIC` ns at which the backend's device emits that frame (0: unknown, e.g.
    /// offline rendering). See [`crate::clock::audio::BlockTime`].
    pub emitted_mono_ns: u64,
}

/// Counters shared between the audio thread and the session (all atomics, wait-free).
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Voices sounding after the last block.
    pub active_voices: AtomicU32,
    /// Events whose `at` was before the block they were played in.
    pub late_events: AtomicU32,
    /// Voices the engine released because their lease ran out.
    pub lease_expiries: AtomicU32,
    /// Audio buffer under/overruns reported by the backend.
    pub xruns: AtomicU32,
    /// Events dropped: queue or pending list full, voice out of range, bad parameter.
    pub dropped_events: AtomicU32,
    /// Blocks rendered.
    pub blocks: AtomicU64,
    /// Frames rendered.
    pub frames: AtomicU64,
    /// Sum of per-block load (per-mille of the block's time budget) since the last read.
    load_sum: AtomicU64,
    /// Blocks in `load_sum`.
    load_count: AtomicU64,
    /// Largest per-block load since the last read.
    load_max: AtomicU32,
}

impl EngineCounters {
    /// Records one block's callback load.
    pub fn record_load(&self, permille: u32) {
        self.load_sum
            .fetch_add(u64::from(permille), Ordering::Relaxed);
        self.load_count.fetch_add(1, Ordering::Relaxed);
        self.load_max.fetch_max(permille, Ordering::Relaxed);
    }

    /// Mean and max callback load in per-mille since the previous call, and resets them.
    pub fn take_load(&self) -> (u16, u16) {
        let sum = self.load_sum.swap(0, Ordering::Relaxed);
        let n = self.load_count.swap(0, Ordering::Relaxed);
        let max = self.load_max.swap(0, Ordering::Relaxed);
        let mean = sum.checked_div(n).unwrap_or(0);
        (
            mean.min(u64::from(u16::MAX)) as u16,
            max.min(u32::from(u16::MAX)) as u16,
        )
    }

    fn get(a: &AtomicU32) -> u32 {
        a.load(Ordering::Relaxed)
    }

    /// Voices sounding.
    pub fn active(&self) -> u32 {
        Self::get(&self.active_voices)
    }
    /// Late events so far.
    pub fn late(&self) -> u32 {
        Self::get(&self.late_events)
    }
    /// Lease expiries so far.
    pub fn expiries(&self) -> u32 {
        Self::get(&self.lease_expiries)
    }
    /// Xruns so far.
    pub fn xrun_count(&self) -> u32 {
        Self::get(&self.xruns)
    }
    /// Dropped events so far.
    pub fn dropped(&self) -> u32 {
        Self::get(&self.dropped_events)
    }
}

/// The control side's end of the event queue.
#[derive(Debug)]
pub struct EventSender {
    tx: rtrb::Producer<Control>,
    voices: u16,
    counters: Arc<EngineCounters>,
}

impl EventSender {
    /// Queues `c` for the audio thread. A full queue or a voice outside the pool drops the
    /// event and counts it; returns whether it was queued.
    pub fn send(&mut self, c: Control) -> bool {
        if let Control::Event(e) = &c
            && e.voice >= self.voices
        {
            self.counters.dropped_events.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        match self.tx.push(c) {
            Ok(()) => true,
            Err(_) => {
                self.counters.dropped_events.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Number of voices in the pool.
    pub fn voices(&self) -> u16 {
        self.voices
    }
}

/// The audio-thread half: voice gates and leases, pending events, render through a
/// [`SynthEngine`].
#[derive(Debug)]
pub struct Engine {
    sample_rate: u32,
    synth: Box<dyn SynthEngine>,
    max_block: usize,
    gated: Box<[bool]>,
    lease_until: Box<[u64]>,
    rx: rtrb::Consumer<Control>,
    pending: Vec<EngineEvent>,
    counters: Arc<EngineCounters>,
    onsets: Option<rtrb::Producer<Onset>>,
    /// A second onset queue, for the control session's `Onset` reports.
    onset_reports: Option<rtrb::Producer<Onset>>,
    frame: u64,
    timeline: Option<Timeline>,
}

impl Engine {
    /// An engine of `voices` voices at `sample_rate` Hz playing the default synth engine
    /// ([`DEFAULT_ENGINE`]), and the sender that feeds it.
    pub fn new(
        voices: u16,
        sample_rate: u32,
        counters: Arc<EngineCounters>,
    ) -> (Engine, EventSender) {
        let synth = create(
            DEFAULT_ENGINE,
            sample_rate,
            DEFAULT_MAX_BLOCK,
            usize::from(voices),
        )
        .unwrap_or_else(|_| {
            Box::new(subtractive::Subtractive::new(
                sample_rate,
                DEFAULT_MAX_BLOCK,
                usize::from(voices),
            ))
        });
        Self::with_synth(synth, voices, sample_rate, counters)
    }

    /// An engine playing the registered synth engine `name` (see [`engines`]).
    pub fn with_engine(
        name: &str,
        voices: u16,
        sample_rate: u32,
        counters: Arc<EngineCounters>,
    ) -> Result<(Engine, EventSender), UnknownEngine> {
        let synth = create(name, sample_rate, DEFAULT_MAX_BLOCK, usize::from(voices))?;
        Ok(Self::with_synth(synth, voices, sample_rate, counters))
    }

    /// An engine playing `synth`, whose pool must have `voices` voices (fewer make the extra
    /// voice numbers drop their events).
    pub fn with_synth(
        synth: Box<dyn SynthEngine>,
        voices: u16,
        sample_rate: u32,
        counters: Arc<EngineCounters>,
    ) -> (Engine, EventSender) {
        let voices = voices.min(u16::try_from(synth.voices()).unwrap_or(u16::MAX));
        let (tx, rx) = rtrb::RingBuffer::new(EVENT_QUEUE_CAPACITY);
        let engine = Engine {
            sample_rate: sample_rate.max(1),
            synth,
            max_block: DEFAULT_MAX_BLOCK,
            gated: vec![false; usize::from(voices)].into_boxed_slice(),
            lease_until: vec![0; usize::from(voices)].into_boxed_slice(),
            rx,
            pending: Vec::with_capacity(PENDING_CAPACITY),
            counters: counters.clone(),
            onsets: None,
            onset_reports: None,
            frame: 0,
            timeline: None,
        };
        (
            engine,
            EventSender {
                tx,
                voices,
                counters,
            },
        )
    }

    /// Makes the engine report every voice start on a queue; returns its consumer end.
    pub fn record_onsets(&mut self) -> rtrb::Consumer<Onset> {
        let (tx, rx) = rtrb::RingBuffer::new(ONSET_QUEUE_CAPACITY);
        self.onsets = Some(tx);
        rx
    }

    /// Makes the engine also report every voice start on a second queue (the control
    /// session's, which sends them to the coordinator); returns its consumer end.
    pub fn report_onsets(&mut self) -> rtrb::Consumer<Onset> {
        let (tx, rx) = rtrb::RingBuffer::new(ONSET_QUEUE_CAPACITY);
        self.onset_reports = Some(tx);
        rx
    }

    /// Sample rate in Hz.
    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// Frames rendered since the engine started.
    pub fn frames_rendered(&self) -> u64 {
        self.frame
    }

    /// Number of voices in the pool.
    pub fn voices(&self) -> u16 {
        self.gated.len() as u16
    }

    /// Whether `voice` makes sound (attack, sustain or release).
    pub fn voice_active(&self, voice: VoiceId) -> bool {
        self.synth.is_active(usize::from(voice))
    }

    /// Whether `voice` is held (started and neither released nor expired).
    pub fn voice_gated(&self, voice: VoiceId) -> bool {
        self.gated.get(usize::from(voice)).copied().unwrap_or(false)
    }

    /// The synth engine (for inspection and for state save/load off the audio thread).
    pub fn synth(&self) -> &dyn SynthEngine {
        &*self.synth
    }

    /// The synth engine, mutably.
    pub fn synth_mut(&mut self) -> &mut dyn SynthEngine {
        &mut *self.synth
    }

    /// The latest tempo timeline received, if any.
    pub fn timeline(&self) -> Option<Timeline> {
        self.timeline
    }

    /// The counters this engine writes.
    pub fn counters(&self) -> &Arc<EngineCounters> {
        &self.counters
    }

    /// Frame offset of `at` in a block starting at `block_start` (may be negative or beyond
    /// the block).
    pub fn frame_offset(&self, block_start: ClusterTime, at: ClusterTime) -> i64 {
        let dt = at.nanos_since(block_start) as i128;
        let sr = i128::from(self.sample_rate);
        // round(dt × sr / 1e9), exact integer maths, rounding half away from zero.
        let num = dt * sr;
        let q = (num.abs() + 500_000_000) / 1_000_000_000;
        (if num < 0 { -q } else { q }) as i64
    }

    fn insert_pending(&mut self, e: EngineEvent) {
        if self.pending.len() >= self.pending.capacity() {
            self.counters.dropped_events.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // After every event with the same or an earlier `at`: stable order.
        let pos = self.pending.partition_point(|p| p.at <= e.at);
        self.pending.insert(pos, e);
    }

    fn drain_queue(&mut self) {
        while let Ok(c) = self.rx.pop() {
            match c {
                Control::Timeline(t) => self.timeline = Some(t),
                Control::ReleaseAll => {
                    self.pending.clear();
                    for v in 0..self.gated.len() {
                        if self.gated[v] {
                            self.gated[v] = false;
                            self.synth.note_off(v);
                        }
                    }
                }
                Control::Event(e) if usize::from(e.voice) >= self.gated.len() => {
                    self.counters.dropped_events.fetch_add(1, Ordering::Relaxed);
                }
                Control::Event(EngineEvent {
                    voice,
                    kind: EventKind::Renew { until },
                    ..
                }) => self.renew(voice, until),
                Control::Event(e) => self.insert_pending(e),
            }
        }
    }

    fn renew(&mut self, voice: VoiceId, until: ClusterTime) {
        let v = usize::from(voice);
        if self.gated[v] {
            self.lease_until[v] = self.lease_until[v].max(until.0);
        }
        // A renewal may overtake the note-on it is for.
        for p in self.pending.iter_mut() {
            if p.voice == voice
                && let EventKind::On { lease_until, .. } = &mut p.kind
            {
                *lease_until = (*lease_until).max(until);
            }
        }
    }

    fn apply(&mut self, e: EngineEvent, frame_in_block: usize, block: &BlockTime) {
        let idx = usize::from(e.voice);
        let sr = u128::from(self.sample_rate);
        let block_start = block.cluster;
        match e.kind {
            EventKind::On {
                note,
                velocity,
                lease_until,
            } => {
                self.synth.note_on(idx, note, velocity);
                self.gated[idx] = true;
                self.lease_until[idx] = lease_until.0;
                if self.onsets.is_some() || self.onset_reports.is_some() {
                    let off_ns = (frame_in_block as u128 * 1_000_000_000 + sr / 2) / sr;
                    let onset = Onset {
                        voice: e.voice,
                        note,
                        velocity,
                        at_ns: e.at.0,
                        frame: self.frame + frame_in_block as u64,
                        frame_cluster_ns: block_start.0 + off_ns as u64,
                        emitted_mono_ns: block.mono_of(frame_in_block),
                    };
                    // A full onset queue loses the record, never the note.
                    for tx in [self.onsets.as_mut(), self.onset_reports.as_mut()]
                        .into_iter()
                        .flatten()
                    {
                        let _ = tx.push(onset);
                    }
                }
            }
            EventKind::Off => {
                if self.gated[idx] {
                    self.gated[idx] = false;
                    self.synth.note_off(idx);
                }
            }
            EventKind::Param { param, value } => {
                if !self.synth.set_param(idx, param, value) {
                    self.counters.dropped_events.fetch_add(1, Ordering::Relaxed);
                }
            }
            EventKind::Renew { until } => self.renew(e.voice, until),
        }
    }

    /// Renders `out` (the frames from `first` of the block starting at `block_start`).
    fn render_voices(&mut self, block_start: ClusterTime, first: usize, out: &mut [f32]) {
        let sr = u64::from(self.sample_rate);
        let mut start = first;
        for span in out.chunks_mut(self.max_block) {
            let tempo = match self.timeline {
                Some(t) => {
                    let at = ClusterTime(block_start.0 + (start as u64 * 1_000_000_000) / sr);
                    Tempo {
                        beat: t.beats_at(at),
                        beats_per_second: 1e9 / t.ns_per_beat.max(1) as f64,
                        from_timeline: true,
                    }
                }
                None => Tempo {
                    beat: (self.frame + start as u64) as f64 * 2.0 / sr as f64,
                    ..Tempo::default()
                },
            };
            self.synth.set_tempo(tempo);
            self.synth.render_add(span);
            start += span.len();
        }
    }

    /// Renders one block whose first frame sounds at cluster time `block_start`, overwriting
    /// `out`. Real-time safe: no allocation, no lock, no blocking.
    pub fn render(&mut self, block_start: ClusterTime, out: &mut [f32]) {
        self.render_block(BlockTime::cluster_only(block_start, self.sample_rate), out);
    }

    /// [`Engine::render`] with the block's full timing from the backend's audio clock model:
    /// onsets then also carry the `CLOCK_MONOTONIC` instant their first frame is emitted.
    /// Real-time safe: no allocation, no lock, no blocking.
    pub fn render_block(&mut self, block: BlockTime, out: &mut [f32]) {
        let block_start = block.cluster;
        out.fill(0.0);
        self.drain_queue();

        // Leases: a held voice whose lease ended before this block is released now.
        for v in 0..self.gated.len() {
            if self.gated[v] && self.lease_until[v] <= block_start.0 {
                self.gated[v] = false;
                self.synth.note_off(v);
                self.counters.lease_expiries.fetch_add(1, Ordering::Relaxed);
            }
        }

        let n = out.len();
        let mut cursor = 0usize;
        let mut applied = 0usize;
        while applied < self.pending.len() {
            let e = self.pending[applied];
            let off = self.frame_offset(block_start, e.at);
            if off >= n as i64 {
                break;
            }
            if off < 0 {
                self.counters.late_events.fetch_add(1, Ordering::Relaxed);
            }
            let off = off.max(0) as usize;
            if off > cursor {
                self.render_voices(block_start, cursor, &mut out[cursor..off]);
                cursor = off;
            }
            self.apply(e, cursor, &block);
            applied += 1;
        }
        self.pending.drain(..applied);
        if cursor < n {
            self.render_voices(block_start, cursor, &mut out[cursor..]);
        }
        for s in out.iter_mut() {
            *s = s.clamp(-1.0, 1.0);
        }

        self.frame += n as u64;
        let active = self.synth.active_voices() as u32;
        self.counters.active_voices.store(active, Ordering::Relaxed);
        self.counters.blocks.fetch_add(1, Ordering::Relaxed);
        self.counters.frames.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// [`Engine::render`], also recording the callback load (time spent against the block's
    /// duration) into the counters.
    pub fn render_timed(&mut self, block_start: ClusterTime, out: &mut [f32]) {
        let t0 = monotonic_ns();
        self.render(block_start, out);
        let spent = monotonic_ns().saturating_sub(t0);
        let budget = (out.len() as u64 * 1_000_000_000) / u64::from(self.sample_rate);
        let permille = (spent * 1000).checked_div(budget).unwrap_or(0);
        self.counters
            .record_load(permille.min(u64::from(u32::MAX)) as u32);
    }
}

/// CLOCK_MONOTONIC in ns (vDSO, no allocation, no syscall on x86/arm64).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const SR: u32 = 48_000;
    const BLOCK: usize = 256;

    fn engine(voices: u16) -> (Engine, EventSender, Arc<EngineCounters>) {
        let c = Arc::new(EngineCounters::default());
        let (e, s) = Engine::new(voices, SR, c.clone());
        (e, s, c)
    }

    fn on(voice: u16, at: u64) -> Control {
        Control::Event(EngineEvent {
            voice,
            at: ClusterTime(at),
            kind: EventKind::On {
                note: 69,
                velocity: 127,
                lease_until: ClusterTime(u64::MAX),
            },
        })
    }

    fn first_nonzero(buf: &[f32]) -> Option<usize> {
        buf.iter().position(|s| *s != 0.0)
    }

    const T0: u64 = 1_000_000_000_000;

    #[test]
    fn event_lands_on_its_exact_frame() {
        for frame in [0usize, 1, 17, 100, 255] {
            let (mut e, mut tx, c) = engine(8);
            let mut onsets = e.record_onsets();
            // Frame 17 is at 17/48000 s = 354166.67 ns; 354167 rounds to frame 17.
            let at = T0 + (frame as u64 * 1_000_000_000).div_ceil(u64::from(SR));
            assert!(tx.send(on(3, at)));
            let mut out = [0.0f32; BLOCK];
            e.render(ClusterTime(T0), &mut out);
            // The saw starts at −1 at the note's first frame (times the attack's first step).
            assert_eq!(first_nonzero(&out), Some(frame), "frame {frame}");
            assert_eq!(c.active(), 1);
            assert_eq!(c.late(), 0);
            let o = onsets.pop().unwrap();
            assert_eq!(o.frame, frame as u64);
            assert_eq!(o.at_ns, at);
        }
    }

    #[test]
    fn event_in_a_later_block_waits_for_it() {
        let (mut e, mut tx, c) = engine(8);
        let block_ns = BLOCK as u64 * 1_000_000_000 / u64::from(SR);
        // Frame 300 of the stream = frame 44 of the second block.
        let at = T0 + (300u64 * 1_000_000_000).div_ceil(u64::from(SR));
        tx.send(on(0, at));
        let mut out = [0.0f32; BLOCK];
        e.render(ClusterTime(T0), &mut out);
        assert_eq!(first_nonzero(&out), None);
        assert_eq!(c.active(), 0);
        let second = T0 + (BLOCK as u64 * 1_000_000_000) / u64::from(SR);
        assert_eq!(second, T0 + block_ns);
        e.render(ClusterTime(second), &mut out);
        assert_eq!(first_nonzero(&out), Some(300 - BLOCK));
        assert_eq!(c.late(), 0);
    }

    #[test]
    fn late_event_plays_at_frame_zero_and_is_counted() {
        let (mut e, mut tx, c) = engine(8);
        tx.send(on(1, T0 - 3_000_000));
        let mut out = [0.0f32; BLOCK];
        e.render(ClusterTime(T0), &mut out);
        assert_eq!(first_nonzero(&out), Some(0));
        assert_eq!(c.late(), 1);
        assert_eq!(c.active(), 1);
    }

    #[test]
    fn events_apply_in_time_order_within_a_block() {
        let (mut e, mut tx, _c) = engine(8);
        // Off arrives first but is later than the On.
        tx.send(Control::Event(EngineEvent {
            voice: 0,
            at: ClusterTime(T0 + 2_000_000),
            kind: EventKind::Off,
        }));
        tx.send(on(0, T0 + 1_000_000));
        let mut out = [0.0f32; BLOCK];
        e.render(ClusterTime(T0), &mut out);
        assert_eq!(first_nonzero(&out), Some(48));
        assert!(e.voice_active(0) && !e.voice_gated(0));
    }

    #[test]
    fn expired_lease_releases_the_voice() {
        let (mut e, mut tx, c) = engine(8);
        let block_ns = 5_333_333u64;
        tx.send(Control::Event(EngineEvent {
            voice: 2,
            at: ClusterTime(T0),
            kind: EventKind::On {
                note: 60,
                velocity: 100,
                lease_until: ClusterTime(T0 + 20_000_000),
            },
        }));
        let mut out = [0.0f32; BLOCK];
        let mut t = T0;
        for _ in 0..4 {
            e.render(ClusterTime(t), &mut out);
            t += block_ns;
        }
        assert!(e.voice_gated(2), "lease still valid at 16 ms");
        // Renewal extends it.
        tx.send(Control::Event(EngineEvent {
            voice: 2,
            at: ClusterTime(0),
            kind: EventKind::Renew {
                until: ClusterTime(T0 + 40_000_000),
            },
        }));
        for _ in 0..3 {
            e.render(ClusterTime(t), &mut out);
            t += block_ns;
        }
        assert!(e.voice_gated(2), "renewed lease still valid");
        assert_eq!(c.expiries(), 0);
        for _ in 0..2 {
            e.render(ClusterTime(t), &mut out);
            t += block_ns;
        }
        assert!(!e.voice_gated(2));
        assert_eq!(c.expiries(), 1);
        // The release then fades the voice out within 60 ms.
        for _ in 0..13 {
            e.render(ClusterTime(t), &mut out);
            t += block_ns;
        }
        assert_eq!(c.active(), 0);
    }

    #[test]
    fn release_all_releases_held_voices_and_drops_waiting_events() {
        let (mut e, mut tx, c) = engine(8);
        let block_ns = 5_333_333u64;
        tx.send(on(1, T0));
        tx.send(on(3, T0));
        let mut out = [0.0f32; BLOCK];
        e.render(ClusterTime(T0), &mut out);
        assert!(e.voice_gated(1) && e.voice_gated(3));
        // A note-on still waiting for its time (100 ms ahead) is dropped with the rest.
        tx.send(on(5, T0 + 100_000_000));
        tx.send(Control::ReleaseAll);
        let mut t = T0 + block_ns;
        e.render(ClusterTime(t), &mut out);
        assert!(!e.voice_gated(1) && !e.voice_gated(3));
        assert!(e.voice_active(1), "released with the release fade, not cut");
        for _ in 0..30 {
            t += block_ns;
            e.render(ClusterTime(t), &mut out);
        }
        assert!(!e.voice_gated(5), "the waiting note-on never starts");
        assert_eq!(c.active(), 0);
        assert!(out.iter().all(|s| *s == 0.0), "silent after the fade");
        assert_eq!(c.expiries(), 0, "not counted as lease expiries");
    }

    #[test]
    fn out_of_range_voice_is_dropped_and_counted() {
        let (_e, mut tx, c) = engine(4);
        assert!(!tx.send(on(4, T0)));
        assert_eq!(c.dropped(), 1);
    }
}
