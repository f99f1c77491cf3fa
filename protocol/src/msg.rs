//! The messages of the control session (coordinator ↔ node) and of MCU datagrams.
//!
//! Direction and order on a Linux node's QUIC stream: the coordinator opens the connection and
//! the stream; the node sends [`Hello`] first, the coordinator answers [`Welcome`] (or
//! [`ErrorMsg`] and closes). After that both ends send [`Heartbeat`] every heartbeat interval;
//! the node sends [`Status`]; the coordinator sends voice events, lease renewals, timeline
//! updates and CV settings. Either end may send [`Bye`] before closing.

use crate::time::{ClusterTime, Timeline};
use serde::{Deserialize, Serialize};

/// A short text on the wire (names, ids, engine names): at most 32 bytes of UTF-8.
pub type ShortStr = heapless::String<32>;
/// A human-readable explanation on the wire: at most 128 bytes of UTF-8.
pub type Text = heapless::String<128>;
/// Most voices one [`LeaseRenew`] can name.
pub const MAX_LEASE_BATCH: usize = 64;
/// Most synth engines a node can announce.
pub const MAX_ENGINES: usize = 8;

/// Index of a voice in a node's voice pool.
pub type VoiceId = u16;

/// What kind of member a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A Linux node with an audio engine.
    Node,
    /// A microcontroller node with CV outputs.
    Mcu,
}

impl Role {
    /// The name used on the wire, in mDNS TXT records and in the HTTP API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Mcu => "mcu",
        }
    }
}

/// Node → coordinator, first message of a session: who the node is and what it can do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Stable node id (also in the mDNS TXT record `id`).
    pub id: ShortStr,
    /// Human-readable name.
    pub name: ShortStr,
    /// Linux node or MCU node.
    pub role: Role,
    /// Number of synth voices in the pool.
    pub voices: u16,
    /// Number of CV output channels.
    pub cv: u16,
    /// Synth engines this node can run.
    pub engines: heapless::Vec<ShortStr, MAX_ENGINES>,
    /// Audio sample rate in Hz (0 for nodes without audio).
    pub sample_rate: u32,
}

/// Coordinator → node: the session is accepted, with its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Id of the coordinator instance.
    pub coordinator: ShortStr,
    /// Heartbeat interval both ends keep, in milliseconds.
    pub heartbeat_ms: u16,
    /// Lease length given with every voice, in milliseconds.
    pub lease_ms: u32,
    /// The current tempo timeline.
    pub timeline: Timeline,
}

/// Either way, every heartbeat interval: proof of life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Sender's heartbeat counter.
    pub seq: u32,
    /// Sender's view of cluster time when sending.
    pub now: ClusterTime,
}

/// What a node's PTP servo is doing, in [`Status`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockState {
    /// No grandmaster followed yet.
    Unlocked,
    /// Following a grandmaster, offset not yet within the lock threshold for long enough.
    Locking,
    /// Following a grandmaster within the lock threshold.
    Locked,
    /// The grandmaster is gone: the clock free-runs at the last rate learnt.
    Holdover,
    /// Not reported: a peer older than protocol 1.2, or a state this build does not know.
    #[default]
    #[serde(other)]
    Unknown,
}

impl ClockState {
    /// The name used on the wire and in the HTTP API.
    pub const fn as_str(self) -> &'static str {
        match self {
            ClockState::Unknown => "unknown",
            ClockState::Unlocked => "unlocked",
            ClockState::Locking => "locking",
            ClockState::Locked => "locked",
            ClockState::Holdover => "holdover",
        }
    }
}

/// Node → coordinator: health and load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Voices currently sounding.
    pub active_voices: u16,
    /// Latest estimate of the node's clock offset from the grandmaster, in nanoseconds.
    pub clock_offset_ns: i64,
    /// Whether the node's cluster clock is synchronised to the grandmaster.
    pub clock_locked: bool,
    /// Audio callback load, in per-mille of the block's time budget (mean since last status).
    pub load_permille: u16,
    /// Audio buffer under/overruns since start.
    pub xruns: u32,
    /// Events that arrived after their `at` and were played at once, since start.
    pub late_events: u32,
    /// Largest single-block callback load since the last status, in per-mille of the block's
    /// time budget. Added in protocol 1.1; a 1.0 peer's `Status` decodes with 0.
    #[serde(default)]
    pub load_max_permille: u16,
    /// What the node's PTP servo is doing. Added in protocol 1.2 (like the `clock_*` fields
    /// below); older peers' `Status` decodes with [`ClockState::Unknown`] and zeros.
    #[serde(default)]
    pub clock_state: ClockState,
    /// Latest mean path delay to the grandmaster, ns (1.2).
    #[serde(default)]
    pub clock_path_delay_ns: i64,
    /// Rate correction the node applies to its local clock, parts per billion (1.2).
    #[serde(default)]
    pub clock_rate_ppb: i64,
    /// Root mean square of recent offset estimates, ns (1.2).
    #[serde(default)]
    pub clock_jitter_ns: i64,
    /// How many times the node's servo stepped its clock since start (1.2).
    #[serde(default)]
    pub clock_steps: u32,
}

/// Coordinator → node: start a voice at `at`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct VoiceOn {
    /// Voice slot on the node.
    pub voice: VoiceId,
    /// MIDI note number (0–127).
    pub note: u8,
    /// MIDI velocity (1–127).
    pub velocity: u8,
    /// MIDI channel (0–15).
    pub channel: u8,
    /// When the note starts.
    pub at: ClusterTime,
    /// The node releases the voice on its own if no renewal arrives by then.
    pub lease_until: ClusterTime,
}

/// Coordinator → node: release a voice at `at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoiceOff {
    /// Voice slot on the node.
    pub voice: VoiceId,
    /// When the release starts.
    pub at: ClusterTime,
}

/// Coordinator → node: change one parameter of one voice at `at`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct VoiceParam {
    /// Voice slot on the node.
    pub voice: VoiceId,
    /// Engine parameter number.
    pub param: u16,
    /// New value, in the parameter's own unit.
    pub value: f32,
    /// When the change applies.
    pub at: ClusterTime,
}

/// Coordinator → node: extend the leases of held voices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRenew {
    /// The voices still held.
    pub voices: heapless::Vec<VoiceId, MAX_LEASE_BATCH>,
    /// Their new lease end.
    pub until: ClusterTime,
}

/// Coordinator → node: set a CV output at `at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CvSet {
    /// CV channel on the node.
    pub channel: u16,
    /// Output voltage in microvolts.
    pub microvolts: i32,
    /// When the output changes.
    pub at: ClusterTime,
}

/// Node → coordinator (protocol 1.2, sent only to a coordinator that speaks 1.2 or later):
/// a voice started. Lets the coordinator measure how closely the nodes of a cluster start the
/// notes of one chord (docs/timing.md, "Measurement").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Onset {
    /// Voice slot on the node.
    pub voice: VoiceId,
    /// MIDI note.
    pub note: u8,
    /// The `at` of the `VoiceOn` that started it: what the coordinator asked for.
    pub at: ClusterTime,
    /// Cluster time of the note's first frame, by the node's audio clock model.
    pub at_frame: ClusterTime,
    /// `CLOCK_MONOTONIC` nanoseconds at which the node's audio output emits that first frame
    /// (0: unknown). Only comparable between processes on one machine, which share the clock.
    #[serde(default)]
    pub emitted_mono_ns: u64,
}

/// Either way: the sender is closing the session on purpose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bye {
    /// Why.
    pub reason: Text,
}

/// What went wrong, for [`ErrorMsg`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The peer speaks another major protocol version.
    VersionMismatch,
    /// A message was not understood.
    BadMessage,
    /// The peer may not join (no capacity, duplicate id, …).
    Refused,
    /// Something else; see the text.
    Other,
}

/// Either way: a request failed; the text says what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// Category.
    pub code: ErrorCode,
    /// Explanation for a human.
    pub text: Text,
}

/// Most CV channels one MCU node can have (and one [`CvReport`] can carry).
pub const MAX_CV_CHANNELS: usize = 32;
/// Most points in one calibration table carried by a [`CvAssign`].
pub const MAX_CV_CAL_POINTS: usize = 16;

/// What a CV output does, for [`CvAssign`]. On the wire: its snake_case name as a str.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CvFunction {
    /// Not driven: the output rests at `min_uv`.
    Off,
    /// Set by [`CvSet`] only (the coordinator computes the voltage).
    Direct,
    /// 1 V/octave pitch of voice slot `voice`: `base_note` is 0 V, the voice's MIDI channel's
    /// pitch bend adds up to ±`bend_semitones`; glides over `glide_ms`.
    Pitch,
    /// Gate of voice slot `voice`: `max_uv` while the note is held, `min_uv` otherwise.
    Gate,
    /// Trigger of voice slot `voice`: `max_uv` for `pulse_ms` at every note-on.
    Trigger,
    /// Velocity of voice slot `voice`: 0–127 → `min_uv`–`max_uv`, held after note-off.
    Velocity,
    /// Control change number `param` on `midi_channel`: 0–127 → `min_uv`–`max_uv`.
    Cc,
    /// Channel aftertouch on `midi_channel`: 0–127 → `min_uv`–`max_uv`.
    Aftertouch,
    /// Pitch bend of `midi_channel` as a voltage: 0–16383 → `min_uv`–`max_uv`.
    PitchBend,
    /// Clock from the timeline: `param` pulses per quarter note (1–96), each `pulse_ms` long.
    Clock,
    /// A `pulse_ms` pulse at every bar start of the timeline, `param` beats per bar (1–64).
    Reset,
}

/// One point of a calibration table: the DAC code measured to produce `microvolts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalPoint {
    /// Output voltage, in microvolts.
    pub microvolts: i32,
    /// The DAC code that produced it.
    pub code: i32,
}

/// Coordinator → MCU node: what CV output `channel` does from now on (protocol 1.2).
///
/// Fields a function does not use are ignored (send 0). An empty `calibration` means the
/// DAC's nominal line (code 0 = 0 V, full scale = the DAC's full-scale voltage).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CvAssign {
    /// CV output channel on the MCU node (0 … cv − 1).
    pub channel: u16,
    /// What the output does.
    pub function: CvFunction,
    /// Voice slot, for pitch, gate, trigger and velocity.
    pub voice: VoiceId,
    /// MIDI channel (0–15), for cc, aftertouch and pitch bend.
    pub midi_channel: u8,
    /// Controller number (cc), pulses per quarter note (clock), beats per bar (reset).
    pub param: u16,
    /// Low end of the output (gate low, value 0), in microvolts.
    pub min_uv: i32,
    /// High end of the output (gate high, value 127 / 16383), in microvolts.
    pub max_uv: i32,
    /// Pitch: the MIDI note that is 0 V.
    pub base_note: u8,
    /// Pitch: pitch-bend range in semitones (0–48).
    pub bend_semitones: u8,
    /// Pitch: portamento time from one note to the next, in ms (0 = jump).
    pub glide_ms: u16,
    /// Trigger, clock and reset: pulse length in ms (at least 1).
    pub pulse_ms: u16,
    /// Volts → code table, volts strictly increasing, at most [`MAX_CV_CAL_POINTS`] points.
    pub calibration: heapless::Vec<CalPoint, MAX_CV_CAL_POINTS>,
}

impl CvAssign {
    /// `channel` doing `function`, every parameter 0 and no calibration table.
    pub const fn new(channel: u16, function: CvFunction) -> Self {
        CvAssign {
            channel,
            function,
            voice: 0,
            midi_channel: 0,
            param: 0,
            min_uv: 0,
            max_uv: 0,
            base_note: 0,
            bend_semitones: 0,
            glide_ms: 0,
            pulse_ms: 0,
            calibration: heapless::Vec::new(),
        }
    }
}

/// Which MIDI controller a [`Control`] carries. On the wire: its snake_case name as a str.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ControlKind {
    /// Pitch bend, `value` 0–16383 (8192 = centre).
    PitchBend,
    /// Control change `number`, `value` 0–127.
    Cc,
    /// Channel aftertouch, `value` 0–127.
    Aftertouch,
}

/// Coordinator → MCU node: a MIDI controller changed, applies at `at` (protocol 1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// MIDI channel, 0–15.
    pub midi_channel: u8,
    /// Which controller.
    pub kind: ControlKind,
    /// Controller number (cc only).
    pub number: u8,
    /// New value (14-bit for pitch bend, 7-bit otherwise).
    pub value: u16,
    /// When it applies.
    pub at: ClusterTime,
}

/// Clock exchange of an MCU node (protocol 1.2): the node sends it with `origin` set to its
/// local clock and the other two fields 0; the coordinator answers with the same `origin`,
/// `receive` = its cluster time when the request arrived and `transmit` = when it answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeSync {
    /// The node's local clock at sending, in ns (echoed back unchanged).
    pub origin: u64,
    /// Coordinator's cluster time on receipt of the request (0 in a request).
    pub receive: ClusterTime,
    /// Coordinator's cluster time when sending the answer (0 in a request).
    pub transmit: ClusterTime,
}

/// Counters of a datagram receiver (see `datagram::ReplayWindow`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxCounters {
    /// Datagrams accepted.
    pub accepted: u32,
    /// Dropped: a sequence number seen before, inside the window.
    pub duplicates: u32,
    /// Dropped: older than the window (a replay or a very late datagram).
    pub replays: u32,
    /// Accepted although older than the newest seen (arrived out of order).
    pub reordered: u32,
    /// Sequence numbers skipped when a newer datagram arrived (lost, or still to come).
    pub gaps: u32,
    /// Dropped: not a valid datagram or frame.
    pub malformed: u32,
}

/// MCU node → coordinator: the DAC codes it drives and its health (protocol 1.2). Sent
/// whenever codes changed (at most once per poll) and with every heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CvReport {
    /// The node's cluster time when the report was made.
    pub now: ClusterTime,
    /// Current code of every channel, channel 0 first (0 on a channel whose DAC failed).
    pub codes: heapless::Vec<u16, MAX_CV_CHANNELS>,
    /// Cluster time at which each channel's current code was written.
    pub changed_at: heapless::Vec<ClusterTime, MAX_CV_CHANNELS>,
    /// Cluster time of the most recent code change on any channel.
    pub applied_at: ClusterTime,
    /// Bit `d` set: DAC `d` failed and its channels are at 0 V.
    pub dac_faults: u32,
    /// DAC writes issued since start (refreshes included).
    pub writes: u32,
    /// Writes skipped because the DAC already held the code.
    pub skipped_writes: u32,
    /// Writes or inits that failed since start.
    pub write_errors: u32,
    /// Events applied after their `at`, since start.
    pub late_events: u32,
    /// Gates dropped because a lease ran out, since start.
    pub lease_expiries: u32,
    /// Current estimate of the node's clock offset (cluster − servo model), ns.
    pub clock_offset_ns: i64,
    /// Whether the clock servo has locked.
    pub clock_locked: bool,
    /// Counters of the datagrams received from the coordinator.
    pub rx: RxCounters,
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
#[allow(
    clippy::large_enum_variant,
    reason = "no_std without alloc: nothing to box into; a Message is at most MAX_FRAME_LEN-sized"
)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`Status`].
    Status(Status),
    /// See [`VoiceOn`].
    VoiceOn(VoiceOn),
    /// See [`VoiceOff`].
    VoiceOff(VoiceOff),
    /// See [`VoiceParam`].
    VoiceParam(VoiceParam),
    /// See [`LeaseRenew`].
    LeaseRenew(LeaseRenew),
    /// Coordinator → node: the tempo timeline changed.
    Timeline(Timeline),
    /// See [`CvSet`].
    CvSet(CvSet),
    /// See [`Bye`].
    Bye(Bye),
    /// See [`ErrorMsg`].
    Error(ErrorMsg),
    /// See [`CvAssign`] (1.2).
    CvAssign(CvAssign),
    /// See [`Control`] (1.2).
    Control(Control),
    /// See [`TimeSync`] (1.2).
    TimeSync(TimeSync),
    /// See [`CvReport`] (1.2).
    CvReport(CvReport),
    /// See [`Onset`] (protocol 1.2).
    Onset(Onset),
}

impl Message {
    /// The variant's name, for logs and counters.
    pub const fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Heartbeat(_) => "heartbeat",
            Message::Status(_) => "status",
            Message::VoiceOn(_) => "voice_on",
            Message::VoiceOff(_) => "voice_off",
            Message::VoiceParam(_) => "voice_param",
            Message::LeaseRenew(_) => "lease_renew",
            Message::Timeline(_) => "timeline",
            Message::CvSet(_) => "cv_set",
            Message::Bye(_) => "bye",
            Message::Error(_) => "error",
            Message::CvAssign(_) => "cv_assign",
            Message::Control(_) => "control",
            Message::TimeSync(_) => "time_sync",
            Message::CvReport(_) => "cv_report",
            Message::Onset(_) => "onset",
        }
    }

    /// Builds a text field from `s`, cutting it at a character boundary to fit.
    pub fn text<const N: usize>(s: &str) -> heapless::String<N> {
        let mut out = heapless::String::new();
        for c in s.chars() {
            if out.push(c).is_err() {
                break;
            }
        }
        out
    }
}
