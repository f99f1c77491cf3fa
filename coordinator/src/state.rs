//! State shared by the coordinator's tasks, and the snapshot served at `/api/cluster`.
//!
//! One mutex guards the allocator, the node registry and the counters. Every critical section
//! is short and never awaits: sessions get their messages through bounded channels, filled with
//! `try_send` under the lock, so a slow node cannot stall OSC input (a full queue is counted).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use voicemesh_node::clock::ClusterClock;
use voicemesh_protocol::{ClusterTime, Message, Role, Status};

use crate::allocator::{Action, VoiceAllocator};
use crate::cv::CvRouter;
use crate::osc::DropReason;
use crate::tempo::{TempoSnapshot, TempoState};

/// What a node without a `Status` yet is shown with.
pub(crate) const IDLE_STATUS: Status = Status {
    active_voices: 0,
    clock_offset_ns: 0,
    clock_locked: false,
    load_permille: 0,
    xruns: 0,
    late_events: 0,
    load_max_permille: 0,
    clock_state: voicemesh_protocol::ClockState::Unknown,
    clock_path_delay_ns: 0,
    clock_rate_ppb: 0,
    clock_jitter_ns: 0,
    clock_steps: 0,
};

/// Samples kept for the latency summary.
pub const LATENCY_SAMPLES: usize = 4096;
/// Depth of each session's outgoing queue.
pub const SESSION_QUEUE: usize = 1024;

/// A message on its way to a node, with the moment its OSC datagram arrived (for latency).
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub msg: Message,
    pub osc_rx: Option<Instant>,
    /// The moment the RTP-MIDI datagram that caused it arrived (for latency).
    pub midi_rx: Option<Instant>,
}

#[derive(Debug)]
pub(crate) struct NodeEntry {
    pub name: String,
    pub role: String,
    pub address: String,
    pub voices: u16,
    pub online: bool,
    pub status: Option<Status>,
    pub last_seen: Option<Instant>,
    pub error: Option<String>,
    /// The session currently serving this node: its generation and queue.
    pub session: Option<(u64, mpsc::Sender<Outgoing>)>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub osc_received: u64,
    pub osc_notes: u64,
    pub osc_dropped: BTreeMap<DropReason, u64>,
    pub decode_errors: u64,
    pub queue_full: u64,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub alloc: VoiceAllocator,
    pub cv: CvRouter,
    pub nodes: BTreeMap<String, NodeEntry>,
    pub counters: Counters,
    pub latency: VecDeque<u32>,
    /// RTP-MIDI datagram received → VoiceOn written, µs.
    pub latency_rtpmidi: VecDeque<u32>,
    pub next_generation: u64,
    /// The cluster timeline and transport (see [`crate::tempo`]).
    pub tempo: TempoState,
    /// MCU nodes' CV state and link counters, by node id (crate::mcu).
    pub mcus: BTreeMap<String, crate::mcu::McuView>,
    /// Recent voice starts reported by the nodes (onset spread).
    pub onsets: crate::onsets::OnsetLog,
    /// Rate limiter, timetag scheduler, subscribers and global parameters of OSC.
    pub osc: crate::osc::server::OscState,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub id: String,
    pub clock: Arc<ClusterClock>,
    pub lookahead: Duration,
    pub heartbeat: Duration,
    pub offline_after: Duration,
    pub lease: Duration,
    pub inner: Mutex<Inner>,
    /// Woken when a note-on may have moved the allocator's renewal deadline earlier.
    pub renew_wakeup: Notify,
    /// Woken on every local tempo or transport edit (see [`crate::tempo::TempoHandle`]).
    pub tempo_changed: Notify,
    /// Whether the Ableton Link peer should run (see [`crate::link::glue`]).
    pub link_enabled: tokio::sync::watch::Sender<bool>,
    /// The RTP-MIDI endpoint, when enabled.
    pub rtpmidi: std::sync::OnceLock<Arc<crate::rtpmidi::Handle>>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a panic elsewhere; the data is still consistent enough to
        // report, and the daemon aborts on panic in release builds anyway.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn now(&self) -> ClusterTime {
        self.clock.now()
    }
}

impl Inner {
    /// Whether `node` has a session to send to.
    pub fn connected(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.session.is_some())
    }

    /// Queues the allocator's (or the CV router's) actions on their sessions. `osc_rx` is
    /// stamped on VoiceOns.
    pub fn dispatch(&mut self, actions: Vec<Action>, osc_rx: Option<Instant>) {
        self.dispatch_stamped(actions, osc_rx, None);
    }

    /// [`dispatch`](Self::dispatch) for RTP-MIDI input: `midi_rx` is stamped on VoiceOns.
    pub fn dispatch_midi(&mut self, actions: Vec<Action>, midi_rx: Option<Instant>) {
        self.dispatch_stamped(actions, None, midi_rx);
    }

    /// The allocator's and the CV router's actions for one MIDI event at `now`.
    pub fn midi_actions(
        &mut self,
        now: ClusterTime,
        ev: crate::allocator::MidiEvent,
    ) -> Vec<Action> {
        let mut a: Vec<Action> = self
            .alloc
            .handle_midi(now, ev)
            .map(|(n, m)| (n.to_string(), m))
            .collect();
        let cv = self.cv.handle_midi(now, &ev);
        a.extend(cv.into_iter().filter(|(n, _)| self.connected(n)));
        a
    }

    fn dispatch_stamped(
        &mut self,
        actions: Vec<Action>,
        osc_rx: Option<Instant>,
        midi_rx: Option<Instant>,
    ) {
        // Global parameters set over OSC follow every VoiceOn, whichever input started it.
        let params = self.osc.voice_on_params(&actions);
        for (node, msg) in actions.into_iter().chain(params) {
            let on = matches!(msg, Message::VoiceOn(_));
            let (stamp, midi_stamp) = if on { (osc_rx, midi_rx) } else { (None, None) };
            let sent = self
                .nodes
                .get(&node)
                .and_then(|n| n.session.as_ref())
                .map(|(_, tx)| {
                    tx.try_send(Outgoing {
                        msg,
                        osc_rx: stamp,
                        midi_rx: midi_stamp,
                    })
                    .is_ok()
                });
            if sent != Some(true) {
                self.counters.queue_full += 1;
                tracing::warn!(node, "session queue full or gone; event dropped");
            }
        }
    }

    /// A node joined with `hello` over a session at `addr` whose queue is `tx`: it is (again)
    /// online, in the allocator's pool with its voices and engines. Returns the session's
    /// generation, which [`end_session`](Self::end_session) needs.
    pub fn join_node(
        &mut self,
        hello: &voicemesh_protocol::Hello,
        addr: std::net::SocketAddr,
        tx: mpsc::Sender<Outgoing>,
    ) -> u64 {
        self.next_generation += 1;
        let generation = self.next_generation;
        let id = hello.id.as_str();
        self.nodes.insert(
            id.to_owned(),
            NodeEntry {
                name: hello.name.to_string(),
                role: role_name(hello.role),
                address: addr.to_string(),
                voices: hello.voices,
                online: true,
                status: None,
                last_seen: Some(Instant::now()),
                error: None,
                session: Some((generation, tx)),
            },
        );
        self.alloc.add_node(id, hello.voices);
        let engines: Vec<&str> = hello.engines.iter().map(|e| e.as_str()).collect();
        self.alloc.set_node_engines(id, &engines);
        generation
    }

    /// A node's session `generation` ended: unless a newer session owns the node by now, its
    /// voices are re-spawned on the survivors at once and it is marked offline with `error`.
    pub fn end_session(
        &mut self,
        now: ClusterTime,
        node_id: &str,
        generation: u64,
        error: Option<String>,
    ) {
        let owns = self
            .nodes
            .get(node_id)
            .and_then(|n| n.session.as_ref())
            .is_some_and(|(gen_, _)| *gen_ == generation);
        if !owns {
            return;
        }
        let respawn = self.alloc.node_lost(now, node_id);
        self.dispatch(respawn, None);
        if let Some(n) = self.nodes.get_mut(node_id) {
            n.online = false;
            n.session = None;
            n.error = error;
        }
    }

    pub fn record_latency(&mut self, d: Duration) {
        push_sample(&mut self.latency, d);
    }

    pub fn record_midi_latency(&mut self, d: Duration) {
        push_sample(&mut self.latency_rtpmidi, d);
    }
}

fn push_sample(q: &mut VecDeque<u32>, d: Duration) {
    if q.len() == LATENCY_SAMPLES {
        q.pop_front();
    }
    q.push_back(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
}

impl Inner {
    fn latency_summary(q: &VecDeque<u32>) -> LatencySummary {
        let mut v: Vec<u32> = q.iter().copied().collect();
        v.sort_unstable();
        let pct = |p: usize| -> u32 {
            if v.is_empty() {
                0
            } else {
                v[((v.len() - 1) * p).div_ceil(100)]
            }
        };
        LatencySummary {
            count: v.len() as u64,
            p50: pct(50),
            p99: pct(99),
            max: v.last().copied().unwrap_or(0),
        }
    }
}

/// The coordinator itself, in a [`ClusterSnapshot`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorInfo {
    /// Coordinator id.
    pub id: String,
    /// Cluster time when the snapshot was taken, in nanoseconds (PTP/TAI timescale).
    pub cluster_time_ns: u64,
}

/// One node, in a [`ClusterSnapshot`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeSnapshot {
    /// Node id (from its Hello, or from its mDNS TXT record before a session).
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// `node` or `mcu`.
    pub role: String,
    /// Whether the node's session is up and it was heard from within `offline_after`.
    pub online: bool,
    /// `ip:port` of the node's control session.
    pub address: String,
    /// Voice slots the node offers.
    pub voices: u16,
    /// Voices the coordinator has assigned to this node right now.
    pub active_voices: u16,
    /// Voices the node reports sounding in its last `Status` (includes release tails).
    pub sounding_voices: u16,
    /// The node's last reported clock offset from the grandmaster, in nanoseconds.
    pub clock_offset_ns: i64,
    /// Whether the node reports its clock as locked.
    pub clock_locked: bool,
    /// The node's PTP slave, from its last `Status`.
    pub ptp: PtpSnapshot,
    /// Audio callback load, per mille of the block's time budget: mean over the node's last
    /// status period.
    pub load_mean_permille: u16,
    /// Largest single-block callback load over the node's last status period, per mille
    /// (0 from a protocol 1.0 node).
    pub load_max_permille: u16,
    /// Buffer under/overruns reported by the node.
    pub xruns: u32,
    /// Events the node played late.
    pub late_events: u32,
    /// Milliseconds since the coordinator last heard from the node, if ever.
    pub last_seen_ms: Option<u64>,
    /// Why the node is not usable (protocol mismatch, session error), if it is not.
    pub error: Option<String>,
    /// CV channels, DAC codes and datagram counters of an MCU node; `null` for Linux nodes.
    #[serde(default)]
    pub cv: Option<crate::mcu::McuSnapshot>,
}

/// A node's PTP slave, in a [`NodeSnapshot`] (protocol 1.2 fields of `Status`; `unknown` and
/// zeros from an older node or before its first `Status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtpSnapshot {
    /// Servo state: `unlocked`, `locking`, `locked`, `holdover` or `unknown`.
    pub state: String,
    /// Latest offset estimate from the grandmaster, ns (positive: the node is ahead).
    pub offset_ns: i64,
    /// Latest mean path delay to the grandmaster, ns.
    pub path_delay_ns: i64,
    /// Rate correction the node applies to its local clock, ppb.
    pub rate_ppb: i64,
    /// RMS of recent offset estimates, ns.
    pub jitter_ns: i64,
    /// Clock steps since the node started.
    pub steps: u32,
}

impl From<&Status> for PtpSnapshot {
    fn from(st: &Status) -> Self {
        PtpSnapshot {
            state: st.clock_state.as_str().to_string(),
            offset_ns: st.clock_offset_ns,
            path_delay_ns: st.clock_path_delay_ns,
            rate_ppb: st.clock_rate_ppb,
            jitter_ns: st.clock_jitter_ns,
            steps: st.clock_steps,
        }
    }
}

/// OSC counters, in a [`ClusterSnapshot`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OscSnapshot {
    /// Datagrams received.
    pub received: u64,
    /// Note messages accepted (on and off).
    pub notes: u64,
    /// Messages or datagrams dropped, by reason (see docs/osc.md).
    pub dropped: BTreeMap<String, u64>,
    /// Commands held for a future bundle timetag so far.
    pub scheduled: u64,
    /// Commands waiting for their timetag now.
    pub pending: u64,
    /// Commands that ran after their timetag (late bundles).
    pub late: u64,
    /// Controllers subscribed to state messages.
    pub subscribers: u64,
    /// OSC TCP connections accepted so far.
    pub tcp_connections: u64,
}

/// Summary of latency samples, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples in the window (at most 4096, the most recent).
    pub count: u64,
    /// Median.
    pub p50: u32,
    /// 99th percentile.
    pub p99: u32,
    /// Largest sample.
    pub max: u32,
}

/// Latency measurements, in a [`ClusterSnapshot`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySnapshot {
    /// From an OSC datagram received to its VoiceOn written to the node's stream.
    pub osc_to_session_us: LatencySummary,
    /// From an RTP-MIDI datagram received to its VoiceOn written to the node's stream.
    #[serde(default)]
    pub rtpmidi_to_session_us: LatencySummary,
}

/// Allocator and session counters, in a [`ClusterSnapshot`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoiceCounters {
    /// Voice slots across online nodes.
    pub capacity: u64,
    /// Voices assigned right now.
    pub active: u64,
    /// Voices stolen since start.
    pub stolen: u64,
    /// Note-ons dropped because no node offered a voice.
    pub no_voices: u64,
    /// Voices dropped because their node went offline.
    pub lost: u64,
    /// Events dropped because a session's queue was full or gone.
    pub queue_full: u64,
    /// Control-session frames that failed to decode.
    pub decode_errors: u64,
}

/// Everything `/api/cluster` reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterSnapshot {
    /// The coordinator.
    pub coordinator: CoordinatorInfo,
    /// Current tempo of the timeline.
    pub tempo_bpm: f64,
    /// Other Ableton Link peers in the coordinator's Link session (0 when Link is off).
    pub link_peers: u32,
    /// Tempo, transport, phase and Link state.
    pub tempo: TempoSnapshot,
    /// Lookahead stamped on every event, in milliseconds.
    pub lookahead_ms: u64,
    /// Known nodes, sorted by id.
    pub nodes: Vec<NodeSnapshot>,
    /// OSC input counters.
    pub osc: OscSnapshot,
    /// Latency measurements.
    pub latency: LatencySnapshot,
    /// Allocator and session counters.
    pub voices: VoiceCounters,
    /// Onset spread of the recent chords (docs/timing.md, "Measurement").
    #[serde(default)]
    pub onsets: crate::onsets::OnsetSummary,
    /// RTP-MIDI sessions and counters (`null` when RTP-MIDI is off).
    #[serde(default)]
    pub rtpmidi: Option<crate::rtpmidi::RtpMidiSnapshot>,
}

impl Shared {
    pub fn snapshot(&self) -> ClusterSnapshot {
        let now_local = Instant::now();
        let cluster_time = self.now();
        let rtpmidi = self.rtpmidi.get().map(|h| h.snapshot());
        let g = self.lock();
        let nodes = g
            .nodes
            .iter()
            .map(|(id, n)| {
                let st = n.status.unwrap_or(IDLE_STATUS);
                NodeSnapshot {
                    id: id.clone(),
                    name: n.name.clone(),
                    role: n.role.clone(),
                    online: n.online,
                    address: n.address.clone(),
                    voices: n.voices,
                    active_voices: u16::try_from(g.alloc.active_voices(id)).unwrap_or(u16::MAX),
                    clock_offset_ns: st.clock_offset_ns,
                    clock_locked: st.clock_locked,
                    ptp: PtpSnapshot::from(&st),
                    sounding_voices: st.active_voices,
                    load_mean_permille: st.load_permille,
                    load_max_permille: st.load_max_permille,
                    xruns: st.xruns,
                    late_events: st.late_events,
                    last_seen_ms: n
                        .last_seen
                        .map(|t| now_local.saturating_duration_since(t).as_millis() as u64),
                    error: n.error.clone(),
                    cv: g.mcus.get(id).map(crate::mcu::McuView::snapshot),
                }
            })
            .collect();
        let stats = g.alloc.stats();
        let tempo = TempoSnapshot::of(&g.tempo, cluster_time);
        ClusterSnapshot {
            coordinator: CoordinatorInfo {
                id: self.id.clone(),
                cluster_time_ns: cluster_time.as_nanos(),
            },
            tempo_bpm: tempo.tempo_bpm,
            link_peers: tempo.link.peers,
            tempo,
            lookahead_ms: self.lookahead.as_millis() as u64,
            nodes,
            osc: OscSnapshot {
                received: g.counters.osc_received,
                notes: g.counters.osc_notes,
                dropped: DropReason::ALL
                    .iter()
                    .map(|r| {
                        (
                            r.as_str().to_owned(),
                            g.counters.osc_dropped.get(r).copied().unwrap_or(0),
                        )
                    })
                    .collect(),
                scheduled: g.osc.scheduler.scheduled(),
                pending: g.osc.scheduler.pending() as u64,
                late: g.osc.scheduler.late(),
                subscribers: g.osc.subscribers() as u64,
                tcp_connections: g.osc.tcp_connections,
            },
            latency: LatencySnapshot {
                osc_to_session_us: Inner::latency_summary(&g.latency),
                rtpmidi_to_session_us: Inner::latency_summary(&g.latency_rtpmidi),
            },
            voices: VoiceCounters {
                capacity: g.alloc.capacity() as u64,
                active: g.alloc.total_active() as u64,
                stolen: stats.stolen,
                no_voices: stats.no_voices,
                lost: stats.lost,
                queue_full: g.counters.queue_full,
                decode_errors: g.counters.decode_errors,
            },
            onsets: g.onsets.summary(),
            rtpmidi,
        }
    }
}

/// Role name for the snapshot.
pub(crate) fn role_name(r: Role) -> String {
    r.as_str().to_owned()
}
