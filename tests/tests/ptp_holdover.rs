//! Cluster time with real processes: a `voicemesh node` started with a deliberate clock error
//! (`--test-clock-offset-ms 3 --test-clock-rate-ppm 50`) locks to the coordinator and reports
//! its PTP servo in `/api/cluster`; when the coordinator is killed the node says it holds over
//! (log) and keeps running; a new coordinator finds it, and the node re-acquires the new
//! grandmaster without a step.
//!
//! Everything runs in one network namespace of its own (loopback only).

use std::time::{Duration, Instant};
use voicemesh_tests::{Child, Netns, TempDir, try_http_get_json_local, voicemesh_bin};

fn coordinator(ns: &Netns, dir: &TempDir) -> (Child, String) {
    let mut cmd = ns.command(voicemesh_bin());
    cmd.args(["coordinator", "--no-link", "--state-dir"])
        .arg(dir.0.join("state"));
    let c = Child::spawn("coordinator", cmd);
    let line = c.expect_line("dashboard: http://", Duration::from_secs(30));
    let dashboard = line.split("dashboard: ").nth(1).unwrap().trim().to_string();
    let api = dashboard.replacen("/?token=", "/api/cluster?token=", 1);
    (c, api)
}

/// Polls `/api/cluster` until the node `id`'s `ptp` object satisfies `done`; returns it.
fn wait_ptp(
    ns: &Netns,
    api: &str,
    id: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool + Send,
) -> Result<serde_json::Value, Option<serde_json::Value>> {
    let api = api.to_string();
    let id = id.to_string();
    ns.in_ns(move || {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < timeout {
            if let Ok(v) = try_http_get_json_local(&api)
                && let Some(n) = v["nodes"]
                    .as_array()
                    .and_then(|a| a.iter().find(|n| n["id"] == id.as_str()))
            {
                let p = n["ptp"].clone();
                if done(&p) {
                    return Ok(p);
                }
                last = Some(p);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(last)
    })
}

#[test]
fn node_holds_over_when_the_coordinator_dies_and_reacquires_a_new_one_without_a_step() {
    let ns = Netns::new();
    let dir = TempDir::new("vm-ptp-holdover");
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let (mut coord, api) = coordinator(&ns, &dir);

    let mut cmd = ns.command(voicemesh_bin());
    cmd.args([
        "node",
        "--name",
        "h1",
        "--audio",
        "null",
        "--test-clock-offset-ms",
        "3",
        "--test-clock-rate-ppm",
        "50",
    ]);
    let node = Child::spawn("node", cmd);
    node.expect_line(
        "test clock error: started 3 ms off",
        Duration::from_secs(30),
    );

    // Locked, having stepped the 3 ms away, and the status says so.
    let started = Instant::now();
    let locked = wait_ptp(&ns, &api, "h1", Duration::from_secs(40), |p| {
        p["state"] == "locked"
    })
    .unwrap_or_else(|last| {
        panic!(
            "node never locked; last ptp {last:?}\n{}\n{}",
            node.output(),
            coord.output()
        )
    });
    println!(
        "locked after {:.1} s: {locked}",
        started.elapsed().as_secs_f64()
    );
    let steps = locked["steps"].as_u64().unwrap_or(0);
    assert_eq!(steps, 1, "3 ms is one step: {locked}");
    assert!(locked["offset_ns"].as_i64().unwrap_or(i64::MAX).abs() < 10_000);
    assert!(
        locked["path_delay_ns"].as_i64().unwrap_or(0) > 0,
        "{locked}"
    );
    // The rate the node's model runs at after the servo took its 50 ppm out (every clock in
    // the namespace is the same CLOCK_REALTIME): far from +50 000 ppb.
    assert!(
        locked["rate_ppb"].as_i64().unwrap_or(i64::MAX).abs() < 10_000,
        "{locked}"
    );

    // The coordinator dies: the node notices, says it holds over, and keeps running.
    coord.kill();
    let _ = coord.wait_timeout(Duration::from_secs(5));
    node.expect_line("lost its master: holdover", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));

    // A new coordinator: a new grandmaster (new identity) on the same timescale.
    let (coord2, api2) = coordinator(&ns, &dir);
    let relocked = wait_ptp(&ns, &api2, "h1", Duration::from_secs(40), |p| {
        p["state"] == "locked"
    })
    .unwrap_or_else(|last| {
        panic!(
            "node never re-locked; last ptp {last:?}\n{}\n{}",
            node.output(),
            coord2.output()
        )
    });
    println!("re-locked to the new coordinator: {relocked}");
    assert_eq!(
        relocked["steps"].as_u64(),
        Some(steps),
        "re-acquisition after holdover is slewed, not stepped: {relocked}"
    );
    let log = node.output();
    assert!(
        log.lines()
            .any(|l| l.contains("follows a master") && l.contains("\"holdover\"")),
        "the node logs that it left holdover for a master\n{log}"
    );
    drop(coord2);
    drop(node);
}
