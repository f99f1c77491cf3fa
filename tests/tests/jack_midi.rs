//! MIDI through JACK: `voicemesh coordinator --jack-midi` on a private jackd (dummy driver),
//! fed by a real JACK MIDI client — jackd2's `jack_midiseq`, which loops a C4 (held a quarter
//! second) every half second — and a node recording WAV. The notes sound, and keep the
//! sequencer's spacing: their JACK frame times are honoured.

use std::process::Command;
use std::time::{Duration, Instant};
use voicemesh_tests::{
    Child, Jackd, Netns, onsets, read_wav_mono, try_http_get_json_local, voicemesh_bin,
};

#[test]
fn jack_midiseq_notes_sound_half_a_second_apart() {
    let jack = Jackd::start("vmjmidi");
    let ns = Netns::new();
    let dir = std::env::temp_dir().join(format!("vm-jackmidi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    // The sequencer first: 24000-frame loop (0.5 s at 48 kHz), note 60 from frame 0 for 12000.
    let mut seq = Command::new("jack_midiseq");
    seq.args(["vmseq", "24000", "0", "60", "12000"])
        .env("JACK_DEFAULT_SERVER", &jack.name);
    let seq = Child::spawn("jack_midiseq", seq);
    let t0 = Instant::now();
    loop {
        let out = Command::new("jack_lsp")
            .env("JACK_DEFAULT_SERVER", &jack.name)
            .output()
            .expect("jack_lsp (jackd2's tools)");
        if String::from_utf8_lossy(&out.stdout).contains("vmseq:out") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "jack_midiseq never registered vmseq:out\n{}",
            seq.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut cmd = ns.command(voicemesh_bin());
    cmd.args([
        "coordinator",
        "--rtpmidi-port",
        "0",
        "--jack-midi-connect",
        "vmseq:out",
    ])
    .arg("--state-dir")
    .arg(dir.join("state"))
    .env("JACK_DEFAULT_SERVER", &jack.name);
    let coordinator = Child::spawn("coordinator", cmd);
    let line = coordinator.expect_line("dashboard: http://", Duration::from_secs(30));
    let port = coordinator.expect_line("jack-midi: ", Duration::from_secs(5));
    assert!(port.contains(":midi_in"), "{port}");
    let api = line.split("dashboard: ").nth(1).unwrap().trim().replacen(
        "/?token=",
        "/api/cluster?token=",
        1,
    );

    let mut cmd = ns.command(voicemesh_bin());
    cmd.args(["node", "--name", "node-a", "--audio"])
        .arg(format!("wav:{}", dir.display()));
    let mut node = Child::spawn("node-a", cmd);
    node.expect_line("control session on quic://", Duration::from_secs(30));

    // Once the node is online, the sequencer's notes sound on it: wait for a few.
    let started = ns.in_ns(move || {
        let t = Instant::now();
        let mut last = None;
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(v) = try_http_get_json_local(&api) {
                if v["nodes"][0]["online"] == true && v["nodes"][0]["sounding_voices"] == 1 {
                    return Ok(Instant::now());
                }
                last = Some(v);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(last)
    });
    started.unwrap_or_else(|last| {
        panic!(
            "no JACK MIDI note sounded; last /api/cluster: {last:?}\n{}",
            coordinator.output()
        )
    });
    // Let three more loops play, then stop the node and read what it recorded.
    std::thread::sleep(Duration::from_millis(1600));
    node.signal(libc::SIGTERM);
    assert!(
        node.wait_timeout(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "{}",
        node.output()
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("node-a.json")).unwrap()).unwrap();
    let starts: Vec<u64> = json["onsets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["note"] == 60)
        .map(|o| o["at_ns"].as_u64().unwrap())
        .collect();
    assert!(
        starts.len() >= 3,
        "C4 started {} times: {json}",
        starts.len()
    );
    // jack_midiseq writes each note-on at frame 0 of its loop: 0.5 s apart on JACK's clock.
    // Mapped through the drain-time clock offset the spacing holds within a millisecond.
    for w in starts.windows(2) {
        let gap = w[1] as i64 - w[0] as i64;
        assert!(
            (gap - 500_000_000).abs() < 1_000_000,
            "note-ons {gap} ns apart: {starts:?}"
        );
    }
    let (samples, sr) = read_wav_mono(dir.join("node-a.wav"));
    assert!(
        onsets(&samples, sr, 1e-3, 0.1).len() >= 3,
        "the notes are audible"
    );
    drop(coordinator);
    drop(seq);
    let _ = std::fs::remove_dir_all(&dir);
}
