//! The CV engine through the node: codes, timing, ordering, refresh, leases and DAC faults.

mod common;

use common::{Rig, T0, assign, cal};
use voicemesh_mcu::engine::{CvEngine, MIN_GATE_NS, REFRESH_NS, RETRIGGER_GAP_NS};
use voicemesh_mcu::{DacOp, DacSpec, LocalTime};
use voicemesh_protocol::{
    ClusterTime, Control, ControlKind, CvFunction, CvSet, LeaseRenew, Message, VoiceOff, VoiceOn,
};

const MS: u64 = 1_000_000;
const V: DacSpec = DacSpec::VIRTUAL_5V;

fn on(voice: u16, note: u8, at: u64, lease_ms: u64) -> Message {
    Message::VoiceOn(VoiceOn {
        voice,
        note,
        velocity: 127,
        channel: 0,
        at: ClusterTime(at),
        lease_until: ClusterTime(at + lease_ms * MS),
    })
}

fn off(voice: u16, at: u64) -> Message {
    Message::VoiceOff(VoiceOff {
        voice,
        at: ClusterTime(at),
    })
}

/// pitch on 0, velocity on 1, gate on 2 for voice 0.
fn voice_rig() -> Rig {
    let mut r = Rig::joined(&[V], 4);
    r.send(Message::CvAssign(assign(0, CvFunction::Pitch)));
    r.send(Message::CvAssign(assign(1, CvFunction::Velocity)));
    r.send(Message::CvAssign(assign(2, CvFunction::Gate)));
    r
}

/// A real DAC: gain 0.4 % high, −3 mV offset and a 2 mV bow (INL) over 0–5 V. Returns volts.
fn dac_volts(code: u16) -> f64 {
    let x = f64::from(code) / 4096.0;
    -0.003 + x * 5.0 * 1.004 + 0.002 * 4.0 * x * (1.0 - x)
}

#[test]
fn note_codes_within_one_cent_across_five_octaves_with_calibration() {
    // Calibration as a user measures it: six codes across the range and the voltage a meter
    // reads for each (to the microvolt).
    let points: Vec<(i32, i32)> = [0u16, 800, 1600, 2400, 3200, 4095]
        .iter()
        .map(|&c| ((dac_volts(c) * 1e6).round() as i32, i32::from(c)))
        .collect();
    let mut a = assign(0, CvFunction::Pitch);
    a.calibration = cal(&points);
    a.base_note = 36;
    a.bend_semitones = 0;
    let mut e = CvEngine::new(&[V], 1);
    e.assign(&a).unwrap();
    let mut worst: f64 = 0.0;
    // Notes 36..=95: 0 V … 4.917 V (the 5 V note is the calibration's own end point).
    for (i, note) in (36u8..=95).enumerate() {
        let at = ClusterTime((i as u64 + 1) * 10 * MS);
        e.voice_on(VoiceOn {
            voice: 0,
            note,
            velocity: 100,
            channel: 0,
            at,
            lease_until: ClusterTime(u64::MAX),
        })
        .unwrap();
        e.handle_timeout(at);
        let want = f64::from(note - 36) / 12.0;
        let got = dac_volts(e.target_code(0));
        let cents = (got - want) * 1200.0;
        worst = worst.max(cents.abs());
        assert!(
            cents.abs() < 1.0,
            "note {note}: {got:.5} V for {want:.5} V = {cents:.3} cents"
        );
    }
    // Without calibration the same DAC is off by far more than a cent.
    let mut e = CvEngine::new(&[V], 1);
    let mut plain = a.clone();
    plain.calibration.clear();
    e.assign(&plain).unwrap();
    e.voice_on(VoiceOn {
        voice: 0,
        note: 84,
        velocity: 100,
        channel: 0,
        at: ClusterTime(1),
        lease_until: ClusterTime(u64::MAX),
    })
    .unwrap();
    e.handle_timeout(ClusterTime(1));
    assert!((dac_volts(e.target_code(0)) - 4.0).abs() * 1200.0 > 10.0);
    eprintln!("worst pitch error with calibration: {worst:.3} cents");
}

#[test]
fn pitch_bend_14_bit_to_16_bit_to_12_bit_and_bend_on_pitch() {
    let mut r = voice_rig();
    let mut pb = assign(3, CvFunction::PitchBend);
    pb.midi_channel = 1;
    r.send(Message::CvAssign(pb));
    let mut t = T0 + 10 * MS;
    // 14-bit value → 12-bit code: the ends reach the ends, the centre is mid-scale.
    for (value, code) in [
        (0u16, 0u16),
        (16383, 4095),
        (8192, 2048),
        (4096, 1024),
        (1, 0),
        (16380, 4095),
    ] {
        r.send(Message::Control(Control {
            midi_channel: 1,
            kind: ControlKind::PitchBend,
            number: 0,
            value,
            at: ClusterTime(t),
        }));
        r.run_until(Rig::local(t));
        assert_eq!(r.node.engine().code(3), code, "bend {value}");
        t += 10 * MS;
    }
    // Bend on a playing note: ±2 semitones = ±1/6 V = ±136.5 codes at 5 V / 4096.
    r.send(on(0, 48, t, 1000));
    r.run_until(Rig::local(t));
    assert_eq!(r.node.engine().code(0), 819); // 1 V
    for (value, code) in [(16383u16, 956u16), (0, 683), (8192, 819)] {
        t += 10 * MS;
        r.send(Message::Control(Control {
            midi_channel: 0,
            kind: ControlKind::PitchBend,
            number: 0,
            value,
            at: ClusterTime(t),
        }));
        r.run_until(Rig::local(t));
        assert_eq!(r.node.engine().code(0), code, "bend {value}");
    }
}

#[test]
fn gate_opens_at_its_cluster_time_after_the_pitch_and_closes_on_off() {
    let mut r = voice_rig();
    let t = T0 + 50 * MS;
    r.send(on(0, 60, t, 1000));
    r.send(off(0, t + 20 * MS));
    r.run_until(Rig::local(t + 100 * MS));
    let gate = r.changes(2);
    assert_eq!(
        gate.iter().map(|&(at, c)| (at + T0, c)).collect::<Vec<_>>(),
        vec![(T0, 0), (t, 4095), (t + 20 * MS, 0)],
        "gate changes at the events' `at`"
    );
    assert_eq!(r.changes(0).last(), Some(&(t - T0, 1638)), "2 V pitch at t");
    assert_eq!(r.changes(1).last(), Some(&(t - T0, 4095)), "velocity 127");
    // Pitch and velocity were written before the gate, in the same instant.
    let order: Vec<u16> = r
        .ops
        .iter()
        .filter(|o| o.at == Rig::local(t))
        .filter_map(|o| match o.op {
            DacOp::Write(w) => Some(w.channel),
            DacOp::Init { .. } => None,
        })
        .collect();
    assert_eq!(&order[..3], &[0, 1, 2], "pitch, velocity, then gate");
    // The report says when.
    let rep = r.node.report(r.now);
    assert_eq!(rep.changed_at[0], ClusterTime(t));
    assert_eq!(rep.changed_at[2], ClusterTime(t + 20 * MS));
    assert_eq!(rep.codes[0], 1638);
}

#[test]
fn gates_wait_for_pitch_writes_in_flight() {
    // A glue with several buses takes every write it can before completing any.
    let mut e = CvEngine::new(&[V], 1);
    e.assign(&assign(0, CvFunction::Pitch)).unwrap();
    e.assign(&assign(1, CvFunction::Gate)).unwrap();
    while let Some(d) = e.poll_init() {
        e.init_done(d, true, ClusterTime(0));
    }
    let drain = |e: &mut CvEngine| {
        while let Some(w) = e.poll_write() {
            e.write_done(w, true, ClusterTime(0));
        }
    };
    e.handle_timeout(ClusterTime(0));
    drain(&mut e);
    e.voice_on(VoiceOn {
        voice: 0,
        note: 60,
        velocity: 1,
        channel: 0,
        at: ClusterTime(MS),
        lease_until: ClusterTime(u64::MAX),
    })
    .unwrap();
    e.handle_timeout(ClusterTime(MS));
    let pitch = e.poll_write().expect("the pitch first");
    assert_eq!(pitch.channel, 0);
    assert_eq!(
        e.poll_write(),
        None,
        "the gate waits while the pitch is on the bus"
    );
    e.write_done(pitch, true, ClusterTime(MS + 95_000));
    let gate = e.poll_write().expect("then the gate");
    assert_eq!((gate.channel, gate.code), (1, 4095));
}

#[test]
fn short_gates_last_the_minimum_and_retrigger_leaves_a_gap() {
    let mut r = voice_rig();
    let t = T0 + 50 * MS;
    r.send(on(0, 60, t, 1000));
    r.send(off(0, t + MS / 2));
    r.run_until(Rig::local(t + 10 * MS));
    let g: Vec<u64> = r.changes(2).iter().map(|c| c.0 + T0).collect();
    assert_eq!(g, vec![T0, t, t + MIN_GATE_NS]);

    // A new note while held: gate low for RETRIGGER_GAP_NS, then high again.
    let t2 = t + 20 * MS;
    r.send(on(0, 62, t2, 1000));
    r.send(on(0, 64, t2 + 10 * MS, 1000));
    r.run_until(Rig::local(t2 + 20 * MS));
    let g: Vec<(u64, u16)> = r.changes(2).iter().map(|c| (c.0 + T0, c.1)).collect();
    assert_eq!(
        &g[3..],
        &[
            (t2, 4095),
            (t2 + 10 * MS, 0),
            (t2 + 10 * MS + RETRIGGER_GAP_NS, 4095)
        ]
    );
}

#[test]
fn trigger_pulses_have_their_length_and_a_minimum() {
    let mut r = Rig::joined(&[V], 2);
    let mut a = assign(0, CvFunction::Trigger);
    a.pulse_ms = 5;
    r.send(Message::CvAssign(a));
    let mut b = assign(1, CvFunction::Trigger);
    b.voice = 1;
    b.pulse_ms = 0;
    r.send(Message::CvAssign(b));
    let t = T0 + 30 * MS;
    r.send(on(0, 60, t, 1000));
    r.send(on(1, 60, t, 1000));
    r.run_until(Rig::local(t + 20 * MS));
    let c0: Vec<(u64, u16)> = r.changes(0).iter().map(|c| (c.0 + T0, c.1)).collect();
    assert_eq!(c0, vec![(T0, 0), (t, 4095), (t + 5 * MS, 0)]);
    let c1: Vec<(u64, u16)> = r.changes(1).iter().map(|c| (c.0 + T0, c.1)).collect();
    assert_eq!(c1, vec![(T0, 0), (t, 4095), (t + MS, 0)]);
}

#[test]
fn every_channel_is_refreshed_every_100_ms_and_unchanged_values_cost_no_write() {
    let mut r = Rig::joined(&[V], 1);
    let t = T0 + 10 * MS;
    // The coordinator re-sends the same value every 10 ms (its own healing).
    for i in 0..30 {
        r.send(Message::CvSet(CvSet {
            channel: 5,
            microvolts: 2_500_000,
            at: ClusterTime(t + i * 10 * MS),
        }));
        r.run_until(Rig::local(t + i * 10 * MS));
    }
    r.run_until(Rig::local(T0 + 400 * MS));
    // Channel 5: one write for the change, otherwise only the refreshes.
    let w5 = r.writes(5);
    let refreshes = w5.iter().filter(|w| w.1 == 2048).count();
    assert!((3..=4).contains(&(refreshes - 1)), "{w5:?}");
    let stats = r.node.engine_stats();
    assert!(stats.skipped_writes >= 29, "{stats:?}");
    // Every channel, changed or not, was written at least every REFRESH_NS.
    for ch in 0..8 {
        let w = r.writes(ch);
        assert!(w.len() >= 4, "channel {ch}: {w:?}");
        for pair in w.windows(2) {
            assert!(pair[1].0 - pair[0].0 <= REFRESH_NS, "channel {ch}: {w:?}");
        }
    }
    // A write the DAC did not take is repeated by the next refresh (nothing stays stale).
    assert_eq!(r.dac_codes[5], 2048);
}

#[test]
fn lease_expiry_drops_the_gate_and_renewal_keeps_it() {
    let mut r = voice_rig();
    let mut g2 = assign(3, CvFunction::Gate);
    g2.voice = 1;
    r.send(Message::CvAssign(g2));
    let t = T0 + 10 * MS;
    r.send(on(0, 60, t, 50));
    r.send(on(1, 60, t, 50));
    // Voice 1 is renewed every 30 ms; voice 0 is not.
    for i in 1..10 {
        let now = t + i * 30 * MS;
        r.run_until(Rig::local(now));
        r.send(Message::LeaseRenew(LeaseRenew {
            voices: heapless::Vec::from_iter([1]),
            until: ClusterTime(now + 50 * MS),
        }));
    }
    r.run_until(Rig::local(t + 300 * MS));
    let g0 = r.changes(2);
    assert_eq!(
        g0.last().map(|c| (c.0 + T0, c.1)),
        Some((t + 50 * MS + 1, 0))
    );
    assert_eq!(r.node.engine().code(3), 4095, "renewed voice still open");
    assert_eq!(r.node.engine_stats().lease_expiries, 1);
}

#[test]
fn a_re_sent_note_extends_the_lease_and_a_stale_one_never_sounds_again() {
    let mut r = voice_rig();
    let t = T0 + 10 * MS;
    r.send(on(0, 60, t, 50));
    // The coordinator's 100 ms state refresh re-sends the held note with a later lease.
    for i in 1..5 {
        let now = t + i * 40 * MS;
        r.run_until(Rig::local(now));
        r.send(on(0, 60, t, 40 * (i + 1) + 50));
    }
    r.run_until(Rig::local(t + 200 * MS));
    assert_eq!(r.node.engine().code(2), 4095, "still held");
    assert_eq!(r.changes(2).len(), 2, "opened once, never re-triggered");
    r.send(off(0, t + 210 * MS));
    r.run_until(Rig::local(t + 220 * MS));
    assert_eq!(r.node.engine().code(2), 0);
    // A refresh that was in flight when the note ended arrives late: ignored.
    r.send(on(0, 60, t, 1000));
    r.run_until(Rig::local(t + 300 * MS));
    assert_eq!(r.node.engine().code(2), 0);
    assert_eq!(r.node.engine_stats().lease_expiries, 0);
}

/// Regression (found by tests/pair.rs): a refresh that re-sends a note before its `at`, with a
/// later lease, must not queue a second note-on (which re-triggered the gate 1 ms late).
#[test]
fn a_note_re_sent_before_its_time_is_one_note() {
    let mut r = voice_rig();
    let t = T0 + 10 * MS;
    r.send(on(0, 60, t, 50));
    r.send(on(0, 60, t, 150));
    r.run_until(Rig::local(t + 120 * MS));
    let g: Vec<(u64, u16)> = r.changes(2).iter().map(|c| (c.0 + T0, c.1)).collect();
    assert_eq!(
        g,
        vec![(T0, 0), (t, 4095)],
        "opened once, on time, lease extended"
    );
}

#[test]
fn a_clock_stepped_back_keeps_refreshing_and_clocking() {
    let mut e = CvEngine::new(&[V], 1);
    let mut clk = assign(1, CvFunction::Clock);
    clk.param = 4;
    clk.pulse_ms = 5;
    e.assign(&clk).unwrap();
    e.set_timeline(voicemesh_protocol::Timeline::from_milli_bpm(
        120_000,
        ClusterTime(0),
    ));
    while let Some(d) = e.poll_init() {
        e.init_done(d, true, ClusterTime(0));
    }
    let late = ClusterTime(10_000 * MS);
    e.handle_timeout(late);
    while let Some(w) = e.poll_write() {
        e.write_done(w, true, late);
    }
    // The cluster clock steps back 5 s: the next refresh and clock pulse are due by their
    // own period from the new time, not 5 s later.
    let back = ClusterTime(5_000 * MS + 1);
    e.handle_timeout(back);
    assert!(e.poll_write().is_some(), "refresh right away");
    let next = e.next_deadline();
    assert!(
        next.0 - back.0 <= 125 * MS,
        "next deadline {} ns away",
        next.0 - back.0
    );
}

#[test]
fn coordinator_silence_drops_every_gate() {
    let mut r = voice_rig();
    let t = T0 + 10 * MS;
    r.send(on(0, 60, t, 60_000));
    r.run_until(Rig::local(t + 10 * MS));
    assert_eq!(r.node.engine().code(2), 4095);
    // No datagram for 10 heartbeats: the session is lost and the gate drops.
    r.run_until(Rig::local(t + 1500 * MS));
    assert!(!r.node.joined());
    assert_eq!(r.node.engine().code(2), 0);
    assert_eq!(r.node.stats().losses, 1);
}

#[test]
fn a_failed_dac_reads_zero_is_reported_and_the_other_keeps_working() {
    let mut r = Rig::joined(&[V, DacSpec::MCP4728_4V096], 1);
    let t = T0 + 10 * MS;
    for ch in [0u16, 8] {
        r.send(Message::CvSet(CvSet {
            channel: ch,
            microvolts: 1_000_000,
            at: ClusterTime(t),
        }));
    }
    r.run_until(Rig::local(t));
    assert_eq!(
        r.node.engine().code(8),
        1000,
        "1 mV per code on the MCP4728"
    );
    r.failing[1] = true;
    let t2 = t + 10 * MS;
    for ch in [0u16, 8] {
        r.send(Message::CvSet(CvSet {
            channel: ch,
            microvolts: 2_000_000,
            at: ClusterTime(t2),
        }));
    }
    r.run_until(Rig::local(t2 + 50 * MS));
    let rep = r.node.report(r.now);
    assert_eq!(rep.dac_faults, 0b10);
    assert_eq!(rep.codes[0], 1638, "DAC 0 keeps working");
    assert!(rep.codes[8..12].iter().all(|&c| c == 0), "{:?}", rep.codes);
    assert!(rep.write_errors >= 1);
    // Re-initialised every refresh period while failing; recovers when the chip answers.
    r.run_until(Rig::local(t2 + 350 * MS));
    let inits = r
        .ops
        .iter()
        .filter(|o| o.op == DacOp::Init { dac: 1 } && !o.ok)
        .count();
    assert!(inits >= 2, "{inits}");
    r.failing[1] = false;
    r.run_until(Rig::local(t2 + 500 * MS));
    let rep = r.node.report(r.now);
    assert_eq!(rep.dac_faults, 0);
    assert_eq!(rep.codes[8], 2000);
}

#[test]
fn clock_and_reset_follow_the_timeline() {
    let mut r = Rig::joined(&[V], 1);
    let mut clk = assign(6, CvFunction::Clock);
    clk.param = 4;
    clk.pulse_ms = 5;
    r.send(Message::CvAssign(clk));
    let mut rst = assign(7, CvFunction::Reset);
    rst.param = 4;
    rst.pulse_ms = 5;
    r.send(Message::CvAssign(rst));
    r.run_until(Rig::local(T0 + 4_100 * MS));
    // 120 BPM from T0: a clock pulse every 125 ms, a bar every 2 s.
    let highs = |ch| -> Vec<u64> {
        r.changes(ch)
            .iter()
            .filter(|c| c.1 == 4095)
            .map(|c| c.0 + T0)
            .collect()
    };
    let clock = highs(6);
    assert_eq!(clock.len(), 33, "{clock:?}");
    for (i, &t) in clock.iter().enumerate() {
        assert_eq!(t, T0 + i as u64 * 125 * MS);
    }
    assert_eq!(highs(7), vec![T0, T0 + 2_000 * MS, T0 + 4_000 * MS]);
    let lows: Vec<u64> = r
        .changes(6)
        .iter()
        .filter(|c| c.1 == 0)
        .map(|c| c.0 + T0)
        .collect();
    assert_eq!(lows[1], T0 + 5 * MS, "5 ms pulses");
}

#[test]
fn glide_moves_the_pitch_linearly() {
    let mut r = voice_rig();
    let mut p = assign(0, CvFunction::Pitch);
    p.glide_ms = 100;
    r.send(Message::CvAssign(p));
    let t = T0 + 10 * MS;
    r.send(on(0, 36, t, 10_000));
    r.send(on(0, 48, t + 200 * MS, 10_000));
    r.run_until(Rig::local(t + 400 * MS));
    let at = |ms: u64| {
        r.writes(0)
            .iter()
            .rev()
            .find(|w| w.0 + T0 <= t + ms * MS)
            .unwrap()
            .1
    };
    assert_eq!(at(150), 0, "first note does not glide from nowhere");
    assert_eq!(at(250), 410, "half way: 0.5 V");
    assert_eq!(at(300), 819, "arrived: 1 V");
    let steps = r
        .changes(0)
        .iter()
        .filter(|c| c.0 + T0 > t + 200 * MS && c.0 + T0 <= t + 300 * MS)
        .count();
    assert!(steps >= 90, "updated every millisecond: {steps}");
}

#[test]
fn cc_and_aftertouch_scale_through_16_bits() {
    let mut r = Rig::joined(&[V], 1);
    let mut cc = assign(4, CvFunction::Cc);
    cc.midi_channel = 2;
    cc.param = 74;
    r.send(Message::CvAssign(cc));
    let mut at = assign(5, CvFunction::Aftertouch);
    at.midi_channel = 2;
    r.send(Message::CvAssign(at));
    let t = T0 + 10 * MS;
    for (kind, number, value) in [
        (ControlKind::Cc, 74, 127),
        (ControlKind::Cc, 75, 0),
        (ControlKind::Aftertouch, 0, 64),
    ] {
        r.send(Message::Control(Control {
            midi_channel: 2,
            kind,
            number,
            value,
            at: ClusterTime(t),
        }));
    }
    r.run_until(Rig::local(t));
    assert_eq!(r.node.engine().code(4), 4095, "cc 74 = 127; cc 75 ignored");
    assert_eq!(r.node.engine().code(5), 2064, "64/127 of 5 V");
    let _ = LocalTime(0);
}
