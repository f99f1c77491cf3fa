//! `voicemesh bench input`: the real binary measures RTP-MIDI and OSC input latency inside the
//! coordinator and ends with the one line scripts read.

use voicemesh_tests::{Netns, voicemesh_bin};

/// Parses `rtpmidi_p50_us=A rtpmidi_p99_us=B osc_p50_us=C osc_p99_us=D`.
fn parse(line: &str) -> Option<[u64; 4]> {
    let mut out = [0; 4];
    let mut words = line.split(' ');
    for (i, key) in [
        "rtpmidi_p50_us=",
        "rtpmidi_p99_us=",
        "osc_p50_us=",
        "osc_p99_us=",
    ]
    .iter()
    .enumerate()
    {
        let v = words.next()?.strip_prefix(key)?;
        if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        out[i] = v.parse().ok()?;
    }
    words.next().is_none().then_some(out)
}

#[test]
fn bench_input_ends_with_the_machine_readable_line() {
    // In a namespace of its own: the in-process node and coordinator use mDNS and PTP on
    // loopback.
    let ns = Netns::new();
    let out = ns
        .command(voicemesh_bin())
        .args(["bench", "input", "--notes", "100"])
        .output()
        .expect("run voicemesh bench input");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or("");
    let [rp50, rp99, op50, op99] =
        parse(last).unwrap_or_else(|| panic!("last line {last:?} is not the line:\n{stdout}"));
    assert!(rp50 <= rp99 && op50 <= op99, "{last}");
    // Exactly one such line, after a table with both inputs and their sample counts.
    assert_eq!(stdout.matches("rtpmidi_p50_us=").count(), 1, "{stdout}");
    assert!(
        stdout.contains("rtp-midi") && stdout.contains("osc"),
        "{stdout}"
    );
    println!("{stdout}");
    let bad = ns
        .command(voicemesh_bin())
        .args(["bench", "input", "--notes", "0"])
        .output()
        .expect("run voicemesh bench input");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--notes"));
}

#[test]
fn the_line_parser_is_strict() {
    assert_eq!(
        parse("rtpmidi_p50_us=61 rtpmidi_p99_us=180 osc_p50_us=55 osc_p99_us=170"),
        Some([61, 180, 55, 170])
    );
    for bad in [
        "",
        "rtpmidi_p50_us=61 rtpmidi_p99_us=180 osc_p50_us=55",
        "rtpmidi_p50_us=6.1 rtpmidi_p99_us=180 osc_p50_us=55 osc_p99_us=170",
        "rtpmidi_p50_us=61 rtpmidi_p99_us=180 osc_p50_us=55 osc_p99_us=170 x",
        "osc_p50_us=55 osc_p99_us=170 rtpmidi_p50_us=61 rtpmidi_p99_us=180",
    ] {
        assert_eq!(parse(bad), None, "{bad:?}");
    }
}
