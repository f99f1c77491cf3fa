//! Ableton Link interop: the `voicemesh coordinator` binary against a real Link peer
//! (LinkPython-extern, Ableton's Link library inside) run as a separate Python process, in
//! network namespaces of their own.
//!
//! Phase is compared at the same host instant: the Python peer reports `phaseAtTime(t, 4)` for
//! a `t` read from Link's clock (`CLOCK_MONOTONIC_RAW`); the test maps `t` to cluster time (the
//! coordinator is the grandmaster, so cluster time is `CLOCK_REALTIME` + 37 s TAI offset, as
//! docs/link.md says) and evaluates the coordinator's cluster timeline from `/api/tempo` there.
//! Agreement must be within 0.1 ms worth of beats.

use std::io::{BufReader, Write};
use std::process::{ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use voicemesh_tests::{
    Child, Netns, TempDir, VethLink, clock_ns, cluster_minus_monotonic_raw_ns, python,
    voicemesh_bin,
};

const QUANTUM: f64 = 4.0;
/// How long the founding peer runs alone before the other starts: the scenario itself (the
/// founder's session must be more than 500 ms of ghost time older), not a synchronisation.
const FOUNDER_HEAD_START: Duration = Duration::from_millis(2000);

/// A Link peer driven over stdin/stdout, one JSON line answering each command.
const PEER: &str = r#"
import json, sys, link
l = link.Link(float(sys.argv[1]))
l.startStopSyncEnabled = True
l.enabled = True
def out(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()
out(ready=True)
for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        continue
    t = l.clock().micros()
    if cmd[0] == "state":
        s = l.captureSessionState()
        out(t=t, tempo=s.tempo(), phase=s.phaseAtTime(t, 4.0), playing=s.isPlaying(),
            peers=l.numPeers())
    elif cmd[0] == "tempo":
        s = l.captureAppSessionState()
        s.setTempo(float(cmd[1]), t)
        l.commitAppSessionState(s)
        out(ok=True)
    elif cmd[0] == "play":
        s = l.captureAppSessionState()
        s.setIsPlaying(cmd[1] == "1", t)
        l.commitAppSessionState(s)
        out(ok=True)
"#;

struct PyPeer {
    child: std::process::Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

#[derive(Debug, Clone, Copy)]
struct PyState {
    t: i64,
    tempo: f64,
    phase: f64,
    playing: bool,
    peers: u64,
}

impl PyPeer {
    fn start(ns: &Netns, bpm: f64) -> PyPeer {
        let mut c = ns.command(python());
        c.args(["-c", PEER, &bpm.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c.spawn().expect("python Link peer starts");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut p = PyPeer {
            child,
            stdin,
            stdout,
        };
        let ready = p.line();
        assert_eq!(ready["ready"], true, "{ready}");
        p
    }

    fn line(&mut self) -> serde_json::Value {
        voicemesh_tests::link_peer_line(&mut self.stdout)
    }

    fn cmd(&mut self, c: &str) -> serde_json::Value {
        writeln!(self.stdin, "{c}").expect("peer stdin");
        self.line()
    }

    fn state(&mut self) -> PyState {
        let v = self.cmd("state");
        PyState {
            t: v["t"].as_i64().unwrap(),
            tempo: v["tempo"].as_f64().unwrap(),
            phase: v["phase"].as_f64().unwrap(),
            playing: v["playing"].as_bool().unwrap(),
            peers: v["peers"].as_u64().unwrap(),
        }
    }
}

impl Drop for PyPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The coordinator binary with Link on, inside `ns`.
struct Coord {
    child: Child,
    base: String,
    token: String,
    _dir: TempDir,
}

impl Coord {
    fn start(ns: &Netns, extra: &[&str]) -> Coord {
        let dir = TempDir::new("vm-link");
        let mut cmd = ns.command(voicemesh_bin());
        cmd.args(["coordinator", "--link", "--state-dir"])
            .arg(dir.0.join("state"))
            .args(extra)
            .env("RUST_LOG", "warn,voicemesh_coordinator::link=debug");
        let child = Child::spawn("coordinator", cmd);
        let line = child.expect_line("dashboard: http://", Duration::from_secs(30));
        let url = line.split("dashboard: ").nth(1).unwrap().trim();
        let (base, token) = url.split_once("/?token=").unwrap();
        Coord {
            child,
            base: base.to_owned(),
            token: token.to_owned(),
            _dir: dir,
        }
    }

    /// `/api/tempo` (call inside the namespace, see [`Netns::in_ns`]).
    fn tempo(&self) -> serde_json::Value {
        let url = format!("{}/api/tempo?token={}", self.base, self.token);
        voicemesh_tests::http_get_json_local(&url)
    }

    fn post(&self, body: &str) -> serde_json::Value {
        let url = format!("{}/api/tempo?token={}", self.base, self.token);
        let mut r = ureq::post(&url)
            .header("Content-Type", "application/json")
            .send(body)
            .unwrap_or_else(|e| panic!("POST {body}: {e}"));
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("coordinator output:\n{}", self.child.output());
        }
    }
}

/// Beats of the cluster timeline (`/api/tempo` `timeline`) at cluster time `t_ns`.
fn beats_at(tl: &serde_json::Value, t_ns: i128) -> f64 {
    let npb = tl["ns_per_beat"].as_u64().unwrap() as f64;
    let b0 = tl["beat0_micro"].as_i64().unwrap() as f64 / 1e6;
    let t0 = i128::from(tl["t0"].as_u64().unwrap());
    b0 + (t_ns - t0) as f64 / npb
}

/// Waits until `cond` holds, polling every 5 ms; returns how long it took.
fn within(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Samples the phase of both peers at `n` shared host instants; returns the largest
/// disagreement in ms.
fn phase_agreement(ns: &Netns, coord: &Coord, py: &mut PyPeer, n: usize) -> f64 {
    let mut worst: f64 = 0.0;
    for i in 0..n {
        let p = py.state();
        let tl = ns.in_ns(|| coord.tempo())["timeline"].clone();
        let off = cluster_minus_monotonic_raw_ns();
        let ours = beats_at(&tl, i128::from(p.t) * 1000 + off).rem_euclid(QUANTUM);
        let mut d = (ours - p.phase).abs();
        d = d.min(QUANTUM - d);
        let ms = d * 60_000.0 / p.tempo;
        println!(
            "sample {i}: host {} µs python {:.6} ours {ours:.6} → {ms:.4} ms",
            p.t, p.phase
        );
        worst = worst.max(ms);
        std::thread::sleep(Duration::from_millis(50));
    }
    worst
}

fn tempo_of(v: &serde_json::Value) -> f64 {
    v["tempo_bpm"].as_f64().unwrap()
}

/// Tempo and start/stop both ways within 0.5 s, then phase agreement again.
fn edits_travel_both_ways(ns: &Netns, coord: &Coord, py: &mut PyPeer) {
    // Python changes the tempo → the coordinator follows.
    py.cmd("tempo 133.5");
    let d = within(
        Duration::from_millis(500),
        "tempo python → coordinator",
        || (tempo_of(&ns.in_ns(|| coord.tempo())) - 133.5).abs() < 0.001,
    );
    println!("tempo python → coordinator in {d:?}");
    // The coordinator changes it → Python follows.
    ns.in_ns(|| coord.post(r#"{"tempo_bpm": 101.25}"#));
    let d = within(
        Duration::from_millis(500),
        "tempo coordinator → python",
        || (py.state().tempo - 101.25).abs() < 0.001,
    );
    println!("tempo coordinator → python in {d:?}");
    // Start from Python, stop from the coordinator, start from the coordinator.
    py.cmd("play 1");
    let d = within(
        Duration::from_millis(500),
        "start python → coordinator",
        || ns.in_ns(|| coord.tempo())["playing"] == true,
    );
    println!("start python → coordinator in {d:?}");
    ns.in_ns(|| coord.post(r#"{"playing": false}"#));
    let d = within(
        Duration::from_millis(500),
        "stop coordinator → python",
        || !py.state().playing,
    );
    println!("stop coordinator → python in {d:?}");
    ns.in_ns(|| coord.post(r#"{"playing": true}"#));
    within(
        Duration::from_millis(500),
        "start coordinator → python",
        || py.state().playing,
    );
    py.cmd("play 0");
    within(
        Duration::from_millis(500),
        "stop python → coordinator",
        || ns.in_ns(|| coord.tempo())["playing"] == false,
    );
    let worst = phase_agreement(ns, coord, py, 20);
    assert!(worst <= 0.1, "phase after edits differs by {worst:.4} ms");
}

#[test]
fn coordinator_joins_a_python_session_and_keeps_its_phase() {
    let ns = Netns::new();
    let mut py = PyPeer::start(&ns, 97.0);
    // Let the Python peer's session be clearly older (> 500 ms of ghost time). Measured: its
    // ghost time starts up to ~0.5 s after `enabled = True` returns, so wait well beyond.
    std::thread::sleep(FOUNDER_HEAD_START);
    let mut coord = Coord::start(&ns, &[]);
    let d = within(Duration::from_secs(5), "coordinator adopts 97 BPM", || {
        let t = ns.in_ns(|| coord.tempo());
        (tempo_of(&t) - 97.0).abs() < 0.001 && t["link"]["peers"] == 1
    });
    println!("joined in {d:?}");
    // Python counts the coordinator once its first ALIVE in Python's session arrives.
    within(
        Duration::from_millis(500),
        "Python counts the coordinator",
        || py.state().peers == 1,
    );
    assert!(
        (py.state().tempo - 97.0).abs() < 0.001,
        "Python kept its tempo"
    );
    let worst = phase_agreement(&ns, &coord, &mut py, 25);
    println!("phase agreement (Python founded): worst {worst:.4} ms over 25 samples");
    assert!(worst <= 0.1, "phase differs by {worst:.4} ms");
    edits_travel_both_ways(&ns, &coord, &mut py);

    // The coordinator leaves cleanly: its BYEBYE drops it at once (well under the 5 s TTL).
    coord.child.signal(libc::SIGTERM);
    let d = within(Duration::from_secs(2), "Python sees the BYEBYE", || {
        py.state().peers == 0
    });
    println!("BYEBYE seen after {d:?}");
    assert!(
        d < Duration::from_secs(1),
        "peer dropped only after {d:?}: no BYEBYE?"
    );
    assert!(coord.child.wait_timeout(Duration::from_secs(5)).is_some());
}

#[test]
fn python_joins_the_coordinators_session_and_a_vanished_peer_is_dropped() {
    let ns = Netns::new();
    let coord = Coord::start(&ns, &[]);
    ns.in_ns(|| coord.post(r#"{"tempo_bpm": 128.0}"#));
    std::thread::sleep(FOUNDER_HEAD_START);
    let mut py = PyPeer::start(&ns, 90.0);
    let d = within(Duration::from_secs(5), "Python adopts 128 BPM", || {
        let s = py.state();
        (s.tempo - 128.0).abs() < 0.001 && s.peers == 1
    });
    println!("Python joined in {d:?}");
    // The coordinator counts the Python peer once its first ALIVE in our session arrives.
    within(
        Duration::from_millis(500),
        "coordinator counts Python",
        || ns.in_ns(|| coord.tempo())["link"]["peers"] == 1,
    );
    let t = ns.in_ns(|| coord.tempo());
    assert!((tempo_of(&t) - 128.0).abs() < 0.001, "{t}");
    let worst = phase_agreement(&ns, &coord, &mut py, 25);
    println!("phase agreement (coordinator founded): worst {worst:.4} ms over 25 samples");
    assert!(worst <= 0.1, "phase differs by {worst:.4} ms");

    // The Python peer dies without a BYEBYE: dropped within 6 s, and the coordinator keeps
    // its tempo and beat.
    let before = ns.in_ns(|| coord.tempo());
    drop(py);
    let gone = Instant::now();
    within(
        Duration::from_secs(7),
        "coordinator drops the dead peer",
        || ns.in_ns(|| coord.tempo())["link"]["peers"] == 0,
    );
    let d = gone.elapsed();
    println!("dead peer dropped after {d:?}");
    assert!(d <= Duration::from_secs(6), "dropped after {d:?}");
    let after = ns.in_ns(|| coord.tempo());
    assert!((tempo_of(&after) - 128.0).abs() < 0.001, "{after}");
    // Beats continue across the reset (same line, within rounding).
    let off = cluster_minus_monotonic_raw_ns();
    let now = clock_ns(libc::CLOCK_MONOTONIC_RAW) / 1000 * 1000 + off;
    let jump = (beats_at(&after["timeline"], now) - beats_at(&before["timeline"], now)).abs();
    assert!(jump < 1e-3, "beat jumped by {jump} at the reset");
}

#[test]
fn link_works_across_two_namespaces_joined_by_veth() {
    let a = Netns::new();
    let b = Netns::new();
    let veth = VethLink::connect(&a, "10.77.0.1/24", &b, "10.77.0.2/24");
    // Link peers open a gateway only on a running interface and rescan every 5 s: start them
    // once the pair has carrier.
    for (ns, iface) in [(&a, veth.a_iface()), (&b, veth.b_iface())] {
        within(Duration::from_secs(5), "veth carrier", || {
            ns.ip(&["-o", "link", "show", "dev", iface])
                .contains("LOWER_UP")
        });
    }
    let mut py = PyPeer::start(&b, 111.0);
    std::thread::sleep(FOUNDER_HEAD_START);
    let coord = Coord::start(&a, &["--lan", "--interface", "10.77.0.1"]);
    let d = within(
        Duration::from_secs(5),
        "coordinator adopts 111 BPM over veth",
        || {
            let t = a.in_ns(|| coord.tempo());
            (tempo_of(&t) - 111.0).abs() < 0.001 && t["link"]["peers"] == 1
        },
    );
    println!("joined over veth in {d:?}");
    let worst = phase_agreement(&a, &coord, &mut py, 25);
    println!("phase agreement over veth: worst {worst:.4} ms over 25 samples");
    assert!(worst <= 0.1, "phase differs by {worst:.4} ms");
    edits_travel_both_ways(&a, &coord, &mut py);
}
