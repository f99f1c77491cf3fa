//! A real `voicemesh node --audio jack --voices 64` on a real JACK server (jackd2, dummy
//! driver, unique server name), played by a real OSC client through a real coordinator: 64
//! notes held for 10 s with no xrun caused by the engine, the output recorded by JACK's own
//! `jack_rec` and not silent, load mean/max read from `/api/cluster`.
//!
//! "Caused by the engine" is what the test can and does prove: the node reports, every 100 ms,
//! the longest time any of its callbacks took as a share of the block's budget, and the test
//! reads every report (it polls twice per period) and requires every block to have finished
//! within its budget. The dummy driver on a shared 2-vCPU machine now and then reports an xrun
//! while the node's callbacks used 3 % of their budget — the server's thread was not scheduled
//! in time, which no engine can cause or prevent; those are printed, not failed.
//!
//! jackd runs in the root namespace; the coordinator, the node and the OSC client run in a
//! network namespace of their own. JACK's shared memory and its unix sockets are filesystem
//! objects, so the node reaches the server across the namespace boundary; the server's name
//! reaches every client through `JACK_DEFAULT_SERVER`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use voicemesh_tests::{
    Child, Jackd, Netns, python, read_wav_mono, try_http_get_json_local, voicemesh_bin,
};

const VOICES: usize = 64;
const HOLD: Duration = Duration::from_secs(10);

fn node_json<'a>(v: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    v["nodes"].as_array()?.iter().find(|n| n["id"] == id)
}

/// Polls `/api/cluster` from inside the namespace until `done` accepts it.
fn wait_api(
    ns: &Netns,
    api: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool + Send,
) -> Result<serde_json::Value, Option<serde_json::Value>> {
    let api = api.to_string();
    ns.in_ns(move || {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < timeout {
            if let Ok(v) = try_http_get_json_local(&api) {
                if done(&v) {
                    return Ok(v);
                }
                last = Some(v);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(last)
    })
}

#[test]
fn jack_node_holds_64_voices_for_10_s_without_engine_xruns() {
    let jack = Jackd::start("vmjack");
    let ns = Netns::new();
    let dir = std::env::temp_dir().join(format!("vm-jacknode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let mut cmd = ns.command(voicemesh_bin());
    // A lookahead above the node's output latency on the dummy driver (512 frames, 10.7 ms):
    // with the default 5 ms every note reaches the node after its block was rendered (late).
    cmd.args(["coordinator", "--lookahead-ms", "20", "--state-dir"])
        .arg(dir.join("state"));
    let coordinator = Child::spawn("coordinator", cmd);
    let line = coordinator.expect_line("dashboard: http://", Duration::from_secs(30));
    let dashboard = line.split("dashboard: ").nth(1).unwrap().trim().to_string();
    let api = dashboard.replacen("/?token=", "/api/cluster?token=", 1);

    let id = "jn";
    let mut cmd = ns.command(voicemesh_bin());
    cmd.args(["node", "--name", id, "--audio", "jack", "--voices", "64"])
        .env("JACK_DEFAULT_SERVER", &jack.name);
    let node = Child::spawn("node", cmd);
    let up = node.expect_line("control session on quic://", Duration::from_secs(30));
    assert!(
        up.contains(&format!("JACK client voicemesh-{id} -> system:playback_1")),
        "{up}"
    );
    // The real-time line: JACK's process thread as the node saw it in its first callback.
    let rt = node.expect_line("realtime: JACK process thread", Duration::from_secs(5));
    assert!(rt.contains("runs SCHED_"), "{rt}");
    println!("{}", rt.trim());

    // Online, and its clock locked to the coordinator's: before that, `at` means nothing to it.
    wait_api(&ns, &api, Duration::from_secs(40), |v| {
        node_json(v, id)
            .is_some_and(|n| n["online"] == true && n["voices"] == 64 && n["clock_locked"] == true)
    })
    .unwrap_or_else(|last| panic!("node never online and locked with 64 voices: {last:?}"));

    // 64 notes on, held, then off; the coordinator renews their leases meanwhile.
    let script = format!(
        r#"
import sys, time
from pythonosc.udp_client import SimpleUDPClient
c = SimpleUDPClient("127.0.0.1", 9000)
notes = range(30, 30 + {VOICES})
for n in notes:
    c.send_message("/voicemesh/note", [n, 90, 0])
print("on", flush=True)
time.sleep({hold})
for n in notes:
    c.send_message("/voicemesh/note", [n, 0, 0])
print("off", flush=True)
"#,
        hold = HOLD.as_secs_f64()
    );
    let mut osc = Child::spawn("python-osc", {
        let mut cmd = ns.command(python());
        cmd.args(["-c", &script]);
        cmd
    });
    osc.expect_line("on", Duration::from_secs(10));
    let held_at = Instant::now();
    wait_api(&ns, &api, Duration::from_secs(5), |v| {
        node_json(v, id)
            .is_some_and(|n| n["sounding_voices"] == VOICES && n["active_voices"] == VOICES)
    })
    .unwrap_or_else(|last| panic!("the node never sounded {VOICES} voices: {last:?}"));

    // Record the node's port for 2 s with JACK's own recorder (16-bit WAV).
    let wav = dir.join("capture.wav");
    let rec = Command::new("jack_rec")
        .args(["-f"])
        .arg(&wav)
        .args(["-d", "2", &format!("voicemesh-{id}:out")])
        .env("JACK_DEFAULT_SERVER", &jack.name)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run jack_rec ({e}): install jackd2's tools"));
    assert!(
        rec.status.success(),
        "jack_rec failed: {}",
        String::from_utf8_lossy(&rec.stderr)
    );

    // Watch the status for the rest of the hold: every node status (100 ms) carries the load
    // mean and max of its period, and the counts since start.
    let mut samples = Vec::new();
    while held_at.elapsed() < HOLD - Duration::from_millis(300) {
        let v = wait_api(&ns, &api, Duration::from_secs(2), |_| true)
            .unwrap_or_else(|last| panic!("/api/cluster unreachable: {last:?}"));
        let n = node_json(&v, id).expect("node listed").clone();
        assert_eq!(n["online"], true, "{n}");
        assert_eq!(
            n["sounding_voices"], VOICES,
            "a voice stopped while held: {n}"
        );
        let block_max = n["load_max_permille"].as_u64().unwrap_or(u64::MAX);
        assert!(
            block_max < 1000,
            "a callback overran its block budget while holding {VOICES} voices (an xrun caused by \
             the engine): {n}"
        );
        samples.push(n);
        std::thread::sleep(Duration::from_millis(50));
    }
    osc.expect_line("off", Duration::from_secs(10));
    let _ = osc.wait_timeout(Duration::from_secs(5));

    let get = |n: &serde_json::Value, k: &str| n[k].as_u64().unwrap_or_else(|| panic!("{k}: {n}"));
    let means: Vec<u64> = samples
        .iter()
        .map(|n| get(n, "load_mean_permille"))
        .collect();
    let maxes: Vec<u64> = samples
        .iter()
        .map(|n| get(n, "load_max_permille"))
        .collect();
    let mean = means.iter().sum::<u64>() as f64 / means.len() as f64;
    let max = *maxes.iter().max().unwrap();
    let last = samples.last().unwrap();
    println!(
        "jack_node: {VOICES} voices held {:.1} s at 48 kHz / 256 frames: callback load mean {:.1}‰ \
         (status samples {}), max single block {max}‰, xruns {}, late events {}",
        held_at.elapsed().as_secs_f64(),
        mean,
        samples.len(),
        get(last, "xruns"),
        get(last, "late_events"),
    );
    assert!(samples.len() >= 80, "only {} status samples", samples.len());
    // The load is measured: 64 voices take some time, and no more than the budget.
    assert!(max > 0, "load never measured: {samples:?}");
    assert!(
        maxes.iter().zip(&means).all(|(mx, mn)| mx >= mn),
        "max < mean: {samples:?}"
    );
    assert!(max < 1000, "a block took longer than its budget ({max}‰)");
    assert_eq!(get(last, "late_events"), 0, "notes played late: {last}");

    let (audio, sr) = read_wav_mono(&wav);
    assert_eq!(sr, 48_000);
    assert!(
        audio.len() >= 48_000,
        "jack_rec wrote {} frames",
        audio.len()
    );
    let peak = audio.iter().fold(0.0f32, |m, s| m.max(s.abs()));
    let rms =
        (audio.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>() / audio.len() as f64).sqrt();
    println!(
        "jack_node: captured {} frames, peak {peak:.3}, rms {rms:.4}",
        audio.len()
    );
    assert!(
        peak > 0.05 && rms > 0.01,
        "the node's output is silent: peak {peak}, rms {rms}"
    );

    drop(node);
    drop(coordinator);
    let _ = std::fs::remove_dir_all(&dir);
}
