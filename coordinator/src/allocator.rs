//! The voice allocator: which node plays which note, on which voice slot.
//!
//! A sans-IO core: it never reads a clock, a socket or a global RNG. Time comes in as a
//! [`ClusterTime`] value and everything it wants sent comes out as [`Action`]s, so the same code
//! runs under tokio, in a deterministic simulation and in property tests.
//!
//! Policy of this first version: round-robin across nodes, with the starting node rotating on
//! every note-on so consecutive notes of a chord land on different nodes; when every voice is
//! busy the oldest voice is stolen. Each assignment carries a lease; the glue asks for
//! [`VoiceAllocator::renewals`] when [`VoiceAllocator::poll_timeout`] says so. A lost node's
//! voices are dropped and counted (re-spawning them on survivors is a later issue).
#![deny(clippy::disallowed_methods)]

use voicemesh_protocol::{
    ClusterTime, LeaseRenew, MAX_LEASE_BATCH, Message, VoiceId, VoiceOff, VoiceOn,
};

/// Something the glue must send: `message` to the node named `node`.
pub type Action = (String, Message);

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

/// A voice slot in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    note: u8,
    channel: u8,
    /// Allocation order, for stealing the oldest.
    serial: u64,
    /// When the next renewal of this voice is due.
    renew_at: ClusterTime,
}

#[derive(Debug)]
struct NodeSlots {
    id: String,
    slots: Vec<Option<Held>>,
}

/// Counters the allocator keeps, for the snapshot and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Voices assigned by note-ons.
    pub allocated: u64,
    /// Voices stolen because every voice was busy.
    pub stolen: u64,
    /// Note-ons dropped because the cluster has no voices at all.
    pub no_voices: u64,
    /// Voices dropped because their node was lost or removed.
    pub lost: u64,
}

/// Assigns notes to voices across nodes.
///
/// Call order (the glue does this; nothing here reads a clock):
/// 1. [`add_node`](Self::add_node) when a node's session is welcomed, with its voice count;
///    [`node_lost`](Self::node_lost) when it goes offline or away.
/// 2. [`note_on`](Self::note_on) / [`note_off`](Self::note_off) / [`panic`](Self::panic) for
///    every input event, with `now` = the current cluster time; send the returned actions in
///    order.
/// 3. Call [`renewals`](Self::renewals) at or after the time [`poll_timeout`](Self::poll_timeout)
///    returns (and again whenever a note-on may have moved it earlier), and send the returned
///    lease renewals.
#[derive(Debug)]
pub struct VoiceAllocator {
    cfg: AllocatorConfig,
    nodes: Vec<NodeSlots>,
    /// Index into `nodes` where the next note-on starts looking.
    next_start: usize,
    serial: u64,
    stats: AllocatorStats,
}

impl VoiceAllocator {
    /// An allocator with no nodes.
    pub fn new(cfg: AllocatorConfig) -> Self {
        VoiceAllocator {
            cfg,
            nodes: Vec::new(),
            next_start: 0,
            serial: 0,
            stats: AllocatorStats::default(),
        }
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

    /// Replaces the channel routes; sounding notes keep their voices.
    pub fn set_routes(&mut self, routes: Vec<ChannelRoute>) {
        self.cfg.routes = routes;
    }

    /// Counters since creation.
    pub fn stats(&self) -> AllocatorStats {
        self.stats
    }

    /// Adds a node with `voices` voice slots. A node already present is replaced: its held
    /// voices are dropped and counted as lost (returned count).
    pub fn add_node(&mut self, id: &str, voices: u16) -> usize {
        let dropped = self.node_lost(id);
        self.nodes.push(NodeSlots {
            id: id.to_owned(),
            slots: vec![None; usize::from(voices)],
        });
        dropped
    }

    /// Removes a node (offline, gone). Its voices are dropped without messages — the node is
    /// unreachable and releases them itself when their lease runs out. Returns how many voices
    /// it held.
    pub fn node_lost(&mut self, id: &str) -> usize {
        let Some(i) = self.nodes.iter().position(|n| n.id == id) else {
            return 0;
        };
        let node = self.nodes.remove(i);
        if self.next_start > i {
            self.next_start -= 1;
        }
        if self.next_start >= self.nodes.len() {
            self.next_start = 0;
        }
        let held = node.slots.iter().filter(|s| s.is_some()).count();
        self.stats.lost += held as u64;
        held
    }

    /// Whether a node of this id is present.
    pub fn has_node(&self, id: &str) -> bool {
        self.nodes.iter().any(|n| n.id == id)
    }

    /// Voices in use on node `id` (0 for an unknown node).
    pub fn active_voices(&self, id: &str) -> usize {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .map_or(0, |n| n.slots.iter().filter(|s| s.is_some()).count())
    }

    /// Voices in use across the cluster.
    pub fn total_active(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| n.slots.iter().filter(|s| s.is_some()).count())
            .sum()
    }

    /// Voice slots across the cluster.
    pub fn capacity(&self) -> usize {
        self.nodes.iter().map(|n| n.slots.len()).sum()
    }

    /// Which (node, voice) plays `note` on `channel`, if any.
    pub fn voice_of(&self, note: u8, channel: u8) -> Option<(&str, VoiceId)> {
        self.find(note, channel)
            .map(|(ni, vi)| (self.nodes[ni].id.as_str(), vi as VoiceId))
    }

    fn find(&self, note: u8, channel: u8) -> Option<(usize, usize)> {
        self.nodes.iter().enumerate().find_map(|(ni, n)| {
            n.slots
                .iter()
                .position(|s| s.is_some_and(|h| h.note == note && h.channel == channel))
                .map(|vi| (ni, vi))
        })
    }

    fn at(&self, now: ClusterTime) -> ClusterTime {
        ClusterTime(now.0.saturating_add(self.cfg.lookahead_ns))
    }

    /// Starts `note` (velocity 1–127; 0 is treated as a note-off) on `channel`.
    ///
    /// A note already sounding on the same channel is released first, so each (note, channel)
    /// holds at most one voice. Returns the messages to send, in order.
    #[must_use]
    pub fn note_on(
        &mut self,
        now: ClusterTime,
        note: u8,
        velocity: u8,
        channel: u8,
    ) -> Vec<Action> {
        if velocity == 0 {
            return self.note_off(now, note, channel);
        }
        let mut actions = self.note_off(now, note, channel);
        let at = self.at(now);
        let n = self.nodes.len();
        let mut chosen = None;
        for k in 0..n {
            let ni = (self.next_start + k) % n;
            if let Some(vi) = self.nodes[ni].slots.iter().position(Option::is_none) {
                chosen = Some((ni, vi));
                break;
            }
        }
        if chosen.is_none() {
            // Every voice busy: steal the oldest.
            let oldest = self
                .nodes
                .iter()
                .enumerate()
                .flat_map(|(ni, node)| {
                    node.slots
                        .iter()
                        .enumerate()
                        .filter_map(move |(vi, s)| s.map(|h| (h.serial, ni, vi)))
                })
                .min();
            let Some((_, ni, vi)) = oldest else {
                self.stats.no_voices += 1;
                return actions;
            };
            self.nodes[ni].slots[vi] = None;
            self.stats.stolen += 1;
            actions.push((
                self.nodes[ni].id.clone(),
                Message::VoiceOff(VoiceOff {
                    voice: vi as VoiceId,
                    at,
                }),
            ));
            chosen = Some((ni, vi));
        }
        let Some((ni, vi)) = chosen else {
            return actions;
        };
        self.serial += 1;
        self.nodes[ni].slots[vi] = Some(Held {
            note,
            channel,
            serial: self.serial,
            renew_at: ClusterTime(now.0.saturating_add(self.cfg.renew_every_ns)),
        });
        self.next_start = (ni + 1) % n;
        self.stats.allocated += 1;
        actions.push((
            self.nodes[ni].id.clone(),
            Message::VoiceOn(VoiceOn {
                voice: vi as VoiceId,
                note,
                velocity: velocity.min(127),
                channel,
                at,
                lease_until: ClusterTime(at.0.saturating_add(self.cfg.lease_ns)),
            }),
        ));
        actions
    }

    /// Releases the voice `note` on `channel` took, if it still holds one.
    #[must_use]
    pub fn note_off(&mut self, now: ClusterTime, note: u8, channel: u8) -> Vec<Action> {
        let Some((ni, vi)) = self.find(note, channel) else {
            return Vec::new();
        };
        self.nodes[ni].slots[vi] = None;
        vec![(
            self.nodes[ni].id.clone(),
            Message::VoiceOff(VoiceOff {
                voice: vi as VoiceId,
                at: self.at(now),
            }),
        )]
    }

    /// Releases every voice on every node.
    #[must_use]
    pub fn panic(&mut self, now: ClusterTime) -> Vec<Action> {
        let at = self.at(now);
        let mut actions = Vec::new();
        for node in &mut self.nodes {
            for (vi, slot) in node.slots.iter_mut().enumerate() {
                if slot.take().is_some() {
                    actions.push((
                        node.id.clone(),
                        Message::VoiceOff(VoiceOff {
                            voice: vi as VoiceId,
                            at,
                        }),
                    ));
                }
            }
        }
        actions
    }

    /// Lease renewals due at `now`: one or more [`LeaseRenew`] per node for the held voices
    /// whose renewal time has come, with `until = now + lookahead + lease`.
    #[must_use]
    pub fn renewals(&mut self, now: ClusterTime) -> Vec<Action> {
        let until = ClusterTime(self.at(now).0.saturating_add(self.cfg.lease_ns));
        let next = ClusterTime(now.0.saturating_add(self.cfg.renew_every_ns));
        let mut actions = Vec::new();
        for node in &mut self.nodes {
            let mut batch: heapless::Vec<VoiceId, MAX_LEASE_BATCH> = heapless::Vec::new();
            for (vi, slot) in node.slots.iter_mut().enumerate() {
                let Some(h) = slot else { continue };
                if h.renew_at > now {
                    continue;
                }
                h.renew_at = next;
                if batch.push(vi as VoiceId).is_err() {
                    let full = core::mem::take(&mut batch);
                    actions.push((
                        node.id.clone(),
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
                    node.id.clone(),
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
            .flat_map(|n| n.slots.iter().flatten())
            .map(|h| h.renew_at)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

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
    fn steals_oldest_when_full() {
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
        assert_eq!(a.stats().stolen, 1);
        assert!(a.voice_of(60, 0).is_none());
        assert!(a.voice_of(64, 0).is_some());
    }

    #[test]
    fn note_off_releases_and_node_lost_drops() {
        let mut a = alloc(&[("a", 2), ("b", 2)]);
        let on = ons(&a.note_on(T0, 60, 100, 0));
        let off = offs(&a.note_off(T0, 60, 0));
        assert_eq!(off[0].0, on[0].0);
        assert_eq!(off[0].1.voice, on[0].1.voice);
        assert_eq!(a.total_active(), 0);
        assert!(
            a.note_off(T0, 60, 0).is_empty(),
            "second note-off frees nothing"
        );
        let _ = a.note_on(T0, 1, 1, 0);
        let _ = a.note_on(T0, 2, 1, 0);
        assert_eq!(a.total_active(), 2);
        assert_eq!(a.node_lost("a") + a.node_lost("b"), 2);
        assert_eq!(a.stats().lost, 2);
        assert!(ons(&a.note_on(T0, 3, 1, 0)).is_empty());
        assert_eq!(a.stats().no_voices, 1);
    }

    #[test]
    fn panic_releases_everything() {
        let mut a = alloc(&[("a", 3)]);
        for n in 0..3 {
            let _ = a.note_on(T0, n, 1, 0);
        }
        assert_eq!(offs(&a.panic(T0)).len(), 3);
        assert_eq!(a.total_active(), 0);
        assert_eq!(a.poll_timeout(), None);
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
        assert_eq!(
            (r.len(), total),
            (2, 70),
            "split into batches of {MAX_LEASE_BATCH}"
        );
        assert_eq!(a.poll_timeout(), Some(ClusterTime(due.0 + 250_000_000)));
    }

    #[derive(Clone, Debug)]
    enum Op {
        On(u8, u8, u8),
        Off(u8, u8),
        Lost(u8),
        Add(u8, u16),
        Panic,
        Renew(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..12, 0u8..128, 0u8..3).prop_map(|(n, v, c)| Op::On(n, v, c)),
            4 => (0u8..12, 0u8..3).prop_map(|(n, c)| Op::Off(n, c)),
            1 => (0u8..4).prop_map(Op::Lost),
            1 => (0u8..4, 0u16..5).prop_map(|(i, v)| Op::Add(i, v)),
            1 => Just(Op::Panic),
            1 => (0u64..600_000_000).prop_map(Op::Renew),
        ]
    }

    proptest! {
        /// Reference model: a map (node, voice) -> (note, channel) rebuilt from the actions the
        /// allocator emits. It must agree with the allocator's own view after every step.
        #[test]
        fn model_invariants(ops in proptest::collection::vec(op(), 1..200)) {
            let mut a = VoiceAllocator::new(AllocatorConfig::default());
            let mut caps: HashMap<String, u16> = HashMap::new();
            let mut model: HashMap<(String, VoiceId), (u8, u8)> = HashMap::new();
            let mut now = T0;
            for op in ops {
                now = ClusterTime(now.0 + 1_000_000);
                let actions = match op {
                    Op::On(n, v, c) => {
                        let acts = a.note_on(now, n, v, c);
                        if v > 0 {
                            let held_before = model.values().any(|&x| x == (n, c));
                            let cap: usize = caps.values().map(|&c| usize::from(c)).sum();
                            if cap > 0 {
                                prop_assert_eq!(ons(&acts).len(), 1);
                            }
                            // Re-trigger releases the old voice first.
                            if held_before {
                                prop_assert!(!offs(&acts).is_empty());
                            }
                        } else {
                            prop_assert!(ons(&acts).is_empty());
                        }
                        acts
                    }
                    Op::Off(n, c) => {
                        let acts = a.note_off(now, n, c);
                        let took: Vec<_> = model.iter().filter(|(_, v)| **v == (n, c)).map(|(k, _)| k.clone()).collect();
                        let freed: Vec<_> = offs(&acts).into_iter().map(|(n, o)| (n, o.voice)).collect();
                        prop_assert_eq!(took, freed, "note-off frees exactly what its note-on took");
                        acts
                    }
                    Op::Lost(i) => {
                        let id = format!("n{i}");
                        let held = model.keys().filter(|(n, _)| *n == id).count();
                        prop_assert_eq!(a.node_lost(&id), held);
                        model.retain(|(n, _), _| *n != id);
                        caps.remove(&id);
                        Vec::new()
                    }
                    Op::Add(i, v) => {
                        let id = format!("n{i}");
                        a.add_node(&id, v);
                        model.retain(|(n, _), _| *n != id);
                        caps.insert(id, v);
                        Vec::new()
                    }
                    Op::Panic => {
                        let acts = a.panic(now);
                        prop_assert_eq!(offs(&acts).len(), model.len());
                        acts
                    }
                    Op::Renew(dt) => {
                        now = ClusterTime(now.0 + dt);
                        let acts = a.renewals(now);
                        for (node, m) in &acts {
                            let Message::LeaseRenew(l) = m else { panic!("not a renewal") };
                            for v in &l.voices {
                                prop_assert!(model.contains_key(&(node.clone(), *v)), "renewal of a free voice");
                            }
                        }
                        if let Some(t) = a.poll_timeout() {
                            prop_assert!(t > now);
                        }
                        acts
                    }
                };
                // Apply the actions to the model: an Off frees, an On must hit a free slot.
                for (node, m) in &actions {
                    match m {
                        Message::VoiceOff(o) => {
                            prop_assert!(model.remove(&(node.clone(), o.voice)).is_some(), "off for a free voice");
                        }
                        Message::VoiceOn(v) => {
                            prop_assert!(v.voice < caps[node], "voice beyond capacity");
                            prop_assert!(
                                model.insert((node.clone(), v.voice), (v.note, v.channel)).is_none(),
                                "voice double-booked"
                            );
                        }
                        _ => {}
                    }
                }
                // The model and the allocator agree; one voice per (note, channel).
                prop_assert_eq!(a.total_active(), model.len());
                for (id, cap) in &caps {
                    let used = model.keys().filter(|(n, _)| n == id).count();
                    prop_assert!(used <= usize::from(*cap));
                    prop_assert_eq!(a.active_voices(id), used);
                }
                let distinct: HashSet<_> = model.values().collect();
                prop_assert_eq!(distinct.len(), model.len());
            }
        }
    }
}
