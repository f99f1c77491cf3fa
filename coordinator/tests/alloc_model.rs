//! Model-based test of the voice allocator (CONVENTIONS.md §6): random sequences of notes,
//! pedals, MPE and channel messages, node loss and rejoin, capacity, load, latency and policy
//! changes, checked after every step against a naive reference: what each node would be
//! playing (built only from the emitted actions, with leases running out on their own) and
//! which keys MIDI says should sound.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;
use voicemesh_coordinator::allocator::{
    AllocatorConfig, ChannelRoute, MidiEvent, MonoPriority, Policy, StealMode, VoiceAllocator,
};
use voicemesh_protocol::{ClusterTime, Message};

const NODES: u8 = 4;
const KEYS: u8 = 16;
const LOOKAHEAD: u64 = 5_000_000;
const OVERLOAD: u16 = 800;
const MONO_CH: u8 = 2;

#[derive(Clone, Debug)]
enum Op {
    On(u8, u8, u8),
    Off(u8, u8),
    Sustain(u8, bool),
    Sostenuto(u8, bool),
    Bend(u8, i16),
    Pressure(u8, u8),
    Timbre(u8, u8),
    Poly(u8, u8, u8),
    Lost(u8),
    Add(u8, u16),
    Load(u8, u16),
    Latency(u8, u64),
    SetPolicy(u8),
    SetSteal(u8),
    Panic,
    /// The same routes applied again (an HTTP PUT of unchanged routing).
    SameRoutes,
    /// Channel 1's unison switched between the case's count and 1: its sounding notes are
    /// detached from their route and must still be released by their keys and pedals.
    ToggleUnison,
    Advance(u64),
    Invalid(u8),
}

fn op() -> impl Strategy<Value = Op> {
    // 0–4 as routed below; 13 and 14 are MPE members of the upper zone, 15 its manager.
    let ch = prop_oneof![4 => 0u8..5, 1 => 13u8..16];
    prop_oneof![
        12 => (ch.clone(), 0..KEYS, 1u8..128).prop_map(|(c, n, v)| Op::On(c, n, v)),
        9 => (ch.clone(), 0..KEYS).prop_map(|(c, n)| Op::Off(c, n)),
        2 => (ch.clone(), any::<bool>()).prop_map(|(c, d)| Op::Sustain(c, d)),
        2 => (ch.clone(), any::<bool>()).prop_map(|(c, d)| Op::Sostenuto(c, d)),
        1 => (ch.clone(), -8192i16..8192).prop_map(|(c, v)| Op::Bend(c, v)),
        1 => (ch.clone(), 0u8..128).prop_map(|(c, v)| Op::Pressure(c, v)),
        1 => (ch.clone(), 0u8..128).prop_map(|(c, v)| Op::Timbre(c, v)),
        1 => (ch, 0..KEYS, 0u8..128).prop_map(|(c, n, v)| Op::Poly(c, n, v)),
        1 => (0..NODES).prop_map(Op::Lost),
        1 => (0..NODES, 0u16..6).prop_map(|(i, v)| Op::Add(i, v)),
        1 => (0..NODES, prop_oneof![Just(0u16), Just(500), Just(950)]).prop_map(|(i, l)| Op::Load(i, l)),
        1 => (0..NODES, 0u64..4).prop_map(|(i, l)| Op::Latency(i, l * 1_000_000)),
        1 => (0u8..3).prop_map(Op::SetPolicy),
        1 => (0u8..3).prop_map(Op::SetSteal),
        1 => Just(Op::Panic),
        1 => Just(Op::SameRoutes),
        1 => Just(Op::ToggleUnison),
        3 => (0u64..700_000_000).prop_map(Op::Advance),
        1 => (0u8..4).prop_map(Op::Invalid),
    ]
}

fn node(i: u8) -> String {
    format!("n{i}")
}

/// The routes of every case: 0 poly, 1 unison on n0–n2, 2 mono, 3 MPE, 4 split n0 | n1–n3.
fn routes(unison: u8, prio: MonoPriority) -> Vec<ChannelRoute> {
    vec![
        ChannelRoute {
            channel: 1,
            unison,
            nodes: Some(vec![node(0), node(1), node(2)]),
            ..ChannelRoute::default()
        },
        ChannelRoute {
            channel: MONO_CH,
            mono: Some(prio),
            ..ChannelRoute::default()
        },
        ChannelRoute {
            channel: 3,
            mpe: true,
            bend_range_semitones: 48.0,
            ..ChannelRoute::default()
        },
        ChannelRoute {
            channel: 13,
            mpe: true,
            bend_range_semitones: 48.0,
            ..ChannelRoute::default()
        },
        ChannelRoute {
            channel: 14,
            mpe: true,
            bend_range_semitones: 48.0,
            ..ChannelRoute::default()
        },
        ChannelRoute {
            channel: 4,
            key_range: (0, 7),
            nodes: Some(vec![node(0)]),
            ..ChannelRoute::default()
        },
        ChannelRoute {
            channel: 4,
            key_range: (8, 127),
            nodes: Some(vec![node(1), node(2), node(3)]),
            ..ChannelRoute::default()
        },
    ]
}

fn eligible(c: u8, key: u8, n: &str) -> bool {
    match c {
        1 => n != node(3),
        4 if key < 8 => n == node(0),
        4 => n != node(0),
        _ => true,
    }
}

fn unison_of(c: u8, unison: u8) -> usize {
    if c == 1 { usize::from(unison) } else { 1 }
}

#[derive(Clone, Copy, Debug)]
struct Sounding {
    channel: u8,
    note: u8,
    velocity: u8,
    lease_until: ClusterTime,
}

/// What MIDI says about one poly key.
#[derive(Clone, Copy, Debug, Default)]
struct Key {
    down: bool,
    sounding: bool,
    latched: bool,
}

#[derive(Default)]
struct Midi {
    sustain: [bool; 16],
    sost: [bool; 16],
    keys: BTreeMap<(u8, u8), Key>,
    mono_stack: Vec<u8>,
    mono_sounding: bool,
    mono_latched: bool,
}

/// The MPE manager of a channel: 15 for the upper zone's members 13 and 14.
fn manager(c: u8) -> Option<u8> {
    matches!(c, 13 | 14).then_some(15)
}

/// Channels a message on `c` acts on.
fn scope(c: u8) -> Vec<u8> {
    if c == 15 { vec![13, 14, 15] } else { vec![c] }
}

impl Midi {
    /// (sustain, sostenuto) holding notes of channel `c`: its own or its manager's.
    fn pedals(&self, c: u8) -> (bool, bool) {
        let m = manager(c).unwrap_or(c);
        (
            self.sustain[usize::from(c)] || self.sustain[usize::from(m)],
            self.sost[usize::from(c)] || self.sost[usize::from(m)],
        )
    }

    fn settle(&mut self, c: u8) {
        for x in scope(c) {
            let (sus, sost) = self.pedals(x);
            for ((kc, _), k) in self.keys.iter_mut() {
                if *kc == x && k.sounding && !k.down && !sus && !(k.latched && sost) {
                    k.sounding = false;
                }
            }
        }
        let (sus, sost) = (self.sustain[usize::from(c)], self.sost[usize::from(c)]);
        if c == MONO_CH && self.mono_stack.is_empty() && !sus && !(self.mono_latched && sost) {
            self.mono_sounding = false;
        }
    }
}

struct World {
    a: VoiceAllocator,
    now: ClusterTime,
    caps: BTreeMap<String, u16>,
    load: HashMap<String, u16>,
    latency: HashMap<String, u64>,
    /// What each node plays, from the actions alone (lost nodes keep theirs until the lease).
    nodes: BTreeMap<(String, u16), Sounding>,
    midi: Midi,
    policy: Policy,
    /// The case's unison count (the most any note of channel 1 may hold).
    unison: u8,
    /// Channel 1's unison in force now.
    unison_now: u8,
    prio: MonoPriority,
}

type Held = BTreeMap<(String, u16), (u8, u8)>;

impl World {
    fn held(&self) -> Held {
        self.a
            .held_voices()
            .map(|h| ((h.node.to_owned(), h.voice), (h.channel, h.note)))
            .collect()
    }

    fn free(&self, n: &str) -> usize {
        let cap = self.caps.get(n).copied().unwrap_or(0);
        let used = self.nodes.keys().filter(|(m, _)| m == n).count();
        usize::from(cap).saturating_sub(used)
    }

    fn score(&self, n: &str) -> u64 {
        let cap = u64::from(self.caps[n].max(1));
        let used = self.nodes.keys().filter(|(m, _)| m == n).count() as u64;
        used * 1000 / cap + u64::from(self.load.get(n).copied().unwrap_or(0))
    }

    fn overloaded(&self, n: &str) -> bool {
        self.load.get(n).copied().unwrap_or(0) > OVERLOAD
    }

    /// Applies actions to the node model; `policy_key` = (channel, key) of a unison-1 note-on
    /// whose node choice is checked.
    fn apply(
        &mut self,
        actions: &[(String, Message)],
        policy_key: Option<(u8, u8)>,
        op_at: ClusterTime,
    ) -> Result<(), TestCaseError> {
        for (n, m) in actions {
            prop_assert!(
                self.caps.contains_key(n),
                "message to a lost node {n}: {m:?}"
            );
            match m {
                Message::VoiceOff(o) => {
                    prop_assert!(
                        self.nodes.remove(&(n.clone(), o.voice)).is_some(),
                        "off for a free voice {n}/{}",
                        o.voice
                    );
                }
                Message::VoiceOn(v) => {
                    prop_assert!(v.voice < self.caps[n], "voice beyond capacity");
                    prop_assert!(
                        !self.nodes.contains_key(&(n.clone(), v.voice)),
                        "voice double-booked {n}/{}",
                        v.voice
                    );
                    prop_assert!(eligible(v.channel, v.note, n) || v.channel == MONO_CH);
                    if let Some((c, key)) = policy_key
                        && v.at == op_at
                    {
                        self.check_policy(c, key, n)?;
                    }
                    self.nodes.insert(
                        (n.clone(), v.voice),
                        Sounding {
                            channel: v.channel,
                            note: v.note,
                            velocity: v.velocity,
                            lease_until: v.lease_until,
                        },
                    );
                }
                Message::VoiceParam(p) => {
                    prop_assert!(
                        self.nodes.contains_key(&(n.clone(), p.voice)),
                        "param to a free voice"
                    );
                    prop_assert!(p.value.is_finite());
                }
                Message::LeaseRenew(l) => {
                    for v in &l.voices {
                        let s = self.nodes.get_mut(&(n.clone(), *v));
                        prop_assert!(s.is_some(), "renewal of a free voice");
                        if let Some(s) = s {
                            prop_assert!(l.until >= s.lease_until);
                            s.lease_until = l.until;
                        }
                    }
                }
                other => prop_assert!(false, "unexpected {other:?}"),
            }
        }
        Ok(())
    }

    fn check_policy(&self, c: u8, key: u8, chosen: &str) -> Result<(), TestCaseError> {
        // The node model already holds every earlier voice of this op.
        let cands: Vec<&String> = self
            .caps
            .keys()
            .filter(|n| eligible(c, key, n) && self.free(n) > 0)
            .collect();
        let calm: Vec<&String> = cands
            .iter()
            .copied()
            .filter(|n| !self.overloaded(n))
            .collect();
        if !calm.is_empty() {
            prop_assert!(
                !self.overloaded(chosen),
                "overloaded {chosen} chosen over {calm:?}"
            );
        }
        let class: Vec<&String> = if calm.is_empty() { cands } else { calm };
        prop_assert!(
            class.iter().any(|n| *n == chosen),
            "{chosen} not a candidate"
        );
        match self.policy {
            Policy::RoundRobin => {}
            Policy::LeastLoaded => {
                let best = class.iter().map(|n| self.score(n)).min();
                prop_assert_eq!(Some(self.score(chosen)), best, "least-loaded");
            }
            Policy::LowestLatency => {
                let lat = |n: &str| self.latency.get(n).copied().unwrap_or(0);
                let best = class.iter().map(|n| lat(n)).min();
                prop_assert_eq!(Some(lat(chosen)), best, "lowest-latency");
            }
        }
        Ok(())
    }

    /// Nodes release voices whose lease ran out; the allocator must never still hold one.
    fn expire(&mut self) {
        let now = self.now;
        self.nodes.retain(|_, s| s.lease_until >= now);
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let held = self.held();
        let alive: Held = self
            .nodes
            .iter()
            .filter(|((n, _), _)| self.caps.contains_key(n))
            .map(|(k, s)| (k.clone(), (s.channel, s.note)))
            .collect();
        let held_keys: BTreeSet<_> = held.keys().collect();
        let alive_keys: BTreeSet<_> = alive.keys().collect();
        prop_assert_eq!(
            held_keys,
            alive_keys,
            "allocator and nodes disagree (lease ran out?)"
        );
        prop_assert_eq!(self.a.total_active(), held.len());
        for (n, cap) in &self.caps {
            let used = held.keys().filter(|(m, _)| m == n).count();
            prop_assert!(used <= usize::from(*cap));
            prop_assert_eq!(self.a.active_voices(n), used);
        }
        // No stuck notes: every held poly voice belongs to a key MIDI says sounds.
        let mut per_key: BTreeMap<(u8, u8), usize> = BTreeMap::new();
        for (c, note) in held.values() {
            if *c == MONO_CH {
                prop_assert!(self.midi.mono_sounding, "mono voice after its release");
                if let Some(t) = mono_target(self.prio, &self.midi.mono_stack) {
                    prop_assert_eq!(*note, t, "mono priority");
                }
                continue;
            }
            let k = self
                .midi
                .keys
                .get(&(*c, *note))
                .copied()
                .unwrap_or_default();
            prop_assert!(k.sounding, "stuck note ch {} key {}", c, note);
            *per_key.entry((*c, *note)).or_default() += 1;
        }
        let mono: BTreeSet<u8> = held
            .values()
            .filter(|(c, _)| *c == MONO_CH)
            .map(|x| x.1)
            .collect();
        prop_assert!(mono.len() <= 1, "mono channel plays {mono:?}");
        for ((c, _), n) in per_key {
            prop_assert!(
                n <= unison_of(c, self.unison),
                "more voices than the unison count"
            );
        }
        Ok(())
    }
}

fn mono_target(prio: MonoPriority, stack: &[u8]) -> Option<u8> {
    match prio {
        MonoPriority::Last => stack.last().copied(),
        MonoPriority::Low => stack.iter().copied().min(),
        MonoPriority::High => stack.iter().copied().max(),
    }
}

fn offs(actions: &[(String, Message)]) -> BTreeSet<(String, u16)> {
    actions
        .iter()
        .filter_map(|(n, m)| match m {
            Message::VoiceOff(o) => Some((n.clone(), o.voice)),
            _ => None,
        })
        .collect()
}

fn to_vec(a: &mut VoiceAllocator, now: ClusterTime, ev: MidiEvent) -> Vec<(String, Message)> {
    a.handle_midi(now, ev)
        .map(|(n, m)| (n.to_string(), m))
        .collect()
}

fn run(
    ops: Vec<Op>,
    caps0: [u16; 4],
    unison: u8,
    prio: MonoPriority,
    policy: Policy,
) -> Result<(), TestCaseError> {
    let cfg = AllocatorConfig {
        policy,
        overload_permille: OVERLOAD,
        lookahead_ns: LOOKAHEAD,
        routes: routes(unison, prio),
        ..AllocatorConfig::default()
    };
    let mut w = World {
        a: VoiceAllocator::new(cfg),
        now: ClusterTime(1_000_000_000),
        caps: BTreeMap::new(),
        load: HashMap::new(),
        latency: HashMap::new(),
        nodes: BTreeMap::new(),
        midi: Midi::default(),
        policy,
        unison,
        unison_now: unison,
        prio,
    };
    for (i, c) in caps0.iter().enumerate() {
        let _ = w.a.add_node(&node(i as u8), *c);
        w.caps.insert(node(i as u8), *c);
    }
    for op in ops {
        w.now = ClusterTime(w.now.0 + 1_000_000);
        let now = w.now;
        let at = ClusterTime(now.0 + LOOKAHEAD);
        let before = w.held();
        match op {
            Op::On(c, n, v) => {
                let acts = to_vec(
                    &mut w.a,
                    now,
                    MidiEvent::NoteOn {
                        channel: c,
                        note: n,
                        velocity: v,
                    },
                );
                let policy_key = (c != 1 && c != MONO_CH).then_some((c, n));
                w.apply(&acts, policy_key, at)?;
                let ons: Vec<_> = acts
                    .iter()
                    .filter_map(|(_, m)| match m {
                        Message::VoiceOn(o) => Some(*o),
                        _ => None,
                    })
                    .collect();
                if c == MONO_CH {
                    let was = w.midi.mono_sounding;
                    w.midi.mono_stack.retain(|&k| k != n);
                    w.midi.mono_stack.push(n);
                    if !was {
                        w.midi.mono_sounding = true;
                        w.midi.mono_latched = false;
                        prop_assert!(ons.len() <= 1);
                    } else {
                        prop_assert!(
                            ons.is_empty() || !before.values().any(|(bc, _)| *bc == MONO_CH),
                            "legato line restarted"
                        );
                    }
                } else {
                    let cap: usize = w
                        .caps
                        .iter()
                        .filter(|(m, _)| eligible(c, n, m))
                        .map(|(_, c)| usize::from(*c))
                        .sum();
                    prop_assert_eq!(
                        ons.len(),
                        unison_of(c, w.unison_now).min(cap),
                        "unison count"
                    );
                    for o in &ons {
                        prop_assert_eq!((o.channel, o.note, o.velocity), (c, n, v));
                    }
                    w.midi.keys.insert(
                        (c, n),
                        Key {
                            down: true,
                            sounding: true,
                            latched: false,
                        },
                    );
                }
            }
            Op::Off(c, n) => {
                let acts = to_vec(
                    &mut w.a,
                    now,
                    MidiEvent::NoteOff {
                        channel: c,
                        note: n,
                        velocity: 0,
                    },
                );
                w.apply(&acts, None, at)?;
                if c == MONO_CH {
                    w.midi.mono_stack.retain(|&k| k != n);
                    w.midi.settle(c);
                } else {
                    let was = w.midi.keys.get(&(c, n)).copied().unwrap_or_default();
                    if let Some(k) = w.midi.keys.get_mut(&(c, n)) {
                        k.down = false;
                    }
                    w.midi.settle(c);
                    let now_s = w
                        .midi
                        .keys
                        .get(&(c, n))
                        .copied()
                        .unwrap_or_default()
                        .sounding;
                    let expect: BTreeSet<_> = if was.sounding && !now_s {
                        before
                            .iter()
                            .filter(|(_, v)| **v == (c, n))
                            .map(|(k, _)| k.clone())
                            .collect()
                    } else {
                        BTreeSet::new()
                    };
                    prop_assert_eq!(
                        offs(&acts),
                        expect,
                        "note-off frees exactly what its note-on took"
                    );
                }
            }
            Op::Sustain(c, d) | Op::Sostenuto(c, d) => {
                let sus = matches!(op, Op::Sustain(..));
                let acts = to_vec(
                    &mut w.a,
                    now,
                    MidiEvent::ControlChange {
                        channel: c,
                        controller: if sus { 64 } else { 66 },
                        value: if d { 127 } else { 0 },
                    },
                );
                w.apply(&acts, None, at)?;
                let ci = usize::from(c);
                let sounding_before: BTreeSet<(u8, u8)> = w
                    .midi
                    .keys
                    .iter()
                    .filter(|(_, k)| k.sounding)
                    .map(|(k, _)| *k)
                    .collect();
                if sus {
                    w.midi.sustain[ci] = d;
                } else {
                    if d && !w.midi.sost[ci] {
                        for ((kc, _), k) in w.midi.keys.iter_mut() {
                            if scope(c).contains(kc) && k.down {
                                k.latched = true;
                            }
                        }
                        if c == MONO_CH && !w.midi.mono_stack.is_empty() {
                            w.midi.mono_latched = true;
                        }
                    }
                    let was = w.midi.sost[ci];
                    w.midi.sost[ci] = d;
                    if was && !d {
                        let down: Vec<u8> = scope(c)
                            .into_iter()
                            .filter(|&x| w.midi.pedals(x).1)
                            .collect();
                        for ((kc, _), k) in w.midi.keys.iter_mut() {
                            if scope(c).contains(kc) && !down.contains(kc) {
                                k.latched = false;
                            }
                        }
                        if c == MONO_CH {
                            w.midi.mono_latched = false;
                        }
                    }
                    w.midi.sost[ci] = d;
                }
                w.midi.settle(c);
                if c != MONO_CH {
                    let ended: BTreeSet<(u8, u8)> = sounding_before
                        .into_iter()
                        .filter(|k| !w.midi.keys[k].sounding)
                        .collect();
                    let expect: BTreeSet<_> = before
                        .iter()
                        .filter(|(_, v)| ended.contains(v))
                        .map(|(k, _)| k.clone())
                        .collect();
                    prop_assert_eq!(
                        offs(&acts),
                        expect,
                        "pedal release frees exactly the unheld notes"
                    );
                }
            }
            Op::Bend(c, v) => {
                let acts = to_vec(
                    &mut w.a,
                    now,
                    MidiEvent::PitchBend {
                        channel: c,
                        value: v,
                    },
                );
                w.apply(&acts, None, at)?;
                prop_assert_eq!(
                    acts.len(),
                    before.values().filter(|x| scope(c).contains(&x.0)).count(),
                    "bend to every voice of the channel"
                );
            }
            Op::Pressure(c, v) => {
                let acts = to_vec(
                    &mut w.a,
                    now,
                    MidiEvent::ChannelPressure {
                        channel: c,
                        value: v,
                    },
                );
                w.apply(&acts, None, at)?;
                prop_assert_eq!(
                    acts.len(),
                    before.values().filter(|x| scope(c).contains(&x.0)).count()
                );
            }
            Op::Timbre(c, v) => {
                let acts = to_vec(
                    &mut w.a,
                    now,
                    MidiEvent::ControlChange {
                        channel: c,
                        controller: 74,
                        value: v,
                    },
                );
                w.apply(&acts, None, at)?;
                prop_assert_eq!(
                    acts.len(),
                    before.values().filter(|x| scope(c).contains(&x.0)).count()
                );
            }
            Op::Poly(c, n, v) => {
                let acts = to_vec(
                    &mut w.a,
                    now,
                    MidiEvent::PolyPressure {
                        channel: c,
                        note: n,
                        value: v,
                    },
                );
                w.apply(&acts, None, at)?;
                prop_assert_eq!(
                    acts.len(),
                    before.values().filter(|x| **x == (c, n)).count()
                );
            }
            Op::Lost(i) => {
                let id = node(i);
                let acts = w.a.node_lost(now, &id);
                let lost: Vec<(u8, u8)> = before
                    .iter()
                    .filter(|((n, _), _)| *n == id)
                    .map(|(_, v)| *v)
                    .collect();
                let was_alive = w.caps.remove(&id).is_some();
                prop_assert!(was_alive || acts.is_empty());
                let room: usize = w.caps.keys().map(|n| w.free(n)).sum();
                w.apply(&acts, None, at)?;
                let ons: Vec<_> = acts
                    .iter()
                    .filter_map(|(_, m)| match m {
                        Message::VoiceOn(o) => Some(*o),
                        _ => None,
                    })
                    .collect();
                prop_assert!(ons.len() <= lost.len());
                for o in &ons {
                    prop_assert_eq!(o.at, at, "re-spawned at the next possible time");
                    prop_assert!(
                        lost.contains(&(o.channel, o.note)),
                        "re-spawned something that was not lost"
                    );
                }
                let all_nodes = lost.iter().all(|(c, _)| matches!(*c, 0 | MONO_CH | 3));
                if all_nodes && room >= lost.len() {
                    prop_assert_eq!(ons.len(), lost.len(), "every lost voice re-spawned");
                }
                // The velocity is the note's own.
                for o in &ons {
                    let orig = w
                        .nodes
                        .iter()
                        .find(|((n, _), s)| *n == id && s.channel == o.channel && s.note == o.note);
                    if let Some((_, s)) = orig
                        && o.channel != MONO_CH
                    {
                        prop_assert_eq!(s.velocity, o.velocity);
                    }
                }
            }
            Op::Add(i, v) => {
                let id = node(i);
                let _ = w.a.add_node(&id, v);
                // A (re)joining node starts with a fresh session: nothing sounding.
                w.nodes.retain(|(n, _), _| *n != id);
                w.caps.insert(id.clone(), v);
                w.load.remove(&id);
            }
            Op::Load(i, l) => {
                w.a.set_node_load(&node(i), l);
                if w.caps.contains_key(&node(i)) {
                    w.load.insert(node(i), l);
                }
            }
            Op::Latency(i, l) => {
                w.a.set_node_latency(&node(i), l);
                w.latency.insert(node(i), l);
            }
            Op::SetPolicy(p) => {
                let p = [
                    Policy::RoundRobin,
                    Policy::LeastLoaded,
                    Policy::LowestLatency,
                ][usize::from(p)];
                w.a.set_policy(p);
                w.policy = p;
            }
            Op::SetSteal(s) => {
                w.a.set_steal(
                    [StealMode::Oldest, StealMode::Quietest, StealMode::SameNote][usize::from(s)],
                );
            }
            Op::Panic => {
                let acts = w.a.panic(now);
                w.apply(&acts, None, at)?;
                prop_assert_eq!(offs(&acts).len(), before.len());
                w.midi = Midi::default();
            }
            Op::ToggleUnison => {
                w.unison_now = if w.unison_now == unison { 1 } else { unison };
                w.a.set_routes(routes(w.unison_now, prio));
            }
            Op::SameRoutes => {
                w.a.set_routes(routes(w.unison_now, prio));
            }
            Op::Advance(dt) => {
                let target = ClusterTime(now.0 + dt);
                while let Some(t) = w.a.poll_timeout() {
                    if t > target {
                        break;
                    }
                    w.now = ClusterTime(w.now.0.max(t.0));
                    w.expire();
                    w.check()?;
                    let acts = w.a.renewals(w.now);
                    w.apply(&acts, None, at)?;
                    prop_assert!(w.a.poll_timeout().is_none_or(|t| t > w.now));
                }
                w.now = target;
            }
            Op::Invalid(k) => {
                let before_stats = w.a.stats().invalid;
                let ev = match k {
                    0 => MidiEvent::NoteOn {
                        channel: 16,
                        note: 1,
                        velocity: 1,
                    },
                    1 => MidiEvent::NoteOn {
                        channel: 0,
                        note: 128,
                        velocity: 1,
                    },
                    2 => MidiEvent::PitchBend {
                        channel: 0,
                        value: 8192,
                    },
                    _ => MidiEvent::ControlChange {
                        channel: 0,
                        controller: 64,
                        value: 200,
                    },
                };
                let acts = to_vec(&mut w.a, now, ev);
                prop_assert!(acts.is_empty());
                prop_assert_eq!(w.a.stats().invalid, before_stats + 1);
            }
        }
        w.expire();
        w.check()?;
    }
    Ok(())
}

fn prio() -> impl Strategy<Value = MonoPriority> {
    prop_oneof![
        Just(MonoPriority::Last),
        Just(MonoPriority::Low),
        Just(MonoPriority::High)
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::RoundRobin),
        Just(Policy::LeastLoaded),
        Just(Policy::LowestLatency)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn allocator_matches_the_reference(
        ops in proptest::collection::vec(op(), 1..200),
        caps in proptest::array::uniform4(0u16..6),
        unison in 1u8..4,
        prio in prio(),
        policy in policy(),
    ) {
        run(ops, caps, unison, prio, policy)?;
    }
}
