//! Named regression tests: every allocator bug the model test (alloc_model.rs) found, as the
//! shrunk sequence that showed it.

use voicemesh_coordinator::allocator::{
    AllocatorConfig, ChannelRoute, MidiEvent, MonoPriority, VoiceAllocator,
};
use voicemesh_protocol::{ClusterTime, Message};

const T: ClusterTime = ClusterTime(1_000_000_000);

fn mono_route() -> ChannelRoute {
    ChannelRoute {
        channel: 2,
        mono: Some(MonoPriority::Last),
        ..ChannelRoute::default()
    }
}

fn one_node(routes: Vec<ChannelRoute>) -> VoiceAllocator {
    let mut a = VoiceAllocator::new(AllocatorConfig {
        routes,
        ..AllocatorConfig::default()
    });
    let _ = a.add_node("n0", 4);
    a
}

fn count(actions: &[(String, Message)], f: fn(&Message) -> bool) -> usize {
    actions.iter().filter(|(_, m)| f(m)).count()
}

/// Model sequence `On(2,0) SameRoutes On(2,0)`: putting the same routes again (an HTTP PUT of
/// unchanged routing) detached the held mono line, so the next key started a second voice on a
/// mono channel.
#[test]
fn reapplying_routes_keeps_the_mono_line() {
    let mut a = one_node(vec![mono_route()]);
    let _ = a.note_on(T, 60, 100, 2);
    a.set_routes(vec![mono_route()]);
    let act = a.note_on(T, 62, 100, 2);
    assert_eq!(
        count(&act, |m| matches!(m, Message::VoiceOn(_))),
        0,
        "{act:?}"
    );
    assert_eq!(a.total_active(), 1);
    let _ = a.note_off(T, 62, 2);
    let act = a.note_off(T, 60, 2);
    assert_eq!(count(&act, |m| matches!(m, Message::VoiceOff(_))), 1);
    assert_eq!(a.total_active(), 0);
}

/// Companion of the above: a mono line whose route really changed keeps sounding, detached,
/// and the key of its current pitch still ends it (no stuck note).
#[test]
fn detached_mono_line_ends_with_its_key() {
    let mut a = one_node(vec![mono_route()]);
    let _ = a.note_on(T, 60, 100, 2);
    let _ = a.note_on(T, 64, 100, 2);
    a.set_routes(Vec::new());
    let _ = a.note_off(T, 60, 2);
    assert_eq!(a.total_active(), 1);
    let act = a.note_off(T, 64, 2);
    assert_eq!(count(&act, |m| matches!(m, Message::VoiceOff(_))), 1);
    assert_eq!(a.total_active(), 0);
}

/// A note-off for a key whose route was replaced still releases what its note-on took.
#[test]
fn note_started_under_old_routes_is_released_by_its_key() {
    let mut a = one_node(vec![ChannelRoute {
        channel: 0,
        unison: 2,
        ..ChannelRoute::default()
    }]);
    let _ = a.note_on(T, 60, 100, 0);
    a.set_routes(vec![ChannelRoute {
        channel: 0,
        key_range: (70, 80),
        ..ChannelRoute::default()
    }]);
    let act = a.note_off(T, 60, 0);
    assert_eq!(count(&act, |m| matches!(m, Message::VoiceOff(_))), 2);
    assert_eq!(a.total_active(), 0);
}

/// A lost node gets no renewals and no re-spawns, and a note-off after failover releases the
/// re-spawned voice, not the lost one.
#[test]
fn nothing_goes_to_a_lost_node() {
    let mut a = VoiceAllocator::new(AllocatorConfig::default());
    let _ = a.add_node("a", 1);
    let _ = a.add_node("b", 1);
    let _ = a.note_on(T, 60, 100, 0);
    let _ = a.note_on(T, 62, 100, 0);
    let _ = a.handle_midi(
        T,
        MidiEvent::ControlChange {
            channel: 0,
            controller: 64,
            value: 127,
        },
    );
    let lost = a
        .voice_of(60, 0)
        .map(|(n, _)| n.to_owned())
        .expect("60 held");
    let act = a.node_lost(T, &lost);
    assert!(act.iter().all(|(n, _)| *n != lost));
    let due = a.poll_timeout().expect("held");
    assert!(a.renewals(due).iter().all(|(n, _)| *n != lost));
    assert!(a.panic(T).iter().all(|(n, _)| *n != lost));
}

/// Model sequence `On(1,0) ToggleUnison Add(n3) Lost(n1)`: a note detached by a route change
/// was re-spawned on any node, outside its channel's node group. It now re-spawns where the
/// current route of its key allows.
#[test]
fn respawn_of_a_detached_note_keeps_to_its_channels_group() {
    let group = |unison| ChannelRoute {
        channel: 1,
        unison,
        nodes: Some(vec!["n0".into(), "n1".into()]),
        ..ChannelRoute::default()
    };
    let mut a = VoiceAllocator::new(AllocatorConfig {
        routes: vec![group(1)],
        ..AllocatorConfig::default()
    });
    let _ = a.add_node("n1", 2);
    let _ = a.note_on(T, 60, 100, 1);
    a.set_routes(vec![group(2)]);
    let _ = a.add_node("outside", 2);
    let _ = a.add_node("n0", 2);
    let act = a.node_lost(T, "n1");
    let ons: Vec<&String> = act
        .iter()
        .filter(|(_, m)| matches!(m, Message::VoiceOn(_)))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(ons, vec!["n0"]);
}
