//! The voice allocator: which node plays which note, on which voice slot.
//!
//! A sans-IO core: it never reads a clock, a socket or a global RNG. Time comes in as a
//! [`ClusterTime`] value and everything it wants sent comes out as [`Action`]s, so the same code
//! runs under tokio, in a deterministic simulation and in property tests.
//!
//! Nodes join with a voice count and report their callback load and output latency; a
//! [`Policy`] picks the node for each new voice (round-robin, least-loaded, lowest-latency), and a
//! node whose load is above [`AllocatorConfig::overload_permille`] only gets a voice when no
//! other eligible node has a free one. When every eligible voice is busy a voice is stolen
//! ([`StealMode`]): its VoiceOff goes out at `at`, and the new VoiceOn on the same voice a
//! release fade later (`at + steal_fade_ns`), so the node fades the old note instead of clicking.
//!
//! MIDI input ([`VoiceAllocator::handle_midi`]) follows [`ChannelRoute`]s: per-channel node
//! groups, key-range splits, unison stacks (spanning nodes, detuned through
//! [`PARAM_PITCH_SEMITONES`]), mono routes with last/low/high note priority (legato: the held
//! voice is re-pitched through the same parameter), sustain and sostenuto pedals, channel pitch bend and
//! pressure to every voice of the channel, and MPE member channels whose bend, pressure and CC74
//! belong to the note on them. Every assignment carries a lease the glue renews through
//! [`VoiceAllocator::renewals`]; when a node is lost, [`VoiceAllocator::node_lost`] re-spawns its
//! voices on the survivors with their parameter state.
//!
//! The hot path does not allocate: actions go into a buffer owned by the allocator and are
//! handed out as a draining iterator, node ids are shared `Arc<str>`, free voices sit in
//! per-node queues and notes are found through a 16 × 128 table.
#![deny(clippy::disallowed_methods)]

pub mod bench;

use std::collections::VecDeque;
use std::sync::Arc;

use voicemesh_protocol::{
    ClusterTime, LeaseRenew, MAX_LEASE_BATCH, Message, VoiceId, VoiceOff, VoiceOn, VoiceParam,
};

/// Something the glue must send: `message` to the node named by the first field.
pub type Action = (String, Message);

/// An [`Action`] whose node id is shared, as the allocation-free [`VoiceAllocator::handle_midi`]
/// hands them out.
pub type NodeAction = (Arc<str>, Message);

/// Voice parameter common to every engine: pitch offset in semitones. The allocator sends the
/// sum of channel or MPE pitch bend (× the route's bend range), unison detune and, for a mono
/// legato line, the distance from the note the voice started with.
pub use voicemesh_node::engine::PARAM_PITCH_SEMITONES;
/// Voice parameter: pressure (channel, poly or MPE), 0.0 ..= 1.0.
pub const PARAM_PRESSURE: u16 = 0xFF01;
/// Voice parameter: timbre (CC74, MPE "slide"), 0.0 ..= 1.0.
pub const PARAM_TIMBRE: u16 = 0xFF02;

/// Most voices a unison stack may take per note.
pub const MAX_UNISON: usize = 8;

mod midi_event;
pub use midi_event::MidiEvent;

/// How a node is chosen for a new voice.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Rotate across nodes, so consecutive notes land on different nodes.
    #[default]
    RoundRobin,
    /// The node with the smallest share of busy voices (its reported load counts too).
    LeastLoaded,
    /// The node with the lowest reported output latency.
    LowestLatency,
}

/// Which voice is taken when every eligible voice is busy.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum StealMode {
    /// The voice allocated longest ago.
    #[default]
    Oldest,
    /// The voice with the lowest velocity, decayed by its age.
    Quietest,
    /// A voice already playing the same note number (else the oldest).
    SameNote,
}

/// Which held key a mono channel sounds.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum MonoPriority {
    /// The most recently pressed key.
    #[default]
    Last,
    /// The lowest held key.
    Low,
    /// The highest held key.
    High,
}

/// Routing of one MIDI channel (or one key range of it, for splits) to a group of nodes.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ChannelRoute {
    /// MIDI channel 0–15.
    pub channel: u8,
    /// Node ids this route may use; `None` = every node.
    pub nodes: Option<Vec<String>>,
    /// Voices per note (1–8); they may span nodes and are detuned symmetrically.
    pub unison: u8,
    /// Total unison detune spread in cents (voice k of n gets `spread * (k/(n-1) - 0.5)`).
    pub unison_detune_cents: f32,
    /// `Some` makes the route monophonic with this note priority (legato re-pitch).
    pub mono: Option<MonoPriority>,
    /// Engine the route's notes need (e.g. `"fm2"`); only nodes announcing it are used.
    /// `None` = any node.
    pub engine: Option<String>,
    /// Pitch bend range in semitones (2 is the MIDI default, 48 the MPE one).
    pub bend_range_semitones: f32,
    /// Inclusive key range the route answers; several routes of one channel form a split
    /// (the first matching route wins).
    pub key_range: (u8, u8),
    /// The channel is an MPE member channel: its pitch bend, channel pressure and CC74 (timbre)
    /// are per-note and go only to the voices of the note(s) on it.
    pub mpe: bool,
}

impl Default for ChannelRoute {
    fn default() -> Self {
        ChannelRoute {
            channel: 0,
            nodes: None,
            unison: 1,
            unison_detune_cents: 10.0,
            engine: None,
            bend_range_semitones: 2.0,
            mono: None,
            key_range: (0, 127),
            mpe: false,
        }
    }
}

/// Parameters of the allocator: timing, policy and channel routing.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AllocatorConfig {
    /// Added to `now` to stamp `at` on every event (0 = as soon as possible).
    pub lookahead_ns: u64,
    /// Length of a voice lease, counted from the event's `at` (or from the renewal).
    pub lease_ns: u64,
    /// How often held voices are renewed; must be well below `lease_ns`.
    pub renew_every_ns: u64,
    /// Node choice for new voices.
    pub policy: Policy,
    /// Voice stealing when every eligible voice is busy.
    pub steal: StealMode,
    /// Gap between a stolen voice's VoiceOff and the new VoiceOn on it (the release fade).
    pub steal_fade_ns: u64,
    /// A node reporting a callback load above this (per mille) only gets new voices when no
    /// other eligible node has a free one.
    pub overload_permille: u16,
    /// Channel routes; channels without a route use every node, poly, unison 1.
    pub routes: Vec<ChannelRoute>,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            lookahead_ns: 5_000_000,
            lease_ns: 1_000_000_000,
            renew_every_ns: 250_000_000,
            policy: Policy::RoundRobin,
            steal: StealMode::Oldest,
            steal_fade_ns: 3_000_000,
            overload_permille: 800,
            routes: Vec::new(),
        }
    }
}

/// Counters the allocator keeps, for the snapshot and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Voices assigned by note-ons.
    pub allocated: u64,
    /// Voices stolen because every eligible voice was busy.
    pub stolen: u64,
    /// Note-ons dropped because the route has no voices at all.
    pub no_voices: u64,
    /// Voices dropped because their node was lost or removed and no survivor had room.
    pub lost: u64,
    /// Voices of a lost node re-spawned on a survivor.
    pub respawned: u64,
    /// Input dropped as out of range (channel, note, data byte, bend).
    pub invalid: u64,
    /// Notes no route of their channel answers (outside every key range).
    pub unrouted: u64,
}

const FREE: u32 = u32::MAX;
const NO_MANAGER: u8 = u8::MAX;
/// Route index of notes started under routes since replaced.
const DETACHED: u32 = u32::MAX;

/// (node index, voice index).
type VoiceRef = (u16, u16);

#[derive(Clone, Copy, Debug)]
struct Slot {
    /// Instance index, or [`FREE`].
    inst: u32,
    serial: u64,
    started: ClusterTime,
    renew_at: ClusterTime,
    detune: f32,
    /// The note of the voice's VoiceOn (a legato line moves away from it).
    start_note: u8,
}

const FREE_SLOT: Slot = Slot {
    inst: FREE,
    serial: 0,
    started: ClusterTime(0),
    renew_at: ClusterTime(0),
    detune: 0.0,
    start_note: 0,
};

#[derive(Debug)]
struct Node {
    id: Arc<str>,
    alive: bool,
    slots: Vec<Slot>,
    /// Free voices, longest-free first (their release tails have had the most time).
    free: VecDeque<u16>,
    load_permille: u16,
    latency_ns: u64,
    /// Engines the node announced (empty = unknown, matches no engine-bound route).
    engines: Vec<String>,
}

impl Node {
    fn busy(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// One sounding note: a key (or a mono line) and the voices it holds.
#[derive(Clone, Debug, Default)]
struct Instance {
    live: bool,
    channel: u8,
    /// Key that started it (index into the note table; for mono, the line's current note).
    key: u8,
    /// Note the voices play.
    note: u8,
    velocity: u8,
    route: u32,
    mono: bool,
    key_down: bool,
    sost: bool,
    bend: f32,
    bend_range: f32,
    pressure: f32,
    timbre: Option<f32>,
    voices: heapless::Vec<VoiceRef, MAX_UNISON>,
}

#[derive(Clone, Copy, Debug, Default)]
struct ChannelState {
    sustain: bool,
    sostenuto: bool,
    bend: f32,
    pressure: f32,
    timbre: Option<f32>,
    program: u8,
}

#[derive(Debug)]
struct RouteState {
    cfg: ChannelRoute,
    /// Per node index: may this route use the node.
    eligible: Vec<bool>,
    /// Mono routes: held keys in press order.
    keys: Vec<u8>,
    /// Mono routes: the line's instance, or [`FREE`].
    mono_inst: u32,
}

impl RouteState {
    fn new(cfg: ChannelRoute) -> Self {
        RouteState {
            cfg,
            eligible: Vec::new(),
            keys: Vec::with_capacity(128),
            mono_inst: FREE,
        }
    }

    fn mono_target(&self) -> Option<u8> {
        match self.cfg.mono? {
            MonoPriority::Last => self.keys.last().copied(),
            MonoPriority::Low => self.keys.iter().copied().min(),
            MonoPriority::High => self.keys.iter().copied().max(),
        }
    }
}

/// Assigns notes to voices across nodes.
///
/// Call order (the glue does this; nothing here reads a clock):
/// 1. [`add_node`](Self::add_node) when a node's session is welcomed, with its voice count;
///    [`set_node_load`](Self::set_node_load) / [`set_node_latency`](Self::set_node_latency)
///    whenever it reports a status; [`node_lost`](Self::node_lost) when it goes offline or away,
///    sending the returned re-spawn actions at once.
/// 2. [`handle_midi`](Self::handle_midi) (or [`note_on`](Self::note_on) /
///    [`note_off`](Self::note_off) / [`panic`](Self::panic) for OSC) for every input event, with
///    `now` = the current cluster time; send the returned actions in order before the next call.
/// 3. Call [`renewals`](Self::renewals) at or after the time [`poll_timeout`](Self::poll_timeout)
///    returns (and again whenever a note-on may have moved it earlier), and send the returned
///    lease renewals.
///
/// Configuration setters ([`set_policy`](Self::set_policy), [`set_routes`](Self::set_routes), …)
/// may be called at any time between events.
#[derive(Debug)]
pub struct VoiceAllocator {
    cfg: AllocatorConfig,
    nodes: Vec<Node>,
    routes: Vec<RouteState>,
    /// Per channel: indices into `routes`, in order.
    chan_routes: [Vec<u16>; 16],
    /// Per channel: its MPE zone's manager channel (0 or 15), or [`NO_MANAGER`].
    manager: [u8; 16],
    channels: [ChannelState; 16],
    /// 16 × 128: poly instance index of (channel, key), or [`FREE`].
    note_map: Vec<u32>,
    insts: Vec<Instance>,
    free_insts: Vec<u32>,
    /// Index into `nodes` where the next round-robin search starts.
    next_start: usize,
    serial: u64,
    /// Voices in allocation order (serial, voice), for stealing the oldest without a scan.
    /// Entries whose slot has moved on are stale and skipped; the queue is compacted when it
    /// outgrows the cluster.
    order: VecDeque<(u64, VoiceRef)>,
    /// Length at which `order` is compacted: four times the cluster's voices.
    order_limit: usize,
    stats: AllocatorStats,
    out: Vec<NodeAction>,
}

impl VoiceAllocator {
    /// An allocator with no nodes.
    pub fn new(cfg: AllocatorConfig) -> Self {
        let mut a = VoiceAllocator {
            cfg,
            nodes: Vec::new(),
            routes: Vec::new(),
            chan_routes: Default::default(),
            manager: [NO_MANAGER; 16],
            channels: [ChannelState::default(); 16],
            note_map: vec![FREE; 16 * 128],
            insts: Vec::new(),
            free_insts: Vec::new(),
            next_start: 0,
            serial: 0,
            order: VecDeque::new(),
            order_limit: 64,
            stats: AllocatorStats::default(),
            out: Vec::with_capacity(64),
        };
        a.rebuild_routes();
        a
    }

    /// The configuration in force.
    pub fn config(&self) -> &AllocatorConfig {
        &self.cfg
    }

    /// Changes the node-choice policy; applies to the next note-on.
    pub fn set_policy(&mut self, policy: Policy) {
        self.cfg.policy = policy;
    }

    /// Changes the steal mode; applies to the next steal.
    pub fn set_steal(&mut self, steal: StealMode) {
        self.cfg.steal = steal;
    }

    /// Replaces the channel routes; sounding notes keep their voices and are released by their
    /// key (or pedal) as before, but new notes follow the new routes.
    pub fn set_routes(&mut self, routes: Vec<ChannelRoute>) {
        self.cfg.routes = routes;
        let old = core::mem::take(&mut self.routes);
        self.rebuild_routes();
        // A route that is still there unchanged keeps its notes and its mono line; the others'
        // notes are detached: they keep sounding until their key (or pedal) releases them, and
        // a detached mono line ends with the key of its current pitch.
        let mut map = vec![DETACHED; old.len()];
        let mut taken = vec![false; self.routes.len()];
        for (o, old_r) in old.into_iter().enumerate() {
            let same =
                (0..self.routes.len()).find(|&n| !taken[n] && self.routes[n].cfg == old_r.cfg);
            if let Some(n) = same {
                taken[n] = true;
                map[o] = n as u32;
                self.routes[n].keys = old_r.keys;
                self.routes[n].mono_inst = old_r.mono_inst;
            } else if old_r.mono_inst != FREE {
                let i = &mut self.insts[old_r.mono_inst as usize];
                i.key_down = old_r.keys.contains(&i.note);
            }
        }
        for inst in &mut self.insts {
            inst.route = map.get(inst.route as usize).copied().unwrap_or(DETACHED);
        }
    }

    fn rebuild_routes(&mut self) {
        self.routes.clear();
        for c in &mut self.chan_routes {
            c.clear();
        }
        for r in &self.cfg.routes {
            if r.channel >= 16 || self.routes.len() >= usize::from(u16::MAX) {
                continue;
            }
            let mut r = r.clone();
            r.unison = r.unison.clamp(1, MAX_UNISON as u8);
            r.key_range = (r.key_range.0.min(127), r.key_range.1.min(127));
            self.chan_routes[usize::from(r.channel)].push(self.routes.len() as u16);
            self.routes.push(RouteState::new(r));
        }
        for c in 0..16u8 {
            if self.chan_routes[usize::from(c)].is_empty() {
                self.chan_routes[usize::from(c)].push(self.routes.len() as u16);
                self.routes.push(RouteState::new(ChannelRoute {
                    channel: c,
                    ..ChannelRoute::default()
                }));
            }
        }
        // MPE zones: the lower zone's members are the MPE channels 1, 2, … up to the first
        // channel that is not, managed by channel 0; the upper zone's run down from 14,
        // managed by 15.
        let mpe = |c: usize, routes: &[RouteState], chan: &[Vec<u16>; 16]| {
            chan[c].iter().any(|&r| routes[usize::from(r)].cfg.mpe)
        };
        self.manager = [NO_MANAGER; 16];
        for c in 1..15 {
            if !mpe(c, &self.routes, &self.chan_routes) {
                break;
            }
            self.manager[c] = 0;
        }
        for c in (1..15).rev() {
            if !mpe(c, &self.routes, &self.chan_routes) || self.manager[c] != NO_MANAGER {
                break;
            }
            self.manager[c] = 15;
        }
        self.rebuild_eligibility();
    }

    /// Channels a message on `channel` acts on: itself, plus its zone's members if it is an
    /// MPE manager channel.
    fn scope(&self, channel: u8) -> u16 {
        let mut mask = 1u16 << channel;
        for (c, &m) in self.manager.iter().enumerate() {
            if m == channel {
                mask |= 1 << c;
            }
        }
        mask
    }

    /// The pedals holding notes of `channel`: its own, or its MPE manager's.
    fn pedals(&self, channel: u8) -> ChannelState {
        let mut ch = self.channels[usize::from(channel)];
        if let Some(m) = self
            .channels
            .get(usize::from(self.manager[usize::from(channel)]))
        {
            ch.sustain |= m.sustain;
            ch.sostenuto |= m.sostenuto;
        }
        ch
    }

    /// The pitch offset in semitones the MPE manager's bend adds to notes of `channel`.
    fn zone_offset(&self, channel: u8) -> f32 {
        let m = self.manager[usize::from(channel) & 15];
        if m == NO_MANAGER {
            return 0.0;
        }
        let range = self.chan_routes[usize::from(m)].first().map_or(2.0, |&r| {
            self.routes[usize::from(r)].cfg.bend_range_semitones
        });
        self.channels[usize::from(m)].bend * range
    }

    fn rebuild_eligibility(&mut self) {
        for r in &mut self.routes {
            r.eligible.clear();
            for n in &self.nodes {
                let ok = r
                    .cfg
                    .nodes
                    .as_ref()
                    .is_none_or(|g| g.iter().any(|id| **id == *n.id))
                    && r.cfg.engine.as_ref().is_none_or(|e| n.engines.contains(e));
                r.eligible.push(ok);
            }
        }
    }

    /// Counters since creation.
    pub fn stats(&self) -> AllocatorStats {
        self.stats
    }

    /// Adds a node with `voices` voice slots, or puts a returning node back in the pool. A node
    /// already present and online is replaced: its held voices are dropped (no messages, no
    /// re-spawn) and their number returned.
    pub fn add_node(&mut self, id: &str, voices: u16) -> usize {
        let ni = match self.nodes.iter().position(|n| &*n.id == id) {
            Some(ni) => ni,
            None => {
                self.nodes.push(Node {
                    id: Arc::from(id),
                    alive: false,
                    slots: Vec::new(),
                    free: VecDeque::new(),
                    load_permille: 0,
                    latency_ns: 0,
                    engines: Vec::new(),
                });
                self.rebuild_eligibility();
                self.nodes.len() - 1
            }
        };
        let dropped = self.drop_node_voices(ni);
        let node = &mut self.nodes[ni];
        node.alive = true;
        node.slots = vec![FREE_SLOT; usize::from(voices)];
        node.free = (0..voices).collect();
        node.load_permille = 0;
        self.order_limit = 4 * self.capacity() + 64;
        dropped
    }

    /// Frees every voice of node `ni` without messages; returns how many were held.
    fn drop_node_voices(&mut self, ni: usize) -> usize {
        let mut held = 0;
        for vi in 0..self.nodes[ni].slots.len() {
            let inst = self.nodes[ni].slots[vi].inst;
            if inst == FREE {
                continue;
            }
            held += 1;
            self.detach_voice(inst, (ni as u16, vi as u16));
        }
        let node = &mut self.nodes[ni];
        node.slots.iter_mut().for_each(|s| *s = FREE_SLOT);
        node.free = (0..node.slots.len() as u16).collect();
        self.stats.lost += held as u64;
        held
    }

    /// Removes `v` from instance `inst`; an instance left without voices ends.
    fn detach_voice(&mut self, inst: u32, v: VoiceRef) {
        let i = &mut self.insts[inst as usize];
        if let Some(p) = i.voices.iter().position(|x| *x == v) {
            i.voices.swap_remove(p);
        }
        if i.voices.is_empty() {
            self.end_instance(inst);
        }
    }

    fn end_instance(&mut self, inst: u32) {
        let i = &mut self.insts[inst as usize];
        if !i.live {
            return;
        }
        i.live = false;
        let cell = usize::from(i.channel) * 128 + usize::from(i.key);
        if !i.mono && self.note_map[cell] == inst {
            self.note_map[cell] = FREE;
        }
        if i.mono
            && let Some(r) = self.routes.get_mut(i.route as usize)
            && r.mono_inst == inst
        {
            r.mono_inst = FREE;
        }
        self.free_insts.push(inst);
    }

    /// Sets the engines a node announced in its `Hello`; routes bound to an engine
    /// ([`ChannelRoute::engine`]) only use nodes that have it.
    pub fn set_node_engines(&mut self, id: &str, engines: &[&str]) {
        if let Some(n) = self.nodes.iter_mut().find(|n| &*n.id == id) {
            n.engines = engines.iter().map(|e| (*e).to_owned()).collect();
            self.rebuild_eligibility();
        }
    }

    /// Sets the callback load a node reported, in per mille (1000 = the whole period).
    pub fn set_node_load(&mut self, id: &str, load_permille: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| &*n.id == id) {
            n.load_permille = load_permille;
        }
    }

    /// Sets a node's latency in nanoseconds, the figure the lowest-latency policy ranks by (the
    /// session glue passes the control session's QUIC round-trip time).
    pub fn set_node_latency(&mut self, id: &str, latency_ns: u64) {
        if let Some(n) = self.nodes.iter_mut().find(|n| &*n.id == id) {
            n.latency_ns = latency_ns;
        }
    }

    /// Removes a node from the pool (offline, gone) and re-spawns the voices it held — sounding
    /// or sustained — on surviving eligible nodes at `now + lookahead`, with their velocity,
    /// pitch bend, pressure, timbre and detune. No message goes to the lost node: it is
    /// unreachable and releases its voices itself when their leases run out. Voices no survivor
    /// has room for are dropped (counted in [`AllocatorStats::lost`]); re-spawning never steals.
    #[must_use]
    pub fn node_lost(&mut self, now: ClusterTime, id: &str) -> Vec<Action> {
        self.out.clear();
        let Some(ni) = self.nodes.iter().position(|n| &*n.id == id && n.alive) else {
            return Vec::new();
        };
        self.nodes[ni].alive = false;
        let at = self.at(now);
        for vi in 0..self.nodes[ni].slots.len() {
            let slot = self.nodes[ni].slots[vi];
            if slot.inst == FREE {
                continue;
            }
            self.nodes[ni].slots[vi] = FREE_SLOT;
            let inst = slot.inst;
            let i = &mut self.insts[inst as usize];
            if let Some(p) = i.voices.iter().position(|x| *x == (ni as u16, vi as u16)) {
                i.voices.swap_remove(p);
            }
            // A note whose route was replaced re-spawns where the current route of its key
            // allows; with no such route it is not re-spawned.
            let (route, channel, key) = (i.route, i.channel, i.key);
            let route = match route {
                DETACHED => self.route_for(channel, key),
                r => Some(r),
            };
            match route.and_then(|r| self.pick_free(r)) {
                Some(nj) => {
                    self.stats.respawned += 1;
                    self.start_voice(now, at, inst, nj, slot.detune, true);
                }
                None => {
                    self.stats.lost += 1;
                    if self.insts[inst as usize].voices.is_empty() {
                        self.end_instance(inst);
                    }
                }
            }
        }
        self.nodes[ni].slots.clear();
        self.nodes[ni].free.clear();
        self.order_limit = 4 * self.capacity() + 64;
        if self.next_start >= self.nodes.len() {
            self.next_start = 0;
        }
        self.take_out()
    }

    /// Whether a node of this id is in the pool.
    pub fn has_node(&self, id: &str) -> bool {
        self.nodes.iter().any(|n| &*n.id == id && n.alive)
    }

    /// Voices in use on node `id` (0 for an unknown or lost node).
    pub fn active_voices(&self, id: &str) -> usize {
        self.nodes
            .iter()
            .find(|n| &*n.id == id && n.alive)
            .map_or(0, Node::busy)
    }

    /// Voices in use across the cluster.
    pub fn total_active(&self) -> usize {
        self.nodes.iter().filter(|n| n.alive).map(Node::busy).sum()
    }

    /// Voice slots across the cluster.
    pub fn capacity(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.slots.len())
            .sum()
    }

    /// Which (node, voice) plays `note` on `channel` (the first of a unison stack), if any.
    pub fn voice_of(&self, note: u8, channel: u8) -> Option<(&str, VoiceId)> {
        self.voices_of(note, channel).into_iter().next()
    }

    /// Every (node, voice) that plays `note` on `channel`.
    pub fn voices_of(&self, note: u8, channel: u8) -> Vec<(&str, VoiceId)> {
        self.held_voices()
            .filter(|h| h.note == note && h.channel == channel)
            .map(|h| (h.node, h.voice))
            .collect()
    }

    /// Every held voice, for inspection and tests.
    pub fn held_voices(&self) -> impl Iterator<Item = HeldVoice<'_>> {
        self.nodes.iter().filter(|n| n.alive).flat_map(move |n| {
            n.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.inst != FREE)
                .map(move |(vi, s)| {
                    let i = &self.insts[s.inst as usize];
                    HeldVoice {
                        node: &n.id,
                        voice: vi as VoiceId,
                        channel: i.channel,
                        note: i.note,
                        velocity: i.velocity,
                        started: s.started,
                    }
                })
        })
    }

    fn take_out(&mut self) -> Vec<Action> {
        self.out
            .drain(..)
            .map(|(n, m)| (n.to_string(), m))
            .collect()
    }

    fn at(&self, now: ClusterTime) -> ClusterTime {
        ClusterTime(now.0.saturating_add(self.cfg.lookahead_ns))
    }
}

/// A held voice as [`VoiceAllocator::held_voices`] reports it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeldVoice<'a> {
    /// Node id.
    pub node: &'a str,
    /// Voice slot on the node.
    pub voice: VoiceId,
    /// MIDI channel.
    pub channel: u8,
    /// Note the voice plays.
    pub note: u8,
    /// Velocity it started with.
    pub velocity: u8,
    /// Cluster time of its VoiceOn.
    pub started: ClusterTime,
}

impl VoiceAllocator {
    fn route_allows(&self, route: u32, ni: usize) -> bool {
        self.routes
            .get(route as usize)
            .is_none_or(|r| r.eligible.get(ni).copied().unwrap_or(false))
    }

    /// A node with a free voice for `route`, by policy; overloaded nodes only as a last resort.
    fn pick_free(&mut self, route: u32) -> Option<usize> {
        let n = self.nodes.len();
        let limit = self.cfg.overload_permille;
        for pass in 0..2 {
            let ok = |a: &Self, ni: usize| {
                let node = &a.nodes[ni];
                node.alive
                    && !node.free.is_empty()
                    && ((node.load_permille > limit) == (pass == 1))
                    && a.route_allows(route, ni)
            };
            let found = match self.cfg.policy {
                Policy::RoundRobin => (0..n)
                    .map(|k| (self.next_start + k) % n)
                    .find(|&ni| ok(self, ni)),
                Policy::LeastLoaded => (0..n)
                    .filter(|&ni| ok(self, ni))
                    .min_by_key(|&ni| (load_score(&self.nodes[ni]), ni)),
                Policy::LowestLatency => (0..n).filter(|&ni| ok(self, ni)).min_by_key(|&ni| {
                    let node = &self.nodes[ni];
                    (node.latency_ns, load_score(node), ni)
                }),
            };
            if let Some(ni) = found {
                self.next_start = (ni + 1) % n;
                return Some(ni);
            }
        }
        None
    }

    /// The voice to steal for `route`, never one of instance `keep`.
    fn live_entry(&self, serial: u64, v: VoiceRef) -> Option<&Slot> {
        let node = &self.nodes[usize::from(v.0)];
        node.slots
            .get(usize::from(v.1))
            .filter(|s| node.alive && s.inst != FREE && s.serial == serial)
    }

    /// The oldest eligible voice, from the allocation-order queue.
    fn oldest_victim(&mut self, route: u32, keep: u32) -> Option<VoiceRef> {
        while let Some(&(serial, v)) = self.order.front() {
            if self.live_entry(serial, v).is_some() {
                break;
            }
            self.order.pop_front();
        }
        self.order.iter().find_map(|&(serial, v)| {
            let s = self.live_entry(serial, v)?;
            (s.inst != keep && self.route_allows(route, usize::from(v.0))).then_some(v)
        })
    }

    fn pick_victim(
        &mut self,
        now: ClusterTime,
        route: u32,
        keep: u32,
        note: u8,
    ) -> Option<VoiceRef> {
        if self.cfg.steal == StealMode::Oldest {
            return self.oldest_victim(route, keep);
        }
        let mut best: Option<(u64, VoiceRef)> = None;
        for (ni, node) in self.nodes.iter().enumerate() {
            if !node.alive || !self.route_allows(route, ni) {
                continue;
            }
            for (vi, s) in node.slots.iter().enumerate() {
                if s.inst == FREE || s.inst == keep {
                    continue;
                }
                let inst = &self.insts[s.inst as usize];
                // Lower score = better victim.
                let score = match self.cfg.steal {
                    StealMode::Oldest => s.serial,
                    StealMode::Quietest => quiet_score(inst.velocity, now, s.started),
                    StealMode::SameNote => {
                        (u64::from(inst.note != note) << 63) | (s.serial & (u64::MAX >> 1))
                    }
                };
                if best.is_none_or(|(b, _)| score < b) {
                    best = Some((score, (ni as u16, vi as u16)));
                }
            }
        }
        best.map(|(_, v)| v)
    }

    /// Puts a VoiceOn (and the voice's parameter state) for instance `inst` on a free voice of
    /// node `ni`, starting at `at`.
    fn start_voice(
        &mut self,
        now: ClusterTime,
        at: ClusterTime,
        inst: u32,
        ni: usize,
        detune: f32,
        with_state: bool,
    ) {
        let Some(vi) = self.nodes[ni].free.pop_front() else {
            return;
        };
        self.place_voice(now, at, inst, (ni as u16, vi), detune, with_state);
    }

    fn place_voice(
        &mut self,
        now: ClusterTime,
        at: ClusterTime,
        inst: u32,
        v: VoiceRef,
        detune: f32,
        with_state: bool,
    ) {
        let (ni, vi) = (usize::from(v.0), v.1);
        let zone = self.zone_offset(self.insts[inst as usize].channel);
        self.serial += 1;
        if self.order.len() >= self.order_limit {
            let mut order = core::mem::take(&mut self.order);
            order.retain(|&(serial, v)| self.live_entry(serial, v).is_some());
            self.order = order;
        }
        self.order.push_back((self.serial, v));
        self.nodes[ni].slots[usize::from(vi)] = Slot {
            inst,
            serial: self.serial,
            started: at,
            renew_at: ClusterTime(now.0.saturating_add(self.cfg.renew_every_ns)),
            detune,
            start_note: self.insts[inst as usize].note,
        };
        let i = &mut self.insts[inst as usize];
        // Capacity: a stack never holds more than its unison count (≤ MAX_UNISON).
        let _ = i.voices.push(v);
        let id = self.nodes[ni].id.clone();
        self.out.push((
            id.clone(),
            Message::VoiceOn(VoiceOn {
                voice: vi,
                note: i.note,
                velocity: i.velocity,
                channel: i.channel,
                at,
                lease_until: ClusterTime(at.0.saturating_add(self.cfg.lease_ns)),
            }),
        ));
        let mut param = |param: u16, value: f32| {
            self.out.push((
                id.clone(),
                Message::VoiceParam(VoiceParam {
                    voice: vi,
                    param,
                    value,
                    at,
                }),
            ));
        };
        let pitch = i.bend * i.bend_range + detune / 100.0 + zone;
        if pitch != 0.0 {
            param(PARAM_PITCH_SEMITONES, pitch);
        }
        if with_state {
            if i.pressure != 0.0 {
                param(PARAM_PRESSURE, i.pressure);
            }
            if let Some(t) = i.timbre {
                param(PARAM_TIMBRE, t);
            }
        }
    }

    fn new_instance(&mut self, channel: u8, key: u8, velocity: u8, route: u32, mono: bool) -> u32 {
        let ch = self.channels[usize::from(channel)];
        let inst = Instance {
            live: true,
            channel,
            key,
            note: key,
            velocity,
            route,
            mono,
            key_down: true,
            sost: false,
            bend: ch.bend,
            bend_range: self
                .routes
                .get(route as usize)
                .map_or(2.0, |r| r.cfg.bend_range_semitones),
            pressure: ch.pressure,
            timbre: ch.timbre,
            voices: heapless::Vec::new(),
        };
        match self.free_insts.pop() {
            Some(i) => {
                self.insts[i as usize] = inst;
                i
            }
            None => {
                self.insts.push(inst);
                (self.insts.len() - 1) as u32
            }
        }
    }

    /// Allocates the voices of a fresh instance (unison stack), stealing when needed.
    fn sound_instance(&mut self, now: ClusterTime, inst: u32) {
        let at = self.at(now);
        let route = self.insts[inst as usize].route;
        let (unison, spread) = self.routes.get(route as usize).map_or((1, 0.0), |r| {
            (usize::from(r.cfg.unison), r.cfg.unison_detune_cents)
        });
        let note = self.insts[inst as usize].note;
        for k in 0..unison {
            let detune = if unison > 1 {
                spread * (k as f32 / (unison - 1) as f32 - 0.5)
            } else {
                0.0
            };
            if let Some(ni) = self.pick_free(route) {
                self.stats.allocated += 1;
                self.start_voice(now, at, inst, ni, detune, true);
                continue;
            }
            let Some(v) = self.pick_victim(now, route, inst, note) else {
                break;
            };
            let victim = self.nodes[usize::from(v.0)].slots[usize::from(v.1)].inst;
            self.out.push((
                self.nodes[usize::from(v.0)].id.clone(),
                Message::VoiceOff(VoiceOff { voice: v.1, at }),
            ));
            self.nodes[usize::from(v.0)].slots[usize::from(v.1)] = FREE_SLOT;
            self.detach_voice(victim, v);
            self.stats.stolen += 1;
            self.stats.allocated += 1;
            let later = ClusterTime(at.0.saturating_add(self.cfg.steal_fade_ns));
            self.place_voice(now, later, inst, v, detune, true);
        }
        if self.insts[inst as usize].voices.is_empty() {
            self.stats.no_voices += 1;
            self.end_instance(inst);
        }
    }

    /// Sends VoiceOffs for every voice of `inst` and ends it.
    fn release_instance(&mut self, inst: u32, now: ClusterTime) {
        let at = self.at(now);
        let voices = core::mem::take(&mut self.insts[inst as usize].voices);
        for &(ni, vi) in &voices {
            let node = &mut self.nodes[usize::from(ni)];
            node.slots[usize::from(vi)] = FREE_SLOT;
            node.free.push_back(vi);
            self.out.push((
                node.id.clone(),
                Message::VoiceOff(VoiceOff { voice: vi, at }),
            ));
        }
        self.end_instance(inst);
    }

    fn route_for(&self, channel: u8, note: u8) -> Option<u32> {
        self.chan_routes[usize::from(channel)]
            .iter()
            .copied()
            .find(|&r| {
                let (lo, hi) = self.routes[usize::from(r)].cfg.key_range;
                (lo..=hi).contains(&note)
            })
            .map(u32::from)
    }

    /// Handles one MIDI event at cluster time `now`; the returned actions must be sent, in
    /// order, before the next call. Out-of-range input is dropped and counted
    /// ([`AllocatorStats::invalid`]).
    #[must_use = "the actions must be sent"]
    pub fn handle_midi(
        &mut self,
        now: ClusterTime,
        ev: MidiEvent,
    ) -> std::vec::Drain<'_, NodeAction> {
        self.out.clear();
        if valid(&ev) {
            self.midi(now, ev);
        } else {
            self.stats.invalid += 1;
        }
        self.out.drain(..)
    }

    fn midi(&mut self, now: ClusterTime, ev: MidiEvent) {
        match ev {
            MidiEvent::NoteOn {
                channel,
                note,
                velocity: 0,
            }
            | MidiEvent::NoteOff { channel, note, .. } => self.key_up(now, channel, note),
            MidiEvent::NoteOn {
                channel,
                note,
                velocity,
            } => self.key_down(now, channel, note, velocity),
            MidiEvent::ControlChange {
                channel,
                controller,
                value,
            } => self.control(now, channel, controller, value),
            MidiEvent::PitchBend { channel, value } => {
                let v = f32::from(value) / 8192.0;
                self.channels[usize::from(channel)].bend = v;
                let at = self.at(now);
                let scope = self.scope(channel);
                let mut zones = [0.0; 16];
                for (c, z) in zones.iter_mut().enumerate() {
                    *z = self.zone_offset(c as u8);
                }
                for i in &mut self.insts {
                    if i.live && scope & (1 << i.channel) != 0 {
                        // On a manager channel, the bend moves the whole zone.
                        if i.channel == channel {
                            i.bend = v;
                        }
                        let zone = zones[usize::from(i.channel)];
                        emit_pitch(&mut self.out, &self.nodes, i, zone, at);
                    }
                }
            }
            MidiEvent::ChannelPressure { channel, value } => {
                let v = f32::from(value) / 127.0;
                self.channels[usize::from(channel)].pressure = v;
                self.channel_param(now, channel, PARAM_PRESSURE, v, |i| &mut i.pressure);
            }
            MidiEvent::PolyPressure {
                channel,
                note,
                value,
            } => {
                let v = f32::from(value) / 127.0;
                let at = self.at(now);
                for ii in 0..self.insts.len() {
                    let i = &mut self.insts[ii];
                    if i.live && i.channel == channel && i.note == note {
                        i.pressure = v;
                        emit_params(&mut self.out, &self.nodes, i, PARAM_PRESSURE, v, at);
                    }
                }
            }
            MidiEvent::ProgramChange { channel, program } => {
                self.channels[usize::from(channel)].program = program;
            }
        }
    }

    /// Sends `param = v` to every voice of `channel` and records it on their notes.
    fn channel_param(
        &mut self,
        now: ClusterTime,
        channel: u8,
        param: u16,
        v: f32,
        field: fn(&mut Instance) -> &mut f32,
    ) {
        let at = self.at(now);
        let scope = self.scope(channel);
        for i in &mut self.insts {
            if i.live && scope & (1 << i.channel) != 0 {
                *field(i) = v;
                emit_params(&mut self.out, &self.nodes, i, param, v, at);
            }
        }
    }

    fn control(&mut self, now: ClusterTime, channel: u8, controller: u8, value: u8) {
        let c = usize::from(channel);
        let down = value >= 64;
        match controller {
            64 => {
                let was = self.channels[c].sustain;
                self.channels[c].sustain = down;
                if was && !down {
                    self.release_unheld(now, channel);
                }
            }
            66 => {
                let was = self.channels[c].sostenuto;
                self.channels[c].sostenuto = down;
                let scope = self.scope(channel);
                if !was && down {
                    for i in &mut self.insts {
                        if i.live && scope & (1 << i.channel) != 0 && i.key_down {
                            i.sost = true;
                        }
                    }
                } else if was && !down {
                    for ii in 0..self.insts.len() {
                        let c = self.insts[ii].channel;
                        // A member's latch lasts while its own or its manager's pedal is down.
                        if self.insts[ii].live && scope & (1 << c) != 0 && !self.pedals(c).sostenuto
                        {
                            self.insts[ii].sost = false;
                        }
                    }
                    self.release_unheld(now, channel);
                }
            }
            74 => {
                let v = f32::from(value) / 127.0;
                self.channels[c].timbre = Some(v);
                let at = self.at(now);
                let scope = self.scope(channel);
                for i in &mut self.insts {
                    if i.live && scope & (1 << i.channel) != 0 {
                        i.timbre = Some(v);
                        emit_params(&mut self.out, &self.nodes, i, PARAM_TIMBRE, v, at);
                    }
                }
            }
            120 | 123 => {
                for r in 0..self.routes.len() {
                    if self.routes[r].cfg.channel == channel {
                        self.routes[r].keys.clear();
                    }
                }
                for ii in 0..self.insts.len() {
                    if self.insts[ii].live && self.insts[ii].channel == channel {
                        self.release_instance(ii as u32, now);
                    }
                }
            }
            _ => {}
        }
    }

    /// Releases the notes of `channel` no key and no pedal holds any more.
    fn release_unheld(&mut self, now: ClusterTime, channel: u8) {
        let scope = self.scope(channel);
        for ii in 0..self.insts.len() {
            let i = &self.insts[ii];
            if i.live && scope & (1 << i.channel) != 0 && !held(i, &self.pedals(i.channel)) {
                self.release_instance(ii as u32, now);
            }
        }
    }

    fn key_down(&mut self, now: ClusterTime, channel: u8, note: u8, velocity: u8) {
        let cell = usize::from(channel) * 128 + usize::from(note);
        // A key still sounding (held by a pedal, or a retrigger) is released first.
        let old = self.note_map[cell];
        if old != FREE {
            self.release_instance(old, now);
        }
        let Some(route) = self.route_for(channel, note) else {
            self.stats.unrouted += 1;
            return;
        };
        let r = route as usize;
        if self.routes[r].cfg.mono.is_none() {
            let inst = self.new_instance(channel, note, velocity, route, false);
            self.note_map[cell] = inst;
            self.sound_instance(now, inst);
            return;
        }
        let keys = &mut self.routes[r].keys;
        keys.retain(|&k| k != note);
        keys.push(note);
        let target = self.routes[r].mono_target().unwrap_or(note);
        let mi = self.routes[r].mono_inst;
        if mi == FREE {
            let inst = self.new_instance(channel, target, velocity, route, true);
            self.routes[r].mono_inst = inst;
            self.sound_instance(now, inst);
        } else {
            self.insts[mi as usize].key_down = true;
            self.repitch(now, mi, target);
        }
    }

    fn key_up(&mut self, now: ClusterTime, channel: u8, note: u8) {
        let cell = usize::from(channel) * 128 + usize::from(note);
        let ch = self.pedals(channel);
        let inst = self.note_map[cell];
        if inst != FREE {
            let i = &mut self.insts[inst as usize];
            i.key_down = false;
            if !held(i, &ch) {
                self.release_instance(inst, now);
            }
            return;
        }
        let route = self.route_for(channel, note);
        let Some(r) = route
            .map(|r| r as usize)
            .filter(|&r| self.routes[r].cfg.mono.is_some())
        else {
            self.release_detached_mono(now, channel, note);
            return;
        };
        let keys = &mut self.routes[r].keys;
        let Some(p) = keys.iter().position(|&k| k == note) else {
            return;
        };
        keys.remove(p);
        let mi = self.routes[r].mono_inst;
        if mi == FREE {
            return;
        }
        match self.routes[r].mono_target() {
            Some(target) => self.repitch(now, mi, target),
            None => {
                let i = &mut self.insts[mi as usize];
                i.key_down = false;
                if !held(i, &ch) {
                    self.release_instance(mi, now);
                }
            }
        }
    }

    /// A mono line whose route was replaced ends with the key of its current pitch.
    fn release_detached_mono(&mut self, now: ClusterTime, channel: u8, note: u8) {
        let ch = self.pedals(channel);
        for ii in 0..self.insts.len() {
            let i = &mut self.insts[ii];
            if i.live && i.mono && i.route == DETACHED && i.channel == channel && i.note == note {
                i.key_down = false;
                if !held(i, &ch) {
                    self.release_instance(ii as u32, now);
                }
            }
        }
    }

    /// Legato: moves a mono line's voices to `note` without a new attack.
    fn repitch(&mut self, now: ClusterTime, inst: u32, note: u8) {
        let at = self.at(now);
        let zone = self.zone_offset(self.insts[inst as usize].channel);
        let i = &mut self.insts[inst as usize];
        if i.note == note {
            return;
        }
        i.note = note;
        i.key = note;
        emit_pitch(&mut self.out, &self.nodes, i, zone, at);
    }

    /// Starts `note` (velocity 1–127; 0 is treated as a note-off) on `channel` (OSC input).
    #[must_use]
    pub fn note_on(
        &mut self,
        now: ClusterTime,
        note: u8,
        velocity: u8,
        channel: u8,
    ) -> Vec<Action> {
        self.handle_midi(
            now,
            MidiEvent::NoteOn {
                channel,
                note,
                velocity,
            },
        )
        .map(|(n, m)| (n.to_string(), m))
        .collect()
    }

    /// Releases `note` on `channel` (pedals respected).
    #[must_use]
    pub fn note_off(&mut self, now: ClusterTime, note: u8, channel: u8) -> Vec<Action> {
        self.handle_midi(
            now,
            MidiEvent::NoteOff {
                channel,
                note,
                velocity: 0,
            },
        )
        .map(|(n, m)| (n.to_string(), m))
        .collect()
    }

    /// Releases every voice on every node and lifts every pedal and held key.
    #[must_use]
    pub fn panic(&mut self, now: ClusterTime) -> Vec<Action> {
        self.out.clear();
        for ch in &mut self.channels {
            ch.sustain = false;
            ch.sostenuto = false;
        }
        for r in &mut self.routes {
            r.keys.clear();
        }
        for ii in 0..self.insts.len() {
            if self.insts[ii].live {
                self.release_instance(ii as u32, now);
            }
        }
        self.take_out()
    }

    /// Lease renewals due at `now`: one or more [`LeaseRenew`] per node for the held voices
    /// whose renewal time has come, with `until = now + lookahead + lease`.
    #[must_use]
    pub fn renewals(&mut self, now: ClusterTime) -> Vec<Action> {
        let until = ClusterTime(self.at(now).0.saturating_add(self.cfg.lease_ns));
        let next = ClusterTime(now.0.saturating_add(self.cfg.renew_every_ns));
        let mut actions = Vec::new();
        for node in self.nodes.iter_mut().filter(|n| n.alive) {
            let mut batch: heapless::Vec<VoiceId, MAX_LEASE_BATCH> = heapless::Vec::new();
            for (vi, slot) in node.slots.iter_mut().enumerate() {
                if slot.inst == FREE || slot.renew_at > now {
                    continue;
                }
                slot.renew_at = next;
                if batch.push(vi as VoiceId).is_err() {
                    let full = core::mem::take(&mut batch);
                    actions.push((
                        node.id.to_string(),
                        Message::LeaseRenew(LeaseRenew {
                            voices: full,
                            until,
                        }),
                    ));
                    // The batch was just emptied, so this push cannot fail.
                    let _ = batch.push(vi as VoiceId);
                }
            }
            if !batch.is_empty() {
                actions.push((
                    node.id.to_string(),
                    Message::LeaseRenew(LeaseRenew {
                        voices: batch,
                        until,
                    }),
                ));
            }
        }
        actions
    }

    /// When [`renewals`](Self::renewals) next has something to do, or `None` while no voice is
    /// held.
    pub fn poll_timeout(&self) -> Option<ClusterTime> {
        self.nodes
            .iter()
            .filter(|n| n.alive)
            .flat_map(|n| n.slots.iter())
            .filter(|s| s.inst != FREE)
            .map(|s| s.renew_at)
            .min()
    }
}

/// Whether a key or a pedal still holds the note.
fn held(i: &Instance, ch: &ChannelState) -> bool {
    i.key_down || ch.sustain || (i.sost && ch.sostenuto)
}

fn valid(ev: &MidiEvent) -> bool {
    match *ev {
        MidiEvent::NoteOn {
            channel,
            note,
            velocity: v,
        }
        | MidiEvent::NoteOff {
            channel,
            note,
            velocity: v,
        }
        | MidiEvent::PolyPressure {
            channel,
            note,
            value: v,
        }
        | MidiEvent::ControlChange {
            channel,
            controller: note,
            value: v,
        } => channel < 16 && note < 128 && v < 128,
        MidiEvent::PitchBend { channel, value } => channel < 16 && (-8192..8192).contains(&value),
        MidiEvent::ChannelPressure { channel, value: v }
        | MidiEvent::ProgramChange {
            channel,
            program: v,
        } => channel < 16 && v < 128,
    }
}

/// Busy share plus reported load, both per mille: lower is better.
fn load_score(n: &Node) -> u64 {
    let cap = n.slots.len().max(1) as u64;
    n.busy() as u64 * 1000 / cap + u64::from(n.load_permille)
}

/// Velocity decayed by age (halving every second), scaled: lower is quieter.
fn quiet_score(velocity: u8, now: ClusterTime, started: ClusterTime) -> u64 {
    let age_ms = now.0.saturating_sub(started.0) / 1_000_000;
    (u64::from(velocity) << 32) >> (age_ms / 1000).min(40)
}

/// Sends every voice of `i` its pitch offset: legato distance + bend + detune.
fn emit_pitch(out: &mut Vec<NodeAction>, nodes: &[Node], i: &Instance, zone: f32, at: ClusterTime) {
    for &(ni, vi) in &i.voices {
        let node = &nodes[usize::from(ni)];
        let slot = &node.slots[usize::from(vi)];
        let value = (f32::from(i.note) - f32::from(slot.start_note))
            + i.bend * i.bend_range
            + slot.detune / 100.0
            + zone;
        out.push((
            node.id.clone(),
            Message::VoiceParam(VoiceParam {
                voice: vi,
                param: PARAM_PITCH_SEMITONES,
                value,
                at,
            }),
        ));
    }
}

fn emit_params(
    out: &mut Vec<NodeAction>,
    nodes: &[Node],
    i: &Instance,
    param: u16,
    value: f32,
    at: ClusterTime,
) {
    for &(ni, vi) in &i.voices {
        out.push((
            nodes[usize::from(ni)].id.clone(),
            Message::VoiceParam(VoiceParam {
                voice: vi,
                param,
                value,
                at,
            }),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const T0: ClusterTime = ClusterTime(1_000_000_000);

    fn alloc(nodes: &[(&str, u16)]) -> VoiceAllocator {
        let mut a = VoiceAllocator::new(AllocatorConfig::default());
        for (id, v) in nodes {
            a.add_node(id, *v);
        }
        a
    }

    fn ons(actions: &[Action]) -> Vec<(String, VoiceOn)> {
        actions
            .iter()
            .filter_map(|(n, m)| match m {
                Message::VoiceOn(v) => Some((n.clone(), *v)),
                _ => None,
            })
            .collect()
    }

    fn offs(actions: &[Action]) -> Vec<(String, VoiceOff)> {
        actions
            .iter()
            .filter_map(|(n, m)| match m {
                Message::VoiceOff(v) => Some((n.clone(), *v)),
                _ => None,
            })
            .collect()
    }

    fn midi(a: &mut VoiceAllocator, ev: MidiEvent) -> Vec<Action> {
        a.handle_midi(T0, ev)
            .map(|(n, m)| (n.to_string(), m))
            .collect()
    }

    fn cc(channel: u8, controller: u8, value: u8) -> MidiEvent {
        MidiEvent::ControlChange {
            channel,
            controller,
            value,
        }
    }

    #[test]
    fn chord_spreads_across_nodes() {
        let mut a = alloc(&[("a", 4), ("b", 4), ("c", 4)]);
        let mut got = Vec::new();
        for note in [60, 64, 67] {
            got.extend(ons(&a.note_on(T0, note, 100, 0)));
        }
        let nodes: HashSet<_> = got.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(nodes.len(), 3, "{got:?}");
    }

    #[test]
    fn stamps_at_and_lease() {
        let mut a = alloc(&[("a", 1)]);
        let on = ons(&a.note_on(T0, 60, 100, 3));
        assert_eq!(on.len(), 1);
        let v = on[0].1;
        assert_eq!(v.at, ClusterTime(T0.0 + 5_000_000));
        assert_eq!(v.lease_until, ClusterTime(v.at.0 + 1_000_000_000));
        assert_eq!((v.note, v.velocity, v.channel), (60, 100, 3));
    }

    #[test]
    fn steals_oldest_when_full_with_release_fade() {
        let mut a = alloc(&[("a", 1), ("b", 1)]);
        let first = ons(&a.note_on(T0, 60, 100, 0));
        let _ = a.note_on(T0, 62, 100, 0);
        let act = a.note_on(T0, 64, 100, 0);
        let off = offs(&act);
        let on = ons(&act);
        assert_eq!(off.len(), 1);
        assert_eq!(
            (off[0].0.clone(), off[0].1.voice),
            (first[0].0.clone(), first[0].1.voice)
        );
        assert_eq!(on[0].0, first[0].0);
        assert_eq!(on[0].1.at.0, off[0].1.at.0 + 3_000_000, "release fade");
        assert_eq!(a.stats().stolen, 1);
        assert!(a.voice_of(60, 0).is_none());
        assert!(a.voice_of(64, 0).is_some());
        assert!(
            a.note_off(T0, 60, 0).is_empty(),
            "stolen note frees nothing"
        );
    }

    #[test]
    fn steal_quietest_and_same_note() {
        let mut a = alloc(&[("a", 3)]);
        a.set_steal(StealMode::Quietest);
        let _ = a.note_on(T0, 60, 100, 0);
        let _ = a.note_on(T0, 61, 10, 0);
        let _ = a.note_on(T0, 62, 90, 0);
        let _ = a.note_on(T0, 63, 100, 0);
        assert!(a.voice_of(61, 0).is_none(), "quietest stolen");
        a.set_steal(StealMode::SameNote);
        let _ = a.note_on(T0, 62, 100, 1);
        assert!(a.voice_of(62, 0).is_none(), "same note stolen");
        assert!(a.voice_of(60, 0).is_some());
    }

    #[test]
    fn policies() {
        let mut a = alloc(&[("a", 4), ("b", 4), ("c", 4)]);
        a.set_node_latency("a", 9_000_000);
        a.set_node_latency("b", 1_000_000);
        a.set_node_latency("c", 5_000_000);
        a.set_policy(Policy::LowestLatency);
        assert_eq!(ons(&a.note_on(T0, 60, 1, 0))[0].0, "b");
        a.set_policy(Policy::LeastLoaded);
        let n = ons(&a.note_on(T0, 61, 1, 0))[0].0.clone();
        assert_ne!(n, "b");
        a.set_node_load("a", 900);
        a.set_node_load("c", 900);
        a.set_policy(Policy::RoundRobin);
        for k in 0..2 {
            assert_eq!(
                ons(&a.note_on(T0, 70 + k, 1, 0))[0].0,
                "b",
                "overloaded avoided"
            );
        }
        // b is full now: overloaded nodes are the last resort.
        assert_eq!(ons(&a.note_on(T0, 80, 1, 0)).len(), 1);
    }

    #[test]
    fn sustain_and_sostenuto() {
        let mut a = alloc(&[("a", 8)]);
        let _ = a.note_on(T0, 60, 100, 0);
        let _ = midi(&mut a, cc(0, 66, 127));
        let _ = a.note_on(T0, 64, 100, 0);
        assert!(a.note_off(T0, 60, 0).is_empty(), "sostenuto holds 60");
        assert_eq!(offs(&a.note_off(T0, 64, 0)).len(), 1, "64 not latched");
        let _ = midi(&mut a, cc(0, 64, 127));
        let _ = a.note_on(T0, 67, 100, 0);
        assert!(a.note_off(T0, 67, 0).is_empty(), "sustain holds 67");
        assert!(
            midi(&mut a, cc(0, 66, 0)).is_empty(),
            "sustain still holds 60"
        );
        assert_eq!(offs(&midi(&mut a, cc(0, 64, 0))).len(), 2);
        assert_eq!(a.total_active(), 0);
    }

    #[test]
    fn unison_spans_nodes_and_detunes() {
        let mut a = alloc(&[("a", 2), ("b", 2), ("c", 2)]);
        a.set_routes(vec![ChannelRoute {
            channel: 0,
            unison: 3,
            unison_detune_cents: 20.0,
            ..ChannelRoute::default()
        }]);
        let act = a.note_on(T0, 60, 100, 0);
        let on = ons(&act);
        assert_eq!(on.len(), 3);
        assert_eq!(on.iter().map(|o| &o.0).collect::<HashSet<_>>().len(), 3);
        let detunes: Vec<f32> = act
            .iter()
            .filter_map(|(_, m)| match m {
                Message::VoiceParam(p) if p.param == PARAM_PITCH_SEMITONES => Some(p.value),
                _ => None,
            })
            .collect();
        assert_eq!(detunes, vec![-0.1, 0.1], "the centre voice needs no offset");
        assert_eq!(offs(&a.note_off(T0, 60, 0)).len(), 3);
    }

    #[test]
    fn mono_priorities() {
        for (prio, expect) in [
            (MonoPriority::Last, [64, 67, 64]),
            (MonoPriority::Low, [60, 60, 60]),
            (MonoPriority::High, [64, 67, 64]),
        ] {
            let mut a = alloc(&[("a", 4)]);
            a.set_routes(vec![ChannelRoute {
                channel: 2,
                mono: Some(prio),
                ..ChannelRoute::default()
            }]);
            assert_eq!(ons(&a.note_on(T0, 60, 100, 2)).len(), 1);
            let _ = a.note_on(T0, 64, 100, 2);
            assert_eq!(a.held_voices().next().map(|h| h.note), Some(expect[0]));
            let _ = a.note_on(T0, 67, 100, 2);
            assert_eq!(a.held_voices().next().map(|h| h.note), Some(expect[1]));
            let _ = a.note_off(T0, 67, 2);
            assert_eq!(a.held_voices().next().map(|h| h.note), Some(expect[2]));
            assert_eq!(a.total_active(), 1, "{prio:?}: one voice, legato");
            let _ = a.note_off(T0, 60, 2);
            assert_eq!(offs(&a.note_off(T0, 64, 2)).len(), 1);
            assert_eq!(a.total_active(), 0);
        }
    }

    #[test]
    fn splits_and_node_groups() {
        let mut a = alloc(&[("lo", 4), ("hi", 4)]);
        a.set_routes(vec![
            ChannelRoute {
                channel: 0,
                nodes: Some(vec!["lo".into()]),
                key_range: (0, 59),
                ..ChannelRoute::default()
            },
            ChannelRoute {
                channel: 0,
                nodes: Some(vec!["hi".into()]),
                key_range: (60, 100),
                ..ChannelRoute::default()
            },
        ]);
        for n in [30, 40, 50] {
            assert_eq!(ons(&a.note_on(T0, n, 1, 0))[0].0, "lo");
        }
        for n in [60, 70] {
            assert_eq!(ons(&a.note_on(T0, n, 1, 0))[0].0, "hi");
        }
        assert!(a.note_on(T0, 110, 1, 0).is_empty());
        assert_eq!(a.stats().unrouted, 1);
    }

    #[test]
    fn engine_bound_route_uses_only_nodes_with_the_engine() {
        let mut a = alloc(&[("sub", 4), ("fm", 4)]);
        a.set_node_engines("sub", &["subtractive"]);
        a.set_node_engines("fm", &["subtractive", "fm2"]);
        a.set_routes(vec![ChannelRoute {
            channel: 5,
            engine: Some("fm2".into()),
            ..ChannelRoute::default()
        }]);
        for n in 0..4 {
            assert_eq!(ons(&a.note_on(T0, n, 1, 5))[0].0, "fm");
        }
        // Full: it steals on "fm" rather than use "sub".
        let act = a.note_on(T0, 9, 1, 5);
        assert_eq!(ons(&act)[0].0, "fm");
        assert_eq!(a.stats().stolen, 1);
    }

    #[test]
    fn mpe_and_channel_params() {
        let mut a = alloc(&[("a", 8)]);
        a.set_routes(vec![ChannelRoute {
            channel: 1,
            mpe: true,
            ..ChannelRoute::default()
        }]);
        let _ = midi(
            &mut a,
            MidiEvent::PitchBend {
                channel: 1,
                value: 4096,
            },
        );
        let act = a.note_on(T0, 60, 100, 1);
        assert!(act.iter().any(|(_, m)| matches!(m, Message::VoiceParam(p) if p.param == PARAM_PITCH_SEMITONES && p.value == 1.0)));
        let _ = a.note_on(T0, 62, 100, 2);
        let act = midi(&mut a, cc(1, 74, 127));
        assert_eq!(act.len(), 1, "timbre to the member channel's note only");
        let act = midi(
            &mut a,
            MidiEvent::ChannelPressure {
                channel: 2,
                value: 127,
            },
        );
        assert_eq!(act.len(), 1);
        let act = midi(
            &mut a,
            MidiEvent::PolyPressure {
                channel: 1,
                note: 60,
                value: 64,
            },
        );
        assert_eq!(act.len(), 1);
    }

    #[test]
    fn mpe_zone_manager_pedals_and_bend() {
        let mut a = alloc(&[("a", 8)]);
        let member = |channel| ChannelRoute {
            channel,
            mpe: true,
            bend_range_semitones: 48.0,
            ..ChannelRoute::default()
        };
        a.set_routes(vec![member(1), member(2), member(3)]);
        let _ = a.note_on(T0, 60, 100, 1);
        let _ = a.note_on(T0, 64, 100, 2);
        // Sustain on the manager channel holds the members' notes.
        let _ = midi(&mut a, cc(0, 64, 127));
        assert!(a.note_off(T0, 60, 1).is_empty());
        assert_eq!(offs(&midi(&mut a, cc(0, 64, 0))).len(), 1);
        // Manager bend (range 2) moves the zone; a member's own bend (range 48) adds to it.
        let pitch = |act: &[Action]| -> Vec<f32> {
            act.iter()
                .filter_map(|(_, m)| match m {
                    Message::VoiceParam(p) if p.param == PARAM_PITCH_SEMITONES => Some(p.value),
                    _ => None,
                })
                .collect()
        };
        let act = midi(
            &mut a,
            MidiEvent::PitchBend {
                channel: 0,
                value: 4096,
            },
        );
        assert_eq!(pitch(&act), vec![1.0]);
        let act = midi(
            &mut a,
            MidiEvent::PitchBend {
                channel: 2,
                value: -4096,
            },
        );
        assert_eq!(pitch(&act), vec![-23.0]);
        // A note started later in the zone starts with the zone's bend.
        let act = a.note_on(T0, 67, 100, 3);
        assert_eq!(pitch(&act), vec![1.0]);
        // Manager pressure reaches every member note; a member's only its own.
        let act = midi(
            &mut a,
            MidiEvent::ChannelPressure {
                channel: 0,
                value: 127,
            },
        );
        assert_eq!(act.len(), 2);
        let act = midi(
            &mut a,
            MidiEvent::ChannelPressure {
                channel: 3,
                value: 1,
            },
        );
        assert_eq!(act.len(), 1);
        // A channel outside any zone is not affected by channel 0.
        let _ = a.note_on(T0, 50, 100, 9);
        let _ = midi(&mut a, cc(0, 64, 127));
        assert_eq!(offs(&a.note_off(T0, 50, 9)).len(), 1);
    }

    #[test]
    fn bad_input_dropped_and_counted() {
        let mut a = alloc(&[("a", 8)]);
        assert!(a.note_on(T0, 200, 1, 0).is_empty());
        assert!(a.note_on(T0, 60, 1, 16).is_empty());
        assert!(
            midi(
                &mut a,
                MidiEvent::PitchBend {
                    channel: 0,
                    value: 9000
                }
            )
            .is_empty()
        );
        assert!(midi(&mut a, cc(0, 64, 128)).is_empty());
        assert_eq!(a.stats().invalid, 4);
    }

    #[test]
    fn failover_respawns_with_state() {
        let mut a = alloc(&[("a", 2), ("b", 2), ("c", 2)]);
        let _ = midi(
            &mut a,
            MidiEvent::PitchBend {
                channel: 0,
                value: -8192,
            },
        );
        let mut on = Vec::new();
        for n in [60, 64, 67] {
            on.extend(ons(&a.note_on(T0, n, 90, 0)));
        }
        let lost = on.iter().find(|o| o.0 == "b").expect("b plays").1;
        let t = ClusterTime(T0.0 + 300_000_000);
        let act = a.node_lost(t, "b");
        let re = ons(&act);
        assert_eq!(re.len(), 1);
        assert_ne!(re[0].0, "b");
        assert_eq!((re[0].1.note, re[0].1.velocity), (lost.note, 90));
        assert_eq!(re[0].1.at, ClusterTime(t.0 + 5_000_000));
        assert!(act.iter().any(|(_, m)| matches!(m, Message::VoiceParam(p) if p.param == PARAM_PITCH_SEMITONES && p.value == -2.0)));
        assert!(act.iter().all(|(n, _)| n != "b"));
        assert_eq!(a.stats().respawned, 1);
        // The note-off now releases the re-spawned voice.
        assert_eq!(offs(&a.note_off(t, lost.note, 0))[0].0, re[0].0);
        // Rejoin: back in the pool.
        assert_eq!(a.add_node("b", 2), 0);
        assert!(a.has_node("b"));
        assert_eq!(a.capacity(), 6);
    }

    #[test]
    fn panic_releases_everything() {
        let mut a = alloc(&[("a", 3)]);
        let _ = midi(&mut a, cc(0, 64, 127));
        for n in 0..3 {
            let _ = a.note_on(T0, n, 1, 0);
        }
        assert_eq!(offs(&a.panic(T0)).len(), 3);
        assert_eq!(a.total_active(), 0);
        assert_eq!(a.poll_timeout(), None);
        let _ = a.note_on(T0, 5, 1, 0);
        assert_eq!(
            offs(&a.note_off(T0, 5, 0)).len(),
            1,
            "panic lifted the pedal"
        );
    }

    #[test]
    fn renewals_follow_poll_timeout() {
        let mut a = alloc(&[("a", 100)]);
        for n in 0..70 {
            let _ = a.note_on(T0, n, 1, 0);
        }
        let due = a.poll_timeout().expect("voices held");
        assert_eq!(due, ClusterTime(T0.0 + 250_000_000));
        assert!(a.renewals(ClusterTime(due.0 - 1)).is_empty());
        let r = a.renewals(due);
        let total: usize = r
            .iter()
            .map(|(_, m)| match m {
                Message::LeaseRenew(l) => {
                    assert_eq!(l.until, ClusterTime(due.0 + 5_000_000 + 1_000_000_000));
                    l.voices.len()
                }
                other => panic!("unexpected {other:?}"),
            })
            .sum();
        assert_eq!((r.len(), total), (2, 70));
        assert_eq!(a.poll_timeout(), Some(ClusterTime(due.0 + 250_000_000)));
    }

    #[test]
    fn config_serde_round_trip() {
        let cfg = AllocatorConfig {
            policy: Policy::LowestLatency,
            routes: vec![ChannelRoute {
                channel: 3,
                mono: Some(MonoPriority::High),
                ..ChannelRoute::default()
            }],
            ..AllocatorConfig::default()
        };
        let s = serde_json::to_string(&cfg).expect("serialise");
        assert!(s.contains("\"lowest_latency\""), "{s}");
        let back: AllocatorConfig = serde_json::from_str(&s).expect("parse");
        assert_eq!(back, cfg);
        let partial: ChannelRoute = serde_json::from_str(r#"{"channel":2}"#).expect("defaults");
        assert_eq!(partial.unison, 1);
    }
}
