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

/// Node → coordinator: health and load.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
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
