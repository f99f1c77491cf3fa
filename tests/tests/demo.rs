//! `voicemesh demo` end to end, as a user runs it: one process, a coordinator, two nodes and a
//! simulated MCU node, the phrase sent as OSC, voices over QUIC, clocks by PTP, audio to WAV
//! files, the chord roots as control voltages on the MCU node's virtual DAC.
//!
//! The namespace also holds a stand-in LAN interface that carries the default route, and the
//! usual multicast route to `lo` is removed: a socket that did not pin its traffic to
//! 127.0.0.1 would send through that interface, and its TX counter would move.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use voicemesh_tests::{
    Child, Netns, midi_to_hz, onsets, peak_frequency, read_wav_mono, try_http_get_json_local,
    voicemesh_bin,
};

/// The demo's phrase (src/demo.rs): close-voiced seventh chords.
const PHRASE: [[u8; 4]; 4] = [
    [60, 64, 67, 71],
    [57, 60, 64, 67],
    [53, 57, 60, 64],
    [55, 59, 62, 65],
];
const NODES: [&str; 2] = ["node-a", "node-b"];

#[derive(Debug)]
struct Onset {
    note: u8,
    at_ns: u64,
    frame: u64,
    frame_cluster_ns: u64,
}

struct NodeRecording {
    samples: Vec<f32>,
    sample_rate: u32,
    first_frame_cluster_ns: u64,
    late_events: u64,
    onsets: Vec<Onset>,
}

fn load(dir: &Path, id: &str) -> NodeRecording {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{id}.json")))
            .unwrap_or_else(|e| panic!("{id}.json: {e}")),
    )
    .expect("sidecar is JSON");
    let (samples, sample_rate) = read_wav_mono(dir.join(format!("{id}.wav")));
    assert_eq!(
        json["sample_rate"], sample_rate,
        "{id}: sidecar and WAV disagree"
    );
    let onsets = json["onsets"]
        .as_array()
        .expect("onsets[]")
        .iter()
        .map(|o| Onset {
            note: o["note"].as_u64().unwrap() as u8,
            at_ns: o["at_ns"].as_u64().unwrap(),
            frame: o["frame"].as_u64().unwrap(),
            frame_cluster_ns: o["frame_cluster_ns"].as_u64().unwrap(),
        })
        .collect();
    NodeRecording {
        samples,
        sample_rate,
        first_frame_cluster_ns: json["first_frame_cluster_ns"].as_u64().unwrap(),
        late_events: json["late_events"].as_u64().unwrap(),
        onsets,
    }
}

#[test]
fn demo_plays_the_phrase_across_both_nodes_in_time_and_stays_on_loopback() {
    let ns = Netns::new();
    ns.ip(&["route", "del", "224.0.0.0/4", "dev", "lo"]);
    ns.add_dummy_iface("vmlan0", "10.254.0.1/24");
    ns.ip(&["route", "add", "default", "dev", "vmlan0"]);
    let tx_before = ns.tx_packets("vmlan0");

    let dir = std::env::temp_dir().join(format!("vm-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = ns.command(voicemesh_bin());
    cmd.args(["demo", "--seconds", "8", "--audio"])
        .arg(format!("wav:{}", dir.display()));
    let mut demo = Child::spawn("demo", cmd);

    let url = demo.expect_line("dashboard: http://", Duration::from_secs(30));
    let dashboard = url.split("dashboard: ").nth(1).unwrap().trim().to_string();
    let api = dashboard.replacen("/?token=", "/api/cluster?token=", 1);
    assert_ne!(
        api, dashboard,
        "dashboard URL carries the token: {dashboard}"
    );

    // /api/cluster shows both nodes online while the demo runs.
    let max_online = ns.in_ns(|| {
        let start = Instant::now();
        let mut best = 0;
        while start.elapsed() < Duration::from_secs(6) {
            if let Ok(v) = try_http_get_json_local(&api) {
                let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
                let online: BTreeSet<String> = nodes
                    .iter()
                    .filter(|n| n["online"] == true && n["role"] == "node")
                    .map(|n| n["id"].as_str().unwrap_or("").to_string())
                    .collect();
                best = best.max(online.len());
                if online.len() == 2 {
                    assert_eq!(online, NODES.iter().map(|s| s.to_string()).collect());
                    for n in nodes.iter().filter(|n| n["role"] == "node") {
                        assert_eq!(n["voices"], 8);
                        assert!(n["clock_offset_ns"].is_i64(), "{n}");
                    }
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        best
    });
    assert_eq!(
        max_online,
        2,
        "both nodes online in /api/cluster\n{}",
        demo.output()
    );

    let status = demo
        .wait_timeout(Duration::from_secs(40))
        .expect("demo ends by itself");
    assert!(
        status.success(),
        "demo exit status {status}\n{}",
        demo.output()
    );
    let out = demo.output();
    assert!(out.contains("demo finished"), "{out}");
    // The simulated MCU node played the first chord's root (C3, 1 V above the base note C2) on
    // its virtual 12-bit 0–5 V DAC: pitch 1 V, gate 5 V, velocity 100/127 of 5 V.
    assert!(
        out.contains(
            "CV mcu-demo: root C3 = 1.000 V → pitch DAC code 819, gate code 4095, velocity code 3225"
        ),
        "{out}"
    );

    let tx_after = ns.tx_packets("vmlan0");

    let recs: BTreeMap<&str, NodeRecording> =
        NODES.iter().map(|&id| (id, load(&dir, id))).collect();
    for (id, r) in &recs {
        assert_eq!(r.late_events, 0, "{id}: late events");
    }

    // Onsets grouped by their chord: the coordinator stamps a whole OSC bundle with one `at`.
    let mut chords: BTreeMap<u64, BTreeMap<&str, Vec<&Onset>>> = BTreeMap::new();
    for (id, r) in &recs {
        for o in &r.onsets {
            chords
                .entry(o.at_ns)
                .or_default()
                .entry(id)
                .or_default()
                .push(o);
        }
    }
    assert!(
        chords.len() >= PHRASE.len(),
        "only {} chords played",
        chords.len()
    );

    let mut seen_chords = BTreeSet::new();
    let mut worst_spread_ns = 0u64;
    let mut worst_wav_spread_ns = 0u64;
    for (at, per_node) in &chords {
        // Every chord is spread over both nodes and is one of the phrase's chords, whole.
        assert_eq!(
            per_node.len(),
            2,
            "chord at {at} not on both nodes: {per_node:?}"
        );
        let notes: BTreeSet<u8> = per_node.values().flatten().map(|o| o.note).collect();
        let idx = PHRASE
            .iter()
            .position(|c| c.iter().copied().collect::<BTreeSet<u8>>() == notes)
            .unwrap_or_else(|| panic!("chord at {at} has notes {notes:?}, not a phrase chord"));
        seen_chords.insert(idx);

        // Model onsets: the frame each node started the chord on, in cluster time.
        let starts: Vec<u64> = per_node.values().map(|os| os[0].frame_cluster_ns).collect();
        let spread = starts.iter().max().unwrap() - starts.iter().min().unwrap();
        worst_spread_ns = worst_spread_ns.max(spread);

        // The same, measured in the audio: the first sound after silence (the gap between
        // chords is longer than the release, so it is digital silence), converted to cluster
        // time through each WAV's first-frame time.
        let mut heard = Vec::new();
        for (id, os) in per_node {
            let r = &recs[id];
            let sr = r.sample_rate as u64;
            let expect = os[0].frame as usize;
            let lo = expect.saturating_sub(r.sample_rate as usize / 100);
            let hi = (expect + r.sample_rate as usize / 100).min(r.samples.len());
            let found = onsets(&r.samples[lo..hi], r.sample_rate, 1e-5, 0.005);
            let f = lo
                + *found
                    .first()
                    .unwrap_or_else(|| panic!("{id}: no sound near frame {expect}"));
            let heard_ns = r.first_frame_cluster_ns + f as u64 * 1_000_000_000 / sr;
            let off = heard_ns.abs_diff(os[0].frame_cluster_ns);
            assert!(
                off < 50_000,
                "{id}: sound starts {off} ns away from the reported onset"
            );
            heard.push(heard_ns);

            // Each note this node played sounds at its pitch.
            let seg_start = expect + r.sample_rate as usize / 20; // after the attack
            let seg = &r.samples[seg_start..seg_start + r.sample_rate as usize * 4 / 10];
            for o in os {
                let want = midi_to_hz(o.note as f64);
                let got = peak_frequency(seg, r.sample_rate, want * 0.97, want * 1.03);
                assert!(
                    (got - want).abs() < 0.5,
                    "{id}: note {} measured {got:.2} Hz, expected {want:.2} Hz",
                    o.note
                );
            }
        }
        let wav_spread = heard.iter().max().unwrap() - heard.iter().min().unwrap();
        worst_wav_spread_ns = worst_wav_spread_ns.max(wav_spread);
    }
    assert_eq!(
        seen_chords.len(),
        PHRASE.len(),
        "every chord of the phrase was played"
    );
    println!(
        "{} chords; worst cross-node onset spread: model {:.1} µs, audio {:.1} µs",
        chords.len(),
        worst_spread_ns as f64 / 1e3,
        worst_wav_spread_ns as f64 / 1e3
    );
    assert!(
        worst_spread_ns < 1_000_000,
        "model onset spread {worst_spread_ns} ns ≥ 1 ms"
    );
    assert!(
        worst_wav_spread_ns < 1_000_000,
        "audio onset spread {worst_wav_spread_ns} ns ≥ 1 ms"
    );
    assert_eq!(
        tx_after, tx_before,
        "packets left through the LAN interface while the demo ran on loopback"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
