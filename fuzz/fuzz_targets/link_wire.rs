//! Link datagrams: decode → encode → decode must agree, and the sans-IO peer must survive any
//! datagram on any socket (no panic, no overflow). The Link modules are compiled in by path so
//! the fuzz build does not pull in the coordinator's tokio/quinn/axum stack.
#![no_main]

#[path = "../../coordinator/src/link/peer.rs"]
#[allow(dead_code)]
mod peer;
#[path = "../../coordinator/src/link/wire.rs"]
#[allow(dead_code)]
mod wire;

use libfuzzer_sys::fuzz_target;
use std::net::SocketAddrV4;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = wire::parse_discovery(data) {
        if let Some(st) = d.state {
            let again = wire::encode_discovery(d.kind, d.ttl, d.node, &st);
            let d2 = wire::parse_discovery(&again).expect("our own encoding parses");
            assert_eq!(d2.state, Some(st));
            assert_eq!((d2.kind, d2.node), (d.kind, d.node));
            let _ = st.timeline.beats_at(i64::MAX);
            let _ = st.timeline.time_at(i64::MIN);
        }
    }
    if let Ok(m) = wire::parse_measurement(data)
        && m.kind == wire::MeasurementKind::Ping
        && let Some(ht) = m.host_time
    {
        let again = wire::encode_ping(ht, m.prev_ghost_time);
        let m2 = wire::parse_measurement(&again).expect("our own encoding parses");
        assert_eq!((m2.host_time, m2.prev_ghost_time), (Some(ht), m.prev_ghost_time));
    }
    // The same bytes on every socket of a running peer, at odd times.
    let src: SocketAddrV4 = "10.0.0.2:20808".parse().unwrap();
    let mut p = peer::LinkPeer::new(1_000, 7, 120.0, 0);
    p.add_gateway(1_000, 0, "10.0.0.1:1".parse().unwrap());
    for now in [2_000, 60_000_000, i64::MAX / 2] {
        p.handle_discovery(now, 0, src, data);
        p.handle_measurement(now, 0, src, data);
        p.handle_timeout(now);
        while p.poll_transmit().is_some() {}
        let _ = p.phase_at_host(now, 4_000_000);
        let _ = p.start_stop_host_time();
    }
});
