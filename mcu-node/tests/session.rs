//! The MCU session over datagrams: join, heartbeats, time sync, reports, version check,
//! duplicates and replays, coordinator restart.

mod common;

use common::{Rig, T0, assign};
use voicemesh_mcu::DacSpec;
use voicemesh_protocol::datagram::DATAGRAM_HEADER_LEN;
use voicemesh_protocol::{
    ClusterTime, CvFunction, ErrorCode, Heartbeat, Message, Role, TimeSync, Timeline, VoiceOn,
    Welcome,
};

const MS: u64 = 1_000_000;

fn welcome() -> Message {
    Message::Welcome(Welcome {
        coordinator: "c".try_into().unwrap(),
        heartbeat_ms: 100,
        lease_ms: 1000,
        timeline: Timeline::from_milli_bpm(120_000, ClusterTime(T0)),
    })
}

#[test]
fn heartbeat_hello_welcome_then_heartbeats_time_sync_and_reports() {
    let mut r = Rig::new(&[DacSpec::VIRTUAL_5V, DacSpec::MCP4728_4V096], 4);
    // Nothing is sent before a coordinator shows up.
    r.run_until(common::Rig::local(T0 + 300 * MS));
    assert!(r.sent.is_empty());
    r.send(Message::Heartbeat(Heartbeat {
        seq: 0,
        now: ClusterTime(T0),
    }));
    let Some(Message::Hello(h)) = r.sent.last() else {
        panic!("{:?}", r.sent)
    };
    assert_eq!(
        (h.role, h.cv, h.voices, h.id.as_str()),
        (Role::Mcu, 12, 4, "t41")
    );
    // Events before the Welcome are ignored.
    r.send(Message::CvAssign(assign(0, CvFunction::Gate)));
    assert_eq!(
        r.node.engine().assignment(0).unwrap().function,
        CvFunction::Direct
    );
    r.send(welcome());
    assert!(r.node.joined());
    let start = r.now;
    r.sent.clear();
    r.run_until(start.add_nanos(1_000 * MS));
    let count = |k: &str| r.sent.iter().filter(|m| m.kind() == k).count();
    assert_eq!(count("heartbeat"), 10, "every 100 ms: {:?}", r.sent);
    assert_eq!(count("time_sync"), 10);
    assert!(count("cv_report") >= 10);
    // Heartbeats carry cluster time and count up.
    let hbs: Vec<Heartbeat> = r
        .sent
        .iter()
        .filter_map(|m| match m {
            Message::Heartbeat(h) => Some(*h),
            _ => None,
        })
        .collect();
    assert!(hbs.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    assert!(hbs.windows(2).all(|w| w[1].now.0 - w[0].now.0 == 100 * MS));
}

#[test]
fn time_sync_answers_discipline_the_clock() {
    let mut r = Rig::joined(&[DacSpec::VIRTUAL_5V], 1);
    // The MCU believes cluster = local + T0; the coordinator's clock is 300 µs ahead of that
    // and the network takes 50 µs each way.
    for _ in 0..40 {
        r.sent.clear();
        // Run to the next heartbeat, which sends the request.
        let req = loop {
            let t = r.node.poll_timeout();
            r.run_until(t);
            if let Some(ts) = r.sent.iter().find_map(|m| match m {
                Message::TimeSync(ts) => Some(*ts),
                _ => None,
            }) {
                break ts;
            }
        };
        assert_eq!(req.origin, r.now.0);
        let receive = ClusterTime(req.origin + T0 + 300_000 + 50_000);
        r.now = r.now.add_nanos(100_000 + 10_000);
        r.send(Message::TimeSync(TimeSync {
            origin: req.origin,
            receive,
            transmit: ClusterTime(receive.0 + 10_000),
        }));
    }
    let err = r.node.cluster_time(r.now).0 as i64 - (r.now.0 + T0 + 300_000) as i64;
    assert!(err.abs() < 2_000, "{err} ns");
    assert!(r.node.servo().locked());
    let rep = r.node.report(r.now);
    assert!(rep.clock_locked);
}

#[test]
fn another_major_version_gets_an_error_back() {
    let mut r = Rig::new(&[DacSpec::VIRTUAL_5V], 1);
    let mut d = r.datagram(&Message::Heartbeat(Heartbeat {
        seq: 0,
        now: ClusterTime(T0),
    }));
    d[DATAGRAM_HEADER_LEN + 4] = 2;
    let got = r.node.handle_datagram(r.now, &d);
    assert!(got.from_coordinator && !got.accepted);
    r.drain();
    match r.sent.last() {
        Some(Message::Error(e)) => {
            assert_eq!(e.code, ErrorCode::VersionMismatch);
            assert!(e.text.contains("peer 2.x"), "{}", e.text);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.node.stats().version_mismatches, 1);
    assert!(!r.node.joined());
}

#[test]
fn duplicates_replays_and_garbage_are_dropped_and_counted() {
    let mut r = Rig::joined(&[DacSpec::VIRTUAL_5V], 2);
    r.send(Message::CvAssign(assign(2, CvFunction::Trigger)));
    let t = T0 + 50 * MS;
    let on = Message::VoiceOn(VoiceOn {
        voice: 0,
        note: 60,
        velocity: 100,
        channel: 0,
        at: ClusterTime(t),
        lease_until: ClusterTime(t + 500 * MS),
    });
    let d = r.datagram(&on);
    r.deliver(&d);
    r.deliver(&d); // a duplicate
    let old: Vec<Vec<u8>> = (0..70)
        .map(|_| {
            r.datagram(&Message::Heartbeat(Heartbeat {
                seq: 1,
                now: ClusterTime(T0),
            }))
        })
        .collect();
    r.deliver(&old[69]);
    r.deliver(&old[0]); // 69 behind: outside the window
    r.deliver(&old[40]); // reordered, inside the window
    r.deliver(b"not a datagram at all");
    r.run_until(Rig::local(t + 50 * MS));
    let c = r.node.report(r.now).rx;
    assert_eq!(c.duplicates, 1, "{c:?}");
    assert_eq!(c.replays, 1, "{c:?}");
    assert_eq!(c.reordered, 1, "{c:?}");
    assert_eq!(c.malformed, 1, "{c:?}");
    assert_eq!(c.gaps, 68, "{c:?}");
    // The duplicated note fired one trigger, not two.
    let highs = r.changes(2).iter().filter(|c| c.1 > 0).count();
    assert_eq!(highs, 1);
}

#[test]
fn a_restarted_coordinator_is_joined_again() {
    let mut r = Rig::joined(&[DacSpec::VIRTUAL_5V], 1);
    assert_eq!(r.node.stats().joins, 1);
    r.session = 78;
    r.seq = 0;
    r.sent.clear();
    r.send(Message::Heartbeat(Heartbeat {
        seq: 0,
        now: ClusterTime(T0 + r.now.0),
    }));
    assert!(
        matches!(r.sent.first(), Some(Message::Hello(_))),
        "{:?}",
        r.sent
    );
    assert!(!r.node.joined());
    r.send(welcome());
    assert!(r.node.joined());
    assert_eq!(r.node.stats().joins, 2);
}

#[test]
fn a_welcome_under_a_new_session_joins_at_once() {
    // A duplicate Hello (a probe crossed the first Welcome) makes the coordinator open a new
    // session and send its Welcome straight away: the node joins it, sends no new Hello, and
    // the coordinator sees no restart (otherwise both ends re-join each other forever).
    let mut r = Rig::joined(&[DacSpec::VIRTUAL_5V], 1);
    r.session = 79;
    r.seq = 0;
    r.sent.clear();
    r.send(welcome());
    assert!(r.node.joined());
    assert_eq!(r.node.stats().joins, 2);
    r.send(Message::Heartbeat(Heartbeat {
        seq: 1,
        now: ClusterTime(T0 + r.now.0),
    }));
    assert!(
        !r.sent.iter().any(|m| matches!(m, Message::Hello(_))),
        "{:?}",
        r.sent
    );
}

#[test]
fn an_event_for_an_unknown_channel_or_voice_is_refused_not_fatal() {
    let mut r = Rig::joined(&[DacSpec::VIRTUAL_5V], 1);
    r.send(Message::CvAssign(assign(40, CvFunction::Gate)));
    r.send(Message::VoiceOn(VoiceOn {
        voice: 9,
        note: 60,
        velocity: 100,
        channel: 0,
        at: ClusterTime(T0),
        lease_until: ClusterTime(T0 + MS),
    }));
    let mut bad = assign(0, CvFunction::Pitch);
    bad.calibration = common::cal(&[(1_000_000, 10), (0, 20)]);
    r.send(Message::CvAssign(bad));
    assert_eq!(r.node.stats().refused, 3);
    assert!(r.node.joined());
}
