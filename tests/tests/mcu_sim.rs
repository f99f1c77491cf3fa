//! An MCU node as a real cluster member: `voicemesh coordinator` and `voicemesh mcu-sim` as
//! separate processes in a namespace of their own. The coordinator finds the simulator over
//! mDNS, it joins over the UDP datagram link and gets its CV assignments; an OSC note (sent by
//! python-osc) comes out as the expected DAC codes at the expected cluster time, as the MCU
//! reports them through `/api/cluster`; after the coordinator is SIGKILLed the MCU drops the
//! gate by itself within the lease time (read from the simulator's `--print-codes` lines); a
//! malformed datagram sent to the MCU is dropped and counted in its report.
//!
//! Every process runs on this machine, so the coordinator's cluster time is realtime + 37 s
//! (the grandmaster's TAI offset) and the test stamps its own actions the same way, each stamp
//! taken just before (or just after) the action, so the bounds below are honest.

use std::time::{Duration, Instant};
use voicemesh_protocol::CalPoint;
use voicemesh_protocol::cv::{
    calibrated_code, nominal_code, pitch_microvolts, scale_u16, u7_to_u16,
};
use voicemesh_tests::{
    Child, Netns, TAI_OFFSET_NS, TempDir, cluster_now_ns, coordinator, python,
    try_http_get_json_local, voicemesh_bin, wait_api,
};

/// The lookahead the test's coordinator stamps on events (`--lookahead-ms 50`, ten times the
/// default): a code written before `at` — on receipt, say — is then far outside the window.
const LOOKAHEAD_NS: u64 = 50_000_000;
/// The coordinator's default lease.
const LEASE_NS: u64 = 1_000_000_000;
/// The issue's bound for the gate after the coordinator dies: within the lease (the last
/// renewal or refresh gave at most lookahead + lease), plus the simulator's reaction.
const GATE_DROP_WITHIN_NS: u64 = 1_250_000_000;
/// How early the MCU's idea of cluster time may let it write (its clock servo follows the
/// coordinator's TimeSync answers; same machine, same clock).
const EARLY_SLACK_NS: u64 = 1_000_000;
/// How late a code may be written: the coordinator reading the OSC datagram and the
/// simulator's timer waking, both scheduled by a shared 2-core machine (about 1 ms when it is
/// quiet, tens of ms under a parallel build).
const LATE_SLACK_NS: u64 = 20_000_000;
/// The simulator's virtual DACs: 12 bits, 0–5 V.
const DAC_BITS: u8 = 12;
const DAC_FULL_SCALE_UV: u32 = 5_000_000;
const MCU_PORT: u16 = 7410;

/// The MCU's voice 0 drives pitch (CV 0, calibrated), velocity (CV 1) and gate (CV 2); MIDI
/// channel 0 plays on the MCU only.
const CONFIG: &str = r#"{
  "version": 1,
  "channels": [{"channel": 0, "nodes": ["mcu-1"]}],
  "cv": {
    "voices": [{"node": "mcu-1", "voice": 0,
                "pitch": {"node": "mcu-1", "channel": 0},
                "velocity": {"node": "mcu-1", "channel": 1},
                "gate": {"node": "mcu-1", "channel": 2}}],
    "calibration": [{"output": {"node": "mcu-1", "channel": 0},
                     "points": [{"volts": -1.0, "code": 0}, {"volts": 4.0, "code": 4000}]}]
  }
}"#;

fn mcu(v: &serde_json::Value) -> Option<&serde_json::Value> {
    v["nodes"].as_array()?.iter().find(|n| n["id"] == "mcu-1")
}

fn codes(v: &serde_json::Value) -> Vec<u64> {
    mcu(v)
        .and_then(|n| n["cv"]["dac_codes"].as_array())
        .map(|a| a.iter().map(|c| c.as_u64().unwrap()).collect())
        .unwrap_or_default()
}

/// Runs a few lines of python in `ns`, checks it succeeded, returns what it printed.
fn py(ns: &Netns, script: &str) -> String {
    let out = ns
        .command(python())
        .args(["-c", script])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The simulator's (first) line `dac ch {ch} code {code}`: its `at_ns` (when the MCU wrote
/// it, if it reported it) and its `seen_unix_ns` as cluster time (when the simulator saw it).
fn code_line(sim: &Child, ch: u16, code: u64, timeout: Duration) -> (Option<u64>, u64) {
    let line = sim
        .wait_for_line(&format!("dac ch {ch} code {code} at_ns"), timeout)
        .unwrap_or_else(|| panic!("no `dac ch {ch} code {code}` line\n{}", sim.output()));
    let field = |name: &str| {
        line.split(&format!(" {name} "))
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_owned()
    };
    let seen: u64 = field("seen_unix_ns").parse().expect("a number");
    (field("at_ns").parse().ok(), seen + TAI_OFFSET_NS)
}

#[test]
fn mcu_sim_joins_plays_a_note_in_cluster_time_and_drops_the_gate_when_the_coordinator_dies() {
    let ns = Netns::new();
    let state = TempDir::new("vm-mcu-sim");
    std::fs::create_dir_all(&state.0).unwrap();
    std::fs::write(state.0.join("config.json"), CONFIG).unwrap();
    let (mut coord, api) = coordinator(&ns, &state.0, &["--lookahead-ms", "50"]);

    let started = Instant::now();
    let mut cmd = ns.command(voicemesh_bin());
    cmd.args([
        "mcu-sim",
        "--name",
        "mcu-1",
        "--channels",
        "8",
        "--port",
        &MCU_PORT.to_string(),
        "--print-codes",
    ]);
    let sim = Child::spawn("mcu-sim", cmd);
    sim.expect_line("listening on udp://", Duration::from_secs(30));

    // Discovered over mDNS, joined: online, role mcu, its channels, a first report.
    let (v, _) = wait_api(
        &ns,
        &api,
        Duration::from_secs(15),
        "mcu-1 online with a report",
        |v| mcu(v).is_some_and(|n| n["online"] == true && n["cv"]["reported_at_ns"].is_u64()),
    );
    let joined_after = started.elapsed();
    let n = mcu(&v).unwrap();
    assert_eq!(n["role"], "mcu");
    assert_eq!(n["voices"], 2);
    assert_eq!(n["cv"]["channels"], 8);
    sim.expect_line("joined the coordinator", Duration::from_secs(5));

    // A note on channel 0: the MCU's voice 0.
    let cal = [
        CalPoint {
            microvolts: -1_000_000,
            code: 0,
        },
        CalPoint {
            microvolts: 4_000_000,
            code: 4000,
        },
    ];
    // Note 48 is 1 V above base note 36: through the table, code 1600 — only with the
    // assignment and its calibration, since the DAC's nominal line would give 819.
    let pitch = calibrated_code(&cal, pitch_microvolts(48, 36, 0, 200)).unwrap() as u64;
    assert_eq!(pitch, 1600);
    let velocity = u64::from(nominal_code(
        scale_u16(0, 5_000_000, u7_to_u16(100)),
        DAC_BITS,
        DAC_FULL_SCALE_UV,
    ));
    let gate = u64::from(nominal_code(5_000_000, DAC_BITS, DAC_FULL_SCALE_UV));
    // python-osc stamps the realtime clock just before and just after its sendto.
    let sent = py(
        &ns,
        "import time\n\
         from pythonosc.udp_client import SimpleUDPClient\n\
         from pythonosc.osc_message_builder import OscMessageBuilder\n\
         c = SimpleUDPClient('127.0.0.1', 9000)\n\
         b = OscMessageBuilder('/voicemesh/note')\n\
         for a in [48, 100, 0]: b.add_arg(a)\n\
         m = b.build()\n\
         t0 = time.time_ns()\n\
         c.send(m)\n\
         print(t0, time.time_ns())\n",
    );
    let mut stamps = sent
        .split_whitespace()
        .map(|t| t.parse::<u64>().expect("ns") + TAI_OFFSET_NS);
    let (before, after) = (stamps.next().unwrap(), stamps.next().unwrap());
    let (v, _) = wait_api(
        &ns,
        &api,
        Duration::from_secs(5),
        "the note's DAC codes",
        |v| codes(v).get(..3) == Some(&[pitch, velocity, gate][..]),
    );
    let n = mcu(&v).unwrap();
    let at: Vec<u64> = n["cv"]["changed_at_ns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    // The note's `at` is the coordinator's now + lookahead when it read the OSC datagram,
    // after the send; the MCU writes at `at` by its own clock.
    let (lo, hi) = (
        before + LOOKAHEAD_NS - EARLY_SLACK_NS,
        after + LOOKAHEAD_NS + LATE_SLACK_NS,
    );
    for (ch, t) in at.iter().enumerate().take(3) {
        assert!(
            (lo..=hi).contains(t),
            "CV {ch} written at {t}, expected within [{lo}, {hi}] ({} ms after the send)",
            (*t as i64 - before as i64) as f64 / 1e6
        );
    }
    // Pitch, velocity and gate change at the same `at`: the gate never opens on an old pitch.
    assert!(at[0] <= at[2] && at[2] - at[0] < 1_000_000, "{at:?}");
    let (pitch_at, _) = code_line(&sim, 0, pitch, Duration::from_secs(2));
    assert_eq!(
        pitch_at,
        Some(at[0]),
        "the simulator prints what it reports"
    );
    // The link carried no bad datagram either way so far.
    let d = &n["cv"]["datagrams"];
    assert_eq!(d["malformed"], 0, "{d}");
    assert!(d["received"].as_u64().unwrap() > 0);

    // A malformed datagram to the MCU: dropped, counted in the report it sends back.
    py(
        &ns,
        &format!(
            "import socket\n\
             socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'VM\\x01garbage', ('127.0.0.1', {MCU_PORT}))\n"
        ),
    );
    wait_api(
        &ns,
        &api,
        Duration::from_secs(5),
        "the MCU counting the malformed datagram",
        |v| mcu(v).is_some_and(|n| n["cv"]["mcu_rx"]["malformed"] == 1 && n["online"] == true),
    );

    // Hold the note through a few renewals, then kill the coordinator: the gate drops within
    // the lease.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        codes(&ns.in_ns(|| try_http_get_json_local(&api).unwrap()))[2],
        gate,
        "gate still high before the kill"
    );
    let kill = cluster_now_ns();
    coord.signal(libc::SIGKILL);
    // With no coordinator the MCU reports to nobody: the time is when the simulator saw the
    // gate at 0 — an upper bound of when it dropped (the report's own time when it has one).
    let (at_ns, seen) = code_line(&sim, 2, 0, Duration::from_secs(3));
    let dropped = at_ns.unwrap_or(seen);
    let after_kill = dropped as i64 - kill as i64;
    println!(
        "mcu-sim joined {} ms after start; note written {:.3} ms after the send (lookahead 50 ms; the send took {:.3} ms); gate dropped {:.1} ms after the coordinator's SIGKILL",
        joined_after.as_millis(),
        (at[0] as i64 - before as i64) as f64 / 1e6,
        (after - before) as f64 / 1e6,
        after_kill as f64 / 1e6
    );
    assert!(
        after_kill > 0 && (after_kill as u64) <= GATE_DROP_WITHIN_NS,
        "gate dropped {after_kill} ns after the kill (lease {LEASE_NS} ns)"
    );
    assert!(
        coord.wait_timeout(Duration::from_secs(5)).is_some(),
        "coordinator gone"
    );
}
