//! The session core in a simulated network: two cores with their own clocks, and hand-built
//! packets that reproduce the quirks of real peers (protocol notes §7).

use std::net::SocketAddr;

use proptest::prelude::*;

use super::midi::MidiMessage;
use super::session::*;
use super::wire::{self, Control, Exchange, Sync};
use crate::allocator::MidiEvent;

const A_CTRL: &str = "10.0.0.1:5004";
const B_CTRL: &str = "10.0.0.2:5004";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn data_of(ctrl: SocketAddr) -> SocketAddr {
    SocketAddr::new(ctrl.ip(), ctrl.port() + 1)
}

fn core(seed: u64) -> SessionCore {
    SessionCore::new(CoreConfig {
        seed,
        ..CoreConfig::default()
    })
}

/// Two cores on a lossless network with a fixed one-way latency; B's clock runs `b_offset`
/// ns ahead of A's. `t` is true time (= A's clock).
struct Pair {
    a: SessionCore,
    b: SessionCore,
    t: u64,
    b_offset: u64,
    latency: u64,
    /// In flight: (arrival true time, to A?, port at the receiver, from, bytes).
    wire: Vec<(u64, bool, Port, SocketAddr, Vec<u8>)>,
    a_events: Vec<Event>,
    b_events: Vec<Event>,
    /// CK packets with count 0 sent by each side.
    ck0: (u32, u32),
    /// Per mille of datagrams lost (after the session is up), and the seeded generator.
    loss_permille: u64,
    rng: u64,
    /// RTP packets from A that were lost.
    rtp_lost: u64,
}

impl Pair {
    fn new(b_offset: u64) -> Pair {
        Pair {
            a: core(1),
            b: core(2),
            t: 1_000_000_000_000,
            b_offset,
            latency: 300_000,
            wire: Vec::new(),
            a_events: Vec::new(),
            b_events: Vec::new(),
            ck0: (0, 0),
            loss_permille: 0,
            rng: 0x2545_F491_4F6C_DD1D,
            rtp_lost: 0,
        }
    }

    fn pump(&mut self) {
        for (is_a, core) in [(true, &mut self.a), (false, &mut self.b)] {
            let me = addr(if is_a { A_CTRL } else { B_CTRL });
            while let Some(t) = core.poll_transmit() {
                if let Ok(Control::Sync(Sync { count: 0, .. })) = Control::parse(&t.bytes) {
                    if is_a {
                        self.ck0.0 += 1
                    } else {
                        self.ck0.1 += 1
                    }
                }
                let from = if t.from == Port::Control {
                    me
                } else {
                    data_of(me)
                };
                let port = if t.to.port() == 5004 {
                    Port::Control
                } else {
                    Port::Data
                };
                self.wire
                    .push((self.t + self.latency, !is_a, port, from, t.bytes));
            }
            let evs = if is_a {
                &mut self.a_events
            } else {
                &mut self.b_events
            };
            while let Some(e) = core.poll_event() {
                evs.push(e);
            }
        }
    }

    /// Runs until true time `until`, jumping from deadline to deadline.
    fn run_until(&mut self, until: u64) {
        loop {
            self.pump();
            let next_wire = self.wire.iter().map(|w| w.0).min();
            let a_t = self.a.poll_timeout();
            let b_t = self
                .b
                .poll_timeout()
                .map(|t| t.saturating_sub(self.b_offset));
            let next = [next_wire, a_t, b_t].into_iter().flatten().min();
            let Some(next) = next.filter(|&n| n <= until) else {
                self.t = until;
                return;
            };
            self.t = self.t.max(next);
            let (due, rest): (Vec<_>, Vec<_>) = self.wire.drain(..).partition(|w| w.0 <= self.t);
            self.wire = rest;
            for (_, to_a, port, from, bytes) in due {
                if to_a {
                    self.a.handle_datagram(self.t, port, from, &bytes);
                } else {
                    self.b
                        .handle_datagram(self.t + self.b_offset, port, from, &bytes);
                }
            }
            self.a.handle_timeout(self.t);
            self.b.handle_timeout(self.t + self.b_offset);
        }
    }
}

fn connected(evs: &[Event]) -> bool {
    evs.iter().any(|e| matches!(e, Event::Connected { .. }))
}

fn midi(evs: &[Event]) -> Vec<(u64, MidiMessage)> {
    evs.iter()
        .filter_map(|e| match e {
            Event::Midi { at_ns, msg, .. } => Some((*at_ns, *msg)),
            _ => None,
        })
        .collect()
}

#[test]
fn invitation_clock_sync_and_cadence_without_storms() {
    let mut p = Pair::new(7_777_777_777);
    let id = p.a.invite(p.t, addr(B_CTRL), false);
    let t0 = p.t;
    p.run_until(t0 + 100_000_000);
    assert!(connected(&p.a_events) && connected(&p.b_events));
    assert!(p.a.is_connected(id));
    // The first CK went out with the data-port OK; B measured the offset from CK2 too.
    let a_view = &p.a.peers()[0];
    let b_view = &p.b.peers()[0];
    assert_eq!(a_view.stats.syncs, 1);
    assert_eq!(b_view.stats.syncs, 1);
    // Offset in ticks: B − A = 77 777.77… ticks, within a tick of rounding.
    let off = a_view.clock_offset_ticks.unwrap();
    assert!((off - 77_777).abs() <= 1, "{off}");
    let off_b = b_view.clock_offset_ticks.unwrap();
    assert!((off_b + 77_777).abs() <= 1, "{off_b}");
    assert_eq!(a_view.rtt_ticks, Some(6));
    // Over two minutes: a burst of 6 then one every 10 s, never more; B never starts one.
    p.run_until(t0 + 120_000_000_000);
    assert!(p.ck0.0 >= 16 && p.ck0.0 <= 19, "A sent {} CK0", p.ck0.0);
    assert_eq!(p.ck0.1, 0, "the listener never starts clock sync");
    assert!(p.a.is_connected(id), "CK keeps the session alive");
}

/// Over many seeds, with 20 % of all datagrams lost once the session is up (CK, RS and RTP
/// alike): the session stays up (CK keeps it alive even when exchanges fail), the initiator's
/// CK starts stay within the schedule (never more than one per 1.5 s: no storm), the offset
/// estimate stays within two ticks, and every lost RTP packet is counted as a sequence gap.
#[test]
fn lossy_links_over_many_seeds_no_storm_offsets_hold_and_gaps_counted() {
    for seed in 0..24u64 {
        let b_offset = seed * 987_654_321_123 % 50_000_000_000_000;
        let mut p = Pair::new(b_offset);
        p.rng ^= seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        p.latency = 100_000 + seed * 37_000;
        let id = p.a.invite(p.t, addr(B_CTRL), false);
        let t0 = p.t;
        p.run_until(t0 + 100_000_000);
        assert!(p.a.is_connected(id), "seed {seed}");
        p.loss_permille = 200;
        let ck_before = p.ck0.0;
        // 100 packets of one note-on each, 100 ms apart, over 10 s; then 50 s more.
        let mut list = Vec::new();
        wire::push_command(&mut list, 0, &[0x90, 60, 1]);
        for _ in 0..100 {
            p.a.send_midi(p.t, &list);
            p.run_until(p.t + 100_000_000);
        }
        p.run_until(p.t + 50_000_000_000);
        assert!(
            p.a.is_connected(id),
            "seed {seed}: the session survived the loss"
        );
        let ck = p.ck0.0 - ck_before;
        assert!(ck <= 60_000 / 1_500 + 1, "seed {seed}: {ck} CK0 in 60 s");
        let b = &p.b.peers()[0];
        // Gaps are counted up to the last packet received (a loss at the very end is not
        // visible yet).
        let received = midi(&p.b_events).len() as u64;
        assert_eq!(received + p.rtp_lost, 100, "seed {seed}");
        assert!(
            b.stats.lost <= p.rtp_lost && p.rtp_lost - b.stats.lost <= 3,
            "seed {seed}: counted {} of {} lost",
            b.stats.lost,
            p.rtp_lost
        );
        // Each of the three timestamps is truncated to a 100 µs tick: the estimate is good to
        // two ticks.
        let want = (b_offset / TICK_NS) as i64;
        if let Some(off) = p.a.peers()[0].clock_offset_ticks {
            assert!(
                (off - want).abs() <= 2,
                "seed {seed}: offset {off} vs {want}"
            );
        }
    }
}

#[test]
fn delta_times_survive_the_clock_mapping_exactly() {
    let mut p = Pair::new(3_141_592_653);
    p.a.invite(p.t, addr(B_CTRL), false);
    let t0 = p.t;
    p.run_until(t0 + 10_000_000);
    // Two notes in one packet, 100 ticks (10 ms) apart.
    let mut list = Vec::new();
    wire::push_command(&mut list, 0, &[0x90, 60, 100]);
    wire::push_command(&mut list, 100, &[0x90, 64, 100]);
    assert_eq!(p.a.send_midi(p.t, &list), 1);
    let sent_at = p.t;
    p.run_until(sent_at + 1_000_000);
    let m = midi(&p.b_events);
    assert_eq!(m.len(), 2, "{m:?}");
    assert_eq!(m[1].0 - m[0].0, 10_000_000, "exactly 10 ms apart");
    // The first note is placed at the sender's time on B's clock (within a tick).
    let expected = sent_at + p.b_offset;
    assert!(
        m[0].0.abs_diff(expected) <= 2 * TICK_NS,
        "{} vs {expected}",
        m[0].0
    );
}

#[test]
fn bye_and_silence_end_sessions_and_kept_ones_come_back() {
    let mut p = Pair::new(0);
    let id = p.a.invite(p.t, addr(B_CTRL), true);
    let t0 = p.t;
    p.run_until(t0 + 10_000_000);
    let b_id = p.b.peers()[0].id;
    assert!(p.b.remove(p.t, b_id));
    p.run_until(p.t + 10_000_000);
    assert!(p.a_events.iter().any(|e| matches!(
        e,
        Event::Disconnected {
            reason: EndReason::Bye,
            ..
        }
    )));
    // Kept: invited again after RETRY_AFTER and reconnected.
    assert_eq!(p.a.peers()[0].state, "waiting");
    p.run_until(p.t + RETRY_AFTER_NS + 100_000_000);
    assert!(p.a.is_connected(id));
    // Silence: B stops answering (its core is replaced by a deaf one).
    p.b = core(9);
    let before = p.a_events.len();
    p.run_until(p.t + 61_000_000_000);
    assert!(p.a_events[before..].iter().any(|e| matches!(
        e,
        Event::Disconnected {
            reason: EndReason::Silent,
            ..
        }
    )));
}

#[test]
fn an_unreachable_peer_is_dropped_at_once() {
    let mut p = Pair::new(0);
    p.a.invite(p.t, addr(B_CTRL), false);
    p.run_until(p.t + 10_000_000);
    p.a.handle_unreachable(p.t, data_of(addr(B_CTRL)));
    p.pump();
    assert!(p.a_events.iter().any(|e| matches!(
        e,
        Event::Disconnected {
            reason: EndReason::Unreachable,
            ..
        }
    )));
    assert!(p.a.peers().is_empty());
}

/// A hand-driven remote peer for the quirk tests.
struct Remote {
    ctrl: SocketAddr,
    token: u32,
    ssrc: u32,
}

impl Remote {
    fn ex(&self, token: u32, ssrc: u32) -> Exchange {
        Exchange {
            version: 2,
            token,
            ssrc,
            name: Some("remote".into()),
        }
    }
}

fn drain(c: &mut SessionCore) -> Vec<Transmit> {
    std::iter::from_fn(|| c.poll_transmit()).collect()
}

fn events(c: &mut SessionCore) -> Vec<Event> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

fn rtp(seq: u16, ts: u32, ssrc: u32, flags_and_list: &[u8]) -> Vec<u8> {
    let mut b = vec![0x80, 0x61];
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(&ts.to_be_bytes());
    b.extend_from_slice(&ssrc.to_be_bytes());
    b.extend_from_slice(flags_and_list);
    b
}

/// Connects `r` to a listener core the rtpmidi-crate way when `new_token` (another token on
/// the data port), else the normal way.
fn listen(c: &mut SessionCore, now: u64, r: &Remote, new_token: bool) {
    c.handle_datagram(
        now,
        Port::Control,
        r.ctrl,
        &Control::Invitation(r.ex(r.token, r.ssrc)).to_vec(),
    );
    let t = if new_token { r.token ^ 0xFFFF } else { r.token };
    c.handle_datagram(
        now,
        Port::Data,
        data_of(r.ctrl),
        &Control::Invitation(r.ex(t, r.ssrc)).to_vec(),
    );
}

#[test]
fn quirk_rtpmidi_crate_data_invitation_with_another_token_is_accepted() {
    let mut c = core(3);
    let r = Remote {
        ctrl: addr("10.0.0.9:6000"),
        token: 0x1234_5678,
        ssrc: 42,
    };
    listen(&mut c, 1_000_000_000, &r, true);
    let sent = drain(&mut c);
    assert!(matches!(
        Control::parse(&sent[1].bytes),
        Ok(Control::Accepted(_))
    ));
    assert!(connected(&events(&mut c)));
    // It opens sync with count=1: answered with count 2, no storm.
    c.handle_datagram(
        1_001_000_000,
        Port::Data,
        data_of(r.ctrl),
        &Control::Sync(Sync {
            ssrc: 42,
            count: 1,
            ts: [5, 6, 0],
        })
        .to_vec(),
    );
    let sent = drain(&mut c);
    assert_eq!(sent.len(), 1);
    assert!(matches!(
        Control::parse(&sent[0].bytes),
        Ok(Control::Sync(Sync { count: 2, .. }))
    ));
}

#[test]
fn quirk_pymidi_answers_the_data_invitation_with_another_ssrc() {
    let mut c = core(4);
    let now = 2_000_000_000;
    let remote = addr("10.0.0.7:5004");
    c.invite(now, remote, false);
    let inv = drain(&mut c);
    let Ok(Control::Invitation(e)) = Control::parse(&inv[0].bytes) else {
        panic!()
    };
    let ok = |ssrc| {
        Control::Accepted(Exchange {
            version: 2,
            token: e.token,
            ssrc,
            name: Some("pymidi".into()),
        })
        .to_vec()
    };
    c.handle_datagram(now, Port::Control, remote, &ok(111));
    c.handle_datagram(now, Port::Data, data_of(remote), &ok(222));
    assert!(connected(&events(&mut c)));
    // Its CK answers carry the data-port SSRC: still matched, sync completes.
    let ck0 = drain(&mut c)
        .into_iter()
        .find_map(|t| match Control::parse(&t.bytes) {
            Ok(Control::Sync(s)) if s.count == 0 => Some(s),
            _ => None,
        })
        .expect("CK0 right after connecting");
    c.handle_datagram(
        now + 500_000,
        Port::Data,
        data_of(remote),
        &Control::Sync(Sync {
            ssrc: 222,
            count: 1,
            ts: [ck0.ts[0], 99, 0],
        })
        .to_vec(),
    );
    assert_eq!(c.peers()[0].stats.syncs, 1);
    // And its MIDI, sent with either SSRC, is accepted.
    c.handle_datagram(
        now + 600_000,
        Port::Data,
        data_of(remote),
        &rtp(1, 0, 222, &[3, 0x90, 60, 1]),
    );
    assert_eq!(midi(&events(&mut c)).len(), 1);
}

#[test]
fn quirk_node_rtpmidi_ck_after_ck2_and_z_flag_and_bye_name() {
    let mut c = core(5);
    let r = Remote {
        ctrl: addr("10.0.0.5:5004"),
        token: 9,
        ssrc: 77,
    };
    let now = 3_000_000_000;
    listen(&mut c, now, &r, false);
    drain(&mut c);
    events(&mut c);
    let d = data_of(r.ctrl);
    // node: CK0, we answer CK1, it sends CK2 and at once a new CK0. We answer the CK0 and
    // never start an exchange of our own.
    for (i, count) in [0u8, 2, 0, 2, 0, 2].into_iter().enumerate() {
        let t = now + i as u64 * 1_000_000;
        c.handle_datagram(
            t,
            Port::Data,
            d,
            &Control::Sync(Sync {
                ssrc: 77,
                count,
                ts: [100, t / TICK_NS, 102],
            })
            .to_vec(),
        );
    }
    let counts: Vec<u8> = drain(&mut c)
        .iter()
        .filter_map(|t| match Control::parse(&t.bytes) {
            Ok(Control::Sync(s)) => Some(s.count),
            _ => None,
        })
        .collect();
    assert_eq!(counts, [1, 1, 1]);
    // Z=1 with a non-zero first delta; running-status CC pair; pitch bend.
    c.handle_datagram(
        now + 10_000_000,
        Port::Data,
        d,
        &rtp(
            5,
            1000,
            77,
            &[
                0x20 | 11,
                0x05,
                0xB0,
                74,
                64,
                0x00,
                75,
                10,
                0x00,
                0xE0,
                0,
                0x40,
            ],
        ),
    );
    let m: Vec<MidiMessage> = midi(&events(&mut c)).into_iter().map(|x| x.1).collect();
    assert_eq!(
        m,
        [
            MidiMessage::Channel(MidiEvent::ControlChange {
                channel: 0,
                controller: 74,
                value: 64
            }),
            MidiMessage::Channel(MidiEvent::ControlChange {
                channel: 0,
                controller: 75,
                value: 10
            }),
            MidiMessage::Channel(MidiEvent::PitchBend {
                channel: 0,
                value: 0
            }),
        ]
    );
    // Its BY carries our name back: ignored, the session ends.
    let by = Control::End(Exchange {
        version: 2,
        token: 9,
        ssrc: 77,
        name: Some("VoiceMesh".into()),
    });
    c.handle_datagram(now + 20_000_000, Port::Control, r.ctrl, &by.to_vec());
    assert!(events(&mut c).iter().any(|e| matches!(
        e,
        Event::Disconnected {
            reason: EndReason::Bye,
            ..
        }
    )));
}

#[test]
fn sequence_gaps_and_duplicates_are_counted_and_journals_skipped() {
    let mut c = core(6);
    let r = Remote {
        ctrl: addr("10.0.0.6:5004"),
        token: 1,
        ssrc: 5,
    };
    let now = 4_000_000_000;
    listen(&mut c, now, &r, false);
    let d = data_of(r.ctrl);
    for seq in [10u16, 11, 14, 14, 15] {
        c.handle_datagram(now, Port::Data, d, &rtp(seq, 0, 5, &[3, 0x90, 60, 1]));
    }
    // J=1 with a journal after the list.
    c.handle_datagram(
        now,
        Port::Data,
        d,
        &rtp(
            16,
            0,
            5,
            &[0x40 | 3, 0x80, 60, 0, 0x20, 0, 1, 0, 5, 0, 1, 2],
        ),
    );
    let s = &c.peers()[0].stats;
    assert_eq!(s.lost, 2);
    assert_eq!(s.duplicates, 1);
    assert_eq!(s.journals, 1);
    assert_eq!(s.packets, 5);
    assert_eq!(midi(&events(&mut c)).len(), 5);
    // An unknown SSRC is dropped and counted.
    c.handle_datagram(now, Port::Data, d, &rtp(1, 0, 999, &[3, 0x90, 60, 1]));
    assert_eq!(c.stats().unknown_sender, 1);
}

#[test]
fn too_many_sessions_are_refused() {
    let mut c = SessionCore::new(CoreConfig {
        max_peers: 2,
        ..CoreConfig::default()
    });
    for i in 0..3u32 {
        let r = Remote {
            ctrl: SocketAddr::new([10, 0, 1, i as u8].into(), 5004),
            token: i,
            ssrc: i,
        };
        listen(&mut c, 1, &r, false);
    }
    assert_eq!(c.peers().len(), 2);
    assert_eq!(c.stats().refused, 1);
}

proptest! {
    #[test]
    fn random_datagrams_never_panic(
        dgrams in proptest::collection::vec(
            (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..80)), 0..40),
        prefix in any::<bool>(),
    ) {
        let mut c = core(7);
        let r = Remote { ctrl: addr("10.0.0.3:5004"), token: 3, ssrc: 3 };
        listen(&mut c, 1, &r, false);
        for (i, (ctrl, mut b)) in dgrams.into_iter().enumerate() {
            if prefix && b.len() >= 12 {
                // Aim at the known session: a valid RTP header, random payload.
                b[0] = 0x80;
                b[8..12].copy_from_slice(&3u32.to_be_bytes());
            }
            let port = if ctrl { Port::Control } else { Port::Data };
            c.handle_datagram(1 + i as u64, port, data_of(r.ctrl), &b);
            c.handle_timeout(1 + i as u64);
            drain(&mut c);
            events(&mut c);
        }
    }

    #[test]
    fn random_command_lists_never_panic_and_deltas_never_decrease(
        list in proptest::collection::vec(any::<u8>(), 0..200),
        z in any::<bool>(),
    ) {
        let mut d = super::midi::CommandDecoder::new();
        let mut last = 0;
        let _ = d.decode(&list, z, false, |t, _| {
            assert!(t >= last);
            last = t;
        });
    }
}
