//! Issue 4's bar, measured on real processes: a coordinator and three nodes, each in its own
//! network namespace on one bridge, the nodes' cluster clocks started 3 ms / 1.5 ms off and
//! ±50 / −25 ppm fast or slow (`--test-clock-offset-ms`, `--test-clock-rate-ppm`). After
//! convergence, 200 chords spread over all three nodes must start within one sample at 48 kHz
//! (p99 ≤ 20.8 µs) with a median ≤ 5 µs.
//!
//! And the "convergence from 3 ms / 50 ppm takes under 10 s": the bench's `converge_s`
//! (from the nodes' start to the first of 10 probe chords in a row within one sample) must be
//! under 10 s. The PTP slave's frequency probe (docs/timing.md, "Acquisition") brought it from
//! ~11 s to ~5 s.
//!
//! The test drives `voicemesh bench sync --netns`, which measures each chord's spread from the
//! `CLOCK_MONOTONIC` instants at which each node's output emits the note's first frame — the
//! clock every namespace of the machine shares — never from the nodes' own clock models. The
//! bench also runs a free-running `ptp4l -S` pair on the same bridge and prints its offset rms
//! as the floor (linuxptp must be installed: the test fails otherwise).

use std::process::Command;
use voicemesh_tests::voicemesh_bin;

/// The four figures of the bench's last line.
#[derive(Debug, PartialEq)]
struct Figures {
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    converge_s: f64,
}

fn parse(line: &str) -> Option<Figures> {
    let mut v = [0f64; 4];
    let keys = [
        "p50_onset_spread_us=",
        "p99_onset_spread_us=",
        "max_onset_spread_us=",
        "converge_s=",
    ];
    let fields: Vec<&str> = line.split(' ').collect();
    if fields.len() != 4 {
        return None;
    }
    for ((f, k), out) in fields.iter().zip(keys).zip(v.iter_mut()) {
        *out = f.strip_prefix(k)?.parse().ok()?;
    }
    Some(Figures {
        p50_us: v[0],
        p99_us: v[1],
        max_us: v[2],
        converge_s: v[3],
    })
}

#[test]
fn last_line_parses() {
    assert_eq!(
        parse(
            "p50_onset_spread_us=1.39 p99_onset_spread_us=1.72 max_onset_spread_us=1.72 converge_s=9.75"
        ),
        Some(Figures {
            p50_us: 1.39,
            p99_us: 1.72,
            max_us: 1.72,
            converge_s: 9.75
        })
    );
    assert_eq!(parse("p50_onset_spread_us=1 p99_onset_spread_us=2"), None);
}

#[test]
fn three_nodes_start_chords_within_one_sample() {
    let out = Command::new(voicemesh_bin())
        .args([
            "bench",
            "sync",
            "--netns",
            "--chords",
            "200",
            "--offset-ms",
            "3",
            "--rate-ppm",
            "50",
            "--converge-timeout-s",
            "30",
        ])
        .output()
        .expect("run voicemesh bench sync");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench sync failed:\n{stdout}\n{stderr}"
    );
    println!("{stdout}");
    let last = stdout.lines().last().unwrap_or("");
    let f = parse(last).unwrap_or_else(|| panic!("last line {last:?} is not the summary"));
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("p50_onset_spread_us="))
            .count(),
        1,
        "exactly one summary line"
    );
    assert!(
        stdout.contains("(200 chords, all 3 nodes)"),
        "every one of the 200 chords reached all three nodes:\n{stdout}"
    );
    assert!(
        stdout.contains("ptp4l -S floor (free-running pair"),
        "the ptp4l floor was measured in the same run:\n{stdout}"
    );
    assert!(
        f.p99_us <= 20.8,
        "p99 onset spread {} µs > one sample at 48 kHz",
        f.p99_us
    );
    assert!(
        f.p50_us <= 5.0,
        "median onset spread {} µs > 5 µs",
        f.p50_us
    );
    assert!(
        f.converge_s > 0.0 && f.converge_s < 10.0,
        "convergence from 3 ms / 50 ppm took {} s (the issue asks under 10 s)",
        f.converge_s
    );
    assert!(f.max_us >= f.p99_us && f.p99_us >= f.p50_us, "{f:?}");
}
