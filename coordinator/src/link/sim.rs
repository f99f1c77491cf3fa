//! Deterministic simulation of several Link peers (CONVENTIONS.md §5): true time is an i64 of
//! µs, every peer sees its own host clock (a large offset), links have latency, jitter and
//! loss, one seed drives everything and is printed on failure, and the world jumps from one
//! deadline or delivery to the next.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{Ipv4Addr, SocketAddrV4};

use super::peer::{DISCOVERY_PORT, MULTICAST_GROUP, SocketKind, TTL_S};
use super::*;

const DISC_PORT: u16 = 40_000;
const MEAS_PORT: u16 = 41_000;
const S: i64 = 1_000_000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 > p
    }
}

struct SimPeer {
    core: Option<LinkPeer>,
    /// host = true + offset
    offset: i64,
    ip: Ipv4Addr,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Delivery {
    at: i64,
    seq: u64,
    to: usize,
    measurement: bool,
    src: SocketAddrV4,
    payload: Vec<u8>,
}

struct World {
    seed: u64,
    rng: Rng,
    now: i64,
    peers: Vec<SimPeer>,
    queue: BinaryHeap<Reverse<Delivery>>,
    seq: u64,
    latency: i64,
    jitter: i64,
    loss: f64,
}

impl World {
    fn new(seed: u64, jitter: i64, loss: f64) -> Self {
        World {
            seed,
            rng: Rng(seed),
            now: 0,
            peers: Vec::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            latency: 100,
            jitter,
            loss,
        }
    }

    /// Starts a peer now with a random host-clock offset; returns its index.
    fn spawn(&mut self, bpm: f64) -> usize {
        let i = self.peers.len();
        let offset = (self.rng.below(2_000_000_000) as i64) - 1_000_000_000 + 5_000_000_000;
        let ip = Ipv4Addr::new(10, 0, 0, i as u8 + 1);
        let host = self.now + offset;
        let mut core = LinkPeer::new(host, self.rng.next(), bpm, 0);
        core.add_gateway(host, 0, SocketAddrV4::new(ip, MEAS_PORT));
        self.peers.push(SimPeer {
            core: Some(core),
            offset,
            ip,
        });
        self.flush(i);
        i
    }

    fn host(&self, i: usize) -> i64 {
        self.now + self.peers[i].offset
    }

    fn core(&self, i: usize) -> &LinkPeer {
        self.peers[i].core.as_ref().expect("peer running")
    }

    fn core_mut(&mut self, i: usize) -> &mut LinkPeer {
        self.peers[i].core.as_mut().expect("peer running")
    }

    fn send(&mut self, to: usize, measurement: bool, src: SocketAddrV4, payload: Vec<u8>) {
        if !self.rng.chance(self.loss) {
            return;
        }
        let at = self.now + self.latency + self.rng.below(self.jitter as u64 + 1) as i64;
        self.seq += 1;
        self.queue.push(Reverse(Delivery {
            at,
            seq: self.seq,
            to,
            measurement,
            src,
            payload,
        }));
    }

    /// Routes what peer `i` wants to send.
    fn flush(&mut self, i: usize) {
        while let Some(t) = self.peers[i].core.as_mut().and_then(|c| c.poll_transmit()) {
            let ip = self.peers[i].ip;
            let src_port = match t.socket {
                SocketKind::Discovery => DISC_PORT,
                SocketKind::Measurement => MEAS_PORT,
            };
            let src = SocketAddrV4::new(ip, src_port);
            if *t.dst.ip() == MULTICAST_GROUP {
                assert_eq!(t.dst.port(), DISCOVERY_PORT);
                for j in 0..self.peers.len() {
                    if j != i {
                        self.send(j, false, src, t.payload.clone());
                    }
                }
            } else if let Some(j) = self.peers.iter().position(|p| p.ip == *t.dst.ip()) {
                self.send(j, t.dst.port() == MEAS_PORT, src, t.payload);
            }
        }
    }

    fn run_until(&mut self, end: i64) {
        loop {
            let next_delivery = self.queue.peek().map(|d| d.0.at);
            let next_timer = (0..self.peers.len())
                .filter_map(|i| {
                    let p = &self.peers[i];
                    p.core.as_ref()?.poll_timeout().map(|h| h - p.offset)
                })
                .min();
            let next = match (next_delivery, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(end),
            }
            .max(self.now);
            if next > end {
                self.now = end;
                return;
            }
            self.now = next;
            while self.queue.peek().is_some_and(|d| d.0.at <= self.now) {
                let Reverse(d) = self.queue.pop().unwrap();
                let host = self.host(d.to);
                if let Some(c) = self.peers[d.to].core.as_mut() {
                    if d.measurement {
                        c.handle_measurement(host, 0, d.src, &d.payload);
                    } else {
                        c.handle_discovery(host, 0, d.src, &d.payload);
                    }
                }
                self.flush(d.to);
            }
            for i in 0..self.peers.len() {
                let host = self.host(i);
                if let Some(c) = self.peers[i].core.as_mut()
                    && c.poll_timeout().is_some_and(|t| t <= host)
                {
                    c.handle_timeout(host);
                }
                self.flush(i);
            }
        }
    }

    fn run_for(&mut self, d: i64) {
        self.run_until(self.now + d);
    }

    /// Session beats (µbeats) of peer `i` at the current true time.
    fn beats(&self, i: usize) -> i64 {
        self.core(i).beats_at_host(self.host(i))
    }

    fn running(&self) -> Vec<usize> {
        (0..self.peers.len())
            .filter(|&i| self.peers[i].core.is_some())
            .collect()
    }

    /// Asserts every running peer is in one session with one timeline, and that their beats
    /// at this true instant agree within `tol` µbeats; returns the session.
    fn assert_agree(&self, tol: i64) -> SessionId {
        let run = self.running();
        let s0 = self.core(run[0]).session_id();
        let tl0 = self.core(run[0]).timeline();
        let b0 = self.beats(run[0]);
        for &i in &run {
            let c = self.core(i);
            assert_eq!(c.session_id(), s0, "seed {}: peer {i} session", self.seed);
            assert_eq!(c.timeline(), tl0, "seed {}: peer {i} timeline", self.seed);
            let d = (self.beats(i) - b0).abs();
            assert!(
                d <= tol,
                "seed {}: peer {i} beats off by {d} µbeats",
                self.seed
            );
            assert_eq!(
                c.peer_count(),
                run.len() - 1,
                "seed {}: peer {i} count",
                self.seed
            );
        }
        s0
    }
}

/// 0.1 ms worth of beats at 120 BPM, in µbeats.
const TOL_0_1_MS: i64 = 200;

#[test]
fn peers_converge_on_the_oldest_session_despite_offsets_jitter_and_loss() {
    for seed in 0..30 {
        let mut w = World::new(seed, 300, 0.02);
        let first = w.spawn(120.0);
        let founder = w.core(first).session_id();
        for _ in 0..3 {
            let gap = 600_000 + w.rng.below(400_000) as i64;
            w.run_for(gap);
            let bpm = 90.0 + w.rng.below(60) as f64;
            w.spawn(bpm);
        }
        w.run_for(6 * S);
        let s = w.assert_agree(TOL_0_1_MS);
        assert_eq!(s, founder, "seed {seed}: the first founder's session wins");
        assert_eq!(w.core(0).timeline().bpm(), 120.0, "seed {seed}");
        // The joiners re-measure every 30 s (a measurement may fail on a lossy link; then it is
        // retried 30 s later) and stay in agreement.
        let tries = |w: &World| -> u64 {
            (1..4)
                .map(|i| w.core(i).stats())
                .map(|s| s.measurements_ok + s.measurements_failed)
                .sum()
        };
        let before = tries(&w);
        w.run_for(31 * S);
        let after = tries(&w);
        assert!(
            after >= before + 3,
            "seed {seed}: re-measured {before} → {after}"
        );
        w.assert_agree(TOL_0_1_MS);
    }
}

#[test]
fn sessions_founded_within_500_ms_go_to_the_smaller_id() {
    for seed in 0..30 {
        let mut w = World::new(seed, 100, 0.0);
        let a = w.spawn(120.0);
        let gap = w.rng.below(400_000) as i64;
        w.run_for(gap);
        let b = w.spawn(100.0);
        let want = w.core(a).session_id().min(w.core(b).session_id());
        let want_tl = if want == w.core(a).session_id() {
            w.core(a).timeline()
        } else {
            w.core(b).timeline()
        };
        w.run_for(3 * S);
        assert_eq!(w.assert_agree(TOL_0_1_MS), want, "seed {seed}");
        assert_eq!(w.core(a).timeline(), want_tl, "seed {seed}");
    }
}

#[test]
fn tempo_and_start_stop_reach_every_peer_within_half_a_second() {
    for seed in 0..20 {
        let mut w = World::new(seed, 300, 0.02);
        for _ in 0..3 {
            w.spawn(120.0);
            w.run_for(700_000);
        }
        w.run_for(3 * S);
        w.assert_agree(TOL_0_1_MS);
        // A joiner changes the tempo: the beat at that instant does not move.
        let h = w.host(2);
        let before = w.core(2).beats_at_host(h);
        w.core_mut(2).set_tempo(h, 97.0);
        assert!(
            (w.core(2).beats_at_host(h) - before).abs() <= 1,
            "seed {seed}"
        );
        let tl = w.core(2).timeline();
        assert!(tl.beat_origin > 0);
        w.flush(2);
        w.run_for(S / 2);
        for i in 0..3 {
            assert_eq!(w.core(i).timeline(), tl, "seed {seed}: peer {i}");
        }
        w.assert_agree(TOL_0_1_MS);
        // The founder starts; the others follow with the same apply beat.
        let h = w.host(0);
        w.core_mut(0).set_playing(h, true, h);
        let st = w.core(0).start_stop();
        assert!(st.playing);
        w.flush(0);
        w.run_for(S / 2);
        for i in 0..3 {
            assert_eq!(w.core(i).start_stop(), st, "seed {seed}: peer {i}");
            // Each maps the apply beat to its own host clock: the same true instant.
            let t = w.core(i).start_stop_host_time().unwrap() - w.peers[i].offset;
            let t0 = w.core(0).start_stop_host_time().unwrap() - w.peers[0].offset;
            assert!(
                (t - t0).abs() <= 60,
                "seed {seed}: peer {i} applies {} µs off",
                t - t0
            );
        }
        // A later stop by another peer wins over the start (newer timestamp).
        let h = w.host(1);
        w.core_mut(1).set_playing(h, false, h);
        w.flush(1);
        w.run_for(S / 2);
        for i in 0..3 {
            assert!(!w.core(i).start_stop().playing, "seed {seed}: peer {i}");
        }
    }
}

#[test]
fn an_older_edit_never_overrides_a_newer_one() {
    let mut w = World::new(7, 100, 0.0);
    w.spawn(120.0);
    w.run_for(S);
    w.spawn(120.0);
    w.run_for(2 * S);
    w.assert_agree(TOL_0_1_MS);
    // Both change the tempo in the same instant; the larger beat origin wins everywhere.
    let (h0, h1) = (w.host(0), w.host(1));
    w.core_mut(0).set_tempo(h0, 130.0);
    w.core_mut(1).set_tempo(h1 + 20_000, 140.0);
    let winner = [w.core(0).timeline(), w.core(1).timeline()]
        .into_iter()
        .max_by_key(|t| t.beat_origin)
        .unwrap();
    w.flush(0);
    w.flush(1);
    w.run_for(S);
    assert_eq!(w.core(0).timeline(), winner);
    assert_eq!(w.core(1).timeline(), winner);
}

#[test]
fn a_silent_peer_is_dropped_within_six_seconds_and_the_last_one_resets() {
    for seed in 0..10 {
        let mut w = World::new(seed, 200, 0.0);
        w.spawn(120.0);
        w.run_for(S);
        w.spawn(120.0);
        w.run_for(2 * S);
        let old = w.assert_agree(TOL_0_1_MS);
        // Peer 1 vanishes without a word.
        w.peers[1].core = None;
        let gone = w.now;
        let beat_before = w.beats(0);
        let mut dropped = None;
        while w.now < gone + 7 * S {
            w.run_for(10_000);
            if w.core(0).peer_count() == 0 {
                dropped = Some(w.now - gone);
                break;
            }
        }
        let after = dropped.unwrap_or_else(|| panic!("seed {seed}: never dropped"));
        assert!(after <= 6 * S, "seed {seed}: dropped after {after} µs");
        assert!(
            after >= i64::from(TTL_S) * S - ALIVE,
            "seed {seed}: too early {after}"
        );
        // Alone again: a fresh session of its own, beat continuous.
        assert_ne!(w.core(0).session_id(), old);
        assert_eq!(w.core(0).session_id(), w.core(0).node_id());
        assert_eq!(w.core(0).stats().resets, 1);
        let expect = beat_before + after * 2; // 120 BPM: 2 µbeats per µs
        assert!((w.beats(0) - expect).abs() <= 2, "seed {seed}");
    }
}
const ALIVE: i64 = super::peer::ALIVE_PERIOD_US;

#[test]
fn byebye_drops_the_peer_at_once() {
    let mut w = World::new(3, 100, 0.0);
    w.spawn(120.0);
    w.run_for(S);
    w.spawn(120.0);
    w.run_for(2 * S);
    w.assert_agree(TOL_0_1_MS);
    w.core_mut(1).shutdown();
    w.flush(1);
    w.peers[1].core = None;
    w.run_for(10_000);
    assert_eq!(w.core(0).peer_count(), 0);
}

#[test]
fn a_responder_answers_pings_and_ignores_oversized_ones() {
    let mut p = LinkPeer::new(1_000, 1, 120.0, 0);
    let src: SocketAddrV4 = "10.0.0.9:555".parse().unwrap();
    p.handle_measurement(5_000, 0, src, &wire::encode_ping(42, Some(7)));
    let t = p.poll_transmit().unwrap();
    assert_eq!((t.dst, t.socket), (src, SocketKind::Measurement));
    let m = wire::parse_measurement(&t.payload).unwrap();
    assert_eq!(m.session, Some(p.session_id()));
    assert_eq!(m.ghost_time, Some(4_000));
    assert_eq!((m.host_time, m.prev_ghost_time), (Some(42), Some(7)));
    let mut big = wire::encode_ping(42, Some(7));
    big.extend_from_slice(&[0x7a, 0x7a, 0x7a, 0x7a, 0, 0, 0, 0]);
    p.handle_measurement(5_000, 0, src, &big);
    assert!(p.poll_transmit().is_none());
    p.handle_measurement(5_000, 0, src, b"_link_v\x01\x01\x00");
    assert!(p.poll_transmit().is_none());
    assert_eq!(p.stats().bad_datagrams, 2);
}
