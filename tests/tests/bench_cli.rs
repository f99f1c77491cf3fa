//! `voicemesh bench engine`: the real binary measures both engines and ends with the one line
//! scripts read; a bad duration is a clear error.

use std::process::Command;
use voicemesh_tests::voicemesh_bin;

/// Parses `reference_voices_per_core=N fm_voices_per_core=M`.
fn parse_last_line(line: &str) -> Option<(u64, u64)> {
    let (a, b) = line.split_once(' ')?;
    let number = |s: &str| {
        if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    Some((
        number(a.strip_prefix("reference_voices_per_core=")?)?,
        number(b.strip_prefix("fm_voices_per_core=")?)?,
    ))
}

#[test]
fn bench_engine_ends_with_the_machine_readable_line() {
    let out = Command::new(voicemesh_bin())
        .args(["bench", "engine", "--seconds", "0.2"])
        .output()
        .expect("run voicemesh bench engine");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or("");
    let (n, m) = parse_last_line(last).unwrap_or_else(|| {
        panic!("last line {last:?} is not the machine-readable line:\n{stdout}")
    });
    assert!(n > 0 && m > 0, "{last}");
    // Exactly one such line, and a table naming both engines before it.
    assert_eq!(stdout.matches("voices_per_core=").count(), 2, "{stdout}");
    assert!(
        stdout.contains("subtractive") && stdout.contains("fm2"),
        "{stdout}"
    );
    println!("{stdout}");
}

#[test]
fn bench_engine_refuses_a_bad_duration() {
    for bad in ["0", "-1", "nan"] {
        let out = Command::new(voicemesh_bin())
            .args(["bench", "engine", &format!("--seconds={bad}")])
            .output()
            .expect("run voicemesh bench engine");
        assert!(!out.status.success(), "--seconds {bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--seconds"), "--seconds {bad}: {err}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("voices_per_core="));
    }
}

#[test]
fn the_line_parser_is_strict() {
    assert_eq!(
        parse_last_line("reference_voices_per_core=812 fm_voices_per_core=2400"),
        Some((812, 2400))
    );
    for bad in [
        "",
        "reference_voices_per_core=812",
        "reference_voices_per_core=8.5 fm_voices_per_core=2",
        "reference_voices_per_core=1 fm_voices_per_core=2 extra",
        "fm_voices_per_core=2 reference_voices_per_core=1",
    ] {
        assert_eq!(parse_last_line(bad), None, "{bad:?}");
    }
}

#[test]
fn bench_alloc_ends_with_the_machine_readable_line() {
    let out = Command::new(voicemesh_bin())
        .args(["bench", "alloc", "--seconds", "0.2"])
        .output()
        .expect("run voicemesh bench alloc");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or("");
    let (pairs, p99) = last
        .split_once(' ')
        .and_then(|(a, b)| {
            Some((
                a.strip_prefix("pairs_per_s=")?.parse::<u64>().ok()?,
                b.strip_prefix("p99_op_us=")?.parse::<f64>().ok()?,
            ))
        })
        .unwrap_or_else(|| panic!("last line {last:?} is not the machine-readable line"));
    assert!(pairs > 0 && p99 >= 0.0, "{last}");
    let bad = Command::new(voicemesh_bin())
        .args(["bench", "alloc", "--seconds=0"])
        .output()
        .expect("run voicemesh bench alloc");
    assert!(!bad.status.success());
}
