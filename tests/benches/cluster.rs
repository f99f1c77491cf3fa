//! Cluster start-up and control-path latency, measured on real processes in a private network
//! namespace (see docs/benchmarks.md for figures and how to run it).
//!
//! 1. Join time: from spawning `voicemesh node` to the coordinator's `/api/cluster` showing it
//!    online (mDNS discovery + QUIC handshake + hello/welcome), over several runs.
//! 2. OSC → session latency inside the coordinator: from the OSC datagram received to the
//!    VoiceOn frame written to the node's QUIC stream, as the coordinator records it (p50, p99
//!    of `latency.osc_to_session_us`), with a same-run baseline: a plain UDP datagram's
//!    one-way loopback latency from this process to itself.
//!
//! Run: `VOICEMESH_BIN=target/release/voicemesh VOICEMESH_PYTHON=.venv/bin/python cargo bench -p
//! voicemesh-tests --bench cluster` (`scripts/test-all.sh` prepares both).

use std::net::UdpSocket;
use std::time::{Duration, Instant};
use voicemesh_tests::{Child, Netns, try_http_get_json_local, voicemesh_bin};

const JOIN_RUNS: usize = 8;
const NOTES: usize = 2000;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let ns = Netns::new();
    let dir = std::env::temp_dir().join(format!("vm-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = ns.command(voicemesh_bin());
    cmd.args(["coordinator", "--lookahead-ms", "5", "--state-dir"])
        .arg(dir.join("state"));
    let coordinator = Child::spawn("coordinator", cmd);
    let line = coordinator.expect_line("dashboard: http://", Duration::from_secs(30));
    let api = line.split("dashboard: ").nth(1).unwrap().trim().replacen(
        "/?token=",
        "/api/cluster?token=",
        1,
    );

    let online = |v: &serde_json::Value, id: &str| {
        v["nodes"]
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n["id"] == id && n["online"] == true))
    };

    // 1. Join time.
    let mut joins = Vec::new();
    let mut kept = None;
    for run in 0..JOIN_RUNS {
        let id = format!("bench-{run}");
        let mut cmd = ns.command(voicemesh_bin());
        cmd.args(["node", "--name", &id, "--audio", "null"]);
        let api = api.clone();
        let (mut node, took) = ns.in_ns(|| {
            let t0 = Instant::now();
            let node = Child::spawn(&id, cmd);
            loop {
                if let Ok(v) = try_http_get_json_local(&api)
                    && online(&v, &id)
                {
                    return (node, t0.elapsed());
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "{id} never joined\n{}",
                    node.output()
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        joins.push(took.as_secs_f64() * 1e3);
        if run + 1 < JOIN_RUNS {
            node.signal(libc::SIGTERM);
            node.wait_timeout(Duration::from_secs(10));
        } else {
            // Keep the last node for the latency run.
            kept = Some(node);
        }
    }
    joins.sort_by(f64::total_cmp);
    println!(
        "join: runs={JOIN_RUNS} median_ms={:.0} max_ms={:.0} min_ms={:.0}",
        percentile(&joins, 0.5),
        joins[joins.len() - 1],
        joins[0]
    );

    // 2. OSC → session latency, with a plain-UDP baseline in the same run.
    let last = format!("bench-{}", JOIN_RUNS - 1);
    let (osc, baseline) = ns.in_ns(|| {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut baseline = Vec::new();
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..NOTES {
            let note = 36 + (i % 48) as i32;
            for vel in [100, 0] {
                let msg = rosc_like_note(note, vel);
                sock.send_to(&msg, "127.0.0.1:9000").unwrap();
                // Baseline: the same datagram through loopback to ourselves.
                let t = Instant::now();
                sock.send_to(&msg, echo.local_addr().unwrap()).unwrap();
                let mut buf = [0u8; 128];
                echo.recv(&mut buf).unwrap();
                baseline.push(t.elapsed().as_secs_f64() * 1e6);
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        (try_http_get_json_local(&api).unwrap(), baseline)
    });
    let mut baseline = baseline;
    baseline.sort_by(f64::total_cmp);
    let l = &osc["latency"]["osc_to_session_us"];
    println!(
        "osc_to_session: count={} p50_us={} p99_us={} max_us={} (node {last}); \
         baseline loopback UDP one-way: p50_us={:.1} p99_us={:.1}",
        l["count"],
        l["p50"],
        l["p99"],
        l["max"],
        percentile(&baseline, 0.5),
        percentile(&baseline, 0.99)
    );
    drop(kept);
    drop(coordinator);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/voicemesh/note iii` encoded by hand (OSC 1.0: padded address, padded type tags, big-endian
/// int32 arguments), so the bench measures the coordinator, not an encoder.
fn rosc_like_note(note: i32, velocity: i32) -> Vec<u8> {
    let mut v = Vec::with_capacity(40);
    v.extend_from_slice(b"/voicemesh/note\0");
    v.extend_from_slice(b",iii\0\0\0\0");
    for x in [note, velocity, 0] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}
