//! A cluster of separate processes — `voicemesh coordinator` and two `voicemesh node`s — in a
//! namespace of its own, played by a real OSC client (python-osc) and watched by a real mDNS
//! browser (python zeroconf).

use std::time::{Duration, Instant};
use voicemesh_tests::{
    Child, Netns, midi_to_hz, onsets, peak_frequency, python, read_wav_mono, try_wait_api,
    voicemesh_bin,
};

struct Cluster {
    ns: Netns,
    dir: std::path::PathBuf,
    coordinator: Child,
    api: String,
}

fn start_coordinator(tag: &str) -> Cluster {
    let ns = Netns::new();
    let dir = std::env::temp_dir().join(format!("vm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = ns.command(voicemesh_bin());
    cmd.args(["coordinator", "--state-dir"])
        .arg(dir.join("state"));
    let coordinator = Child::spawn("coordinator", cmd);
    let line = coordinator.expect_line("dashboard: http://", Duration::from_secs(30));
    let dashboard = line.split("dashboard: ").nth(1).unwrap().trim().to_string();
    let api = dashboard.replacen("/?token=", "/api/cluster?token=", 1);
    Cluster {
        ns,
        dir,
        coordinator,
        api,
    }
}

impl Cluster {
    fn node(&self, name: &str) -> Child {
        let mut cmd = self.ns.command(voicemesh_bin());
        cmd.args(["node", "--name", name, "--audio"])
            .arg(format!("wav:{}", self.dir.display()));
        let child = Child::spawn(name, cmd);
        child.expect_line("control session on quic://", Duration::from_secs(30));
        child
    }

    /// Polls /api/cluster from inside the namespace until `done` accepts it.
    fn wait_api(
        &self,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool + Send,
    ) -> serde_json::Value {
        try_wait_api(&self.ns, &self.api, timeout, done)
            .map(|(v, _)| v)
            .unwrap_or_else(|last| {
                panic!(
                    "/api/cluster never matched; last: {last:?}\n{}",
                    self.coordinator.output()
                )
            })
    }
}

fn node<'a>(v: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    v["nodes"].as_array()?.iter().find(|n| n["id"] == id)
}

fn online(v: &serde_json::Value, id: &str) -> bool {
    node(v, id).is_some_and(|n| n["online"] == true)
}

#[test]
fn python_osc_note_is_heard_and_a_killed_node_is_offline_within_300ms() {
    let c = start_coordinator("osc");
    let mut a = c.node("node-a");
    let mut b = c.node("node-b");
    c.wait_api(Duration::from_secs(15), |v| {
        online(v, "node-a") && online(v, "node-b")
    });

    // A4 from python-osc, a real OSC client, held for 400 ms.
    let script = r#"
import time
from pythonosc.udp_client import SimpleUDPClient
c = SimpleUDPClient("127.0.0.1", 9000)
c.send_message("/voicemesh/note", [69, 100, 0])
time.sleep(0.4)
c.send_message("/voicemesh/note", [69, 0, 0])
print("sent")
"#;
    let mut osc = Child::spawn("python-osc", {
        let mut cmd = c.ns.command(python());
        cmd.args(["-c", script]);
        cmd
    });
    // While it is held, one node reports it sounding.
    let held = c.wait_api(Duration::from_secs(5), |v| {
        v["nodes"]
            .as_array()
            .is_some_and(|ns| ns.iter().any(|n| n["active_voices"] == 1))
    });
    let player = if node(&held, "node-a").unwrap()["active_voices"] == 1 {
        "node-a"
    } else {
        "node-b"
    };
    assert!(
        osc.wait_timeout(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "{}",
        osc.output()
    );

    // Kill the other node outright; the coordinator notices within 300 ms.
    let (victim, survivor) = if player == "node-a" {
        (&mut b, &mut a)
    } else {
        (&mut a, &mut b)
    };
    let victim_id = if player == "node-a" {
        "node-b"
    } else {
        "node-a"
    };
    victim.signal(libc::SIGKILL);
    let killed = Instant::now();
    let v = c.wait_api(Duration::from_secs(3), |v| !online(v, victim_id));
    let took = killed.elapsed();
    println!(
        "{victim_id} offline in /api/cluster {} ms after kill -9",
        took.as_millis()
    );
    assert!(took < Duration::from_millis(300), "offline after {took:?}");
    assert!(online(&v, player), "the survivor stays online: {v}");
    assert!(v["osc"]["notes"].as_u64().unwrap() >= 2, "{v}");

    // Stop the player cleanly and listen to what it wrote.
    survivor.signal(libc::SIGTERM);
    let st = survivor
        .wait_timeout(Duration::from_secs(10))
        .expect("node stops on SIGTERM");
    assert!(st.success(), "{}", survivor.output());
    let (samples, sr) = read_wav_mono(c.dir.join(format!("{player}.wav")));
    let found = onsets(&samples, sr, 1e-3, 0.05);
    assert_eq!(
        found.len(),
        1,
        "one note in {player}.wav, found onsets {found:?}"
    );
    let seg = &samples[found[0] + sr as usize / 20..found[0] + sr as usize * 3 / 10];
    let f = peak_frequency(seg, sr, 400.0, 480.0);
    assert!(
        (f - midi_to_hz(69.0)).abs() < 0.5,
        "heard {f:.2} Hz, expected 440 Hz"
    );
    let _ = std::fs::remove_dir_all(&c.dir);
}

/// `--audio alsa:null`: ALSA's null PCM (libasound loaded at run time) is a real sink. The
/// node starts on it, plays a note (the coordinator sees it sounding, at a sane load) and
/// stops cleanly.
#[test]
fn a_node_on_alsa_null_starts_and_renders() {
    let c = start_coordinator("alsanull");
    let mut cmd = c.ns.command(voicemesh_bin());
    cmd.args(["node", "--name", "node-a", "--audio", "alsa:null"]);
    let mut a = Child::spawn("node-a", cmd);
    let line = a.expect_line("control session on quic://", Duration::from_secs(30));
    assert!(line.contains("audio: ALSA device null ("), "{line}");
    c.wait_api(Duration::from_secs(15), |v| online(v, "node-a"));
    let script = r#"
import time
from pythonosc.udp_client import SimpleUDPClient
c = SimpleUDPClient("127.0.0.1", 9000)
c.send_message("/voicemesh/note", [69, 100, 0])
time.sleep(0.5)
c.send_message("/voicemesh/note", [69, 0, 0])
"#;
    let mut osc = Child::spawn("python-osc", {
        let mut cmd = c.ns.command(python());
        cmd.args(["-c", script]);
        cmd
    });
    let v = c.wait_api(Duration::from_secs(5), |v| {
        node(v, "node-a").is_some_and(|n| {
            n["sounding_voices"].as_u64() == Some(1) && n["load_max_permille"].as_u64() > Some(0)
        })
    });
    let load = node(&v, "node-a").unwrap()["load_max_permille"]
        .as_u64()
        .unwrap();
    assert!(load < 1000, "load {load} per-mille on the null PCM: {v}");
    assert!(
        osc.wait_timeout(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "{}",
        osc.output()
    );
    a.signal(libc::SIGTERM);
    let st = a
        .wait_timeout(Duration::from_secs(10))
        .expect("node stops on SIGTERM");
    assert!(st.success(), "{}", a.output());
    let _ = std::fs::remove_dir_all(&c.dir);
}

#[test]
fn python_zeroconf_sees_each_node_with_its_txt_keys() {
    let c = start_coordinator("zc");
    let _a = c.node("node-a");
    let _b = c.node("node-b");
    let script = r#"
import json, sys, time
from zeroconf import Zeroconf, ServiceBrowser, ServiceListener
TYPE = "_voicemesh._udp.local."
zc = Zeroconf(interfaces=["127.0.0.1"])
found = {}
class L(ServiceListener):
    def add_service(self, z, t, name):
        info = z.get_service_info(t, name, timeout=3000)
        if info:
            found[name] = {
                "port": info.port,
                "addresses": info.parsed_addresses(),
                "txt": {k.decode(): (v or b"").decode() for k, v in info.properties.items()},
            }
    def update_service(self, z, t, name): self.add_service(z, t, name)
    def remove_service(self, z, t, name): pass
ServiceBrowser(zc, TYPE, L())
deadline = time.time() + 15
while time.time() < deadline and len(found) < 2:
    time.sleep(0.05)
zc.close()
print(json.dumps(found))
"#;
    let out =
        c.ns.command(python())
            .args(["-c", script])
            .output()
            .expect("run python zeroconf");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    for id in ["node-a", "node-b"] {
        let s = &found[format!("{id}._voicemesh._udp.local.")];
        assert!(s.is_object(), "zeroconf did not see {id}: {found}");
        let txt = &s["txt"];
        for key in voicemesh_protocol::discovery::TXT_KEYS {
            assert!(txt[key].is_string(), "{id}: TXT key {key} missing: {txt}");
        }
        assert_eq!(txt["id"], id);
        assert_eq!(txt["role"], "node");
        assert_eq!(txt["voices"], "8");
        assert_eq!(
            txt["proto"],
            voicemesh_protocol::PROTOCOL_VERSION.to_string()
        );
        assert_eq!(
            txt["port"],
            s["port"].to_string(),
            "TXT port is the SRV port"
        );
        assert_eq!(s["addresses"][0], "127.0.0.1");
    }
    let _ = std::fs::remove_dir_all(&c.dir);
}

#[test]
fn errors_name_what_is_wrong_and_exit_non_zero() {
    let ns = Netns::new();
    let dir = std::env::temp_dir().join(format!("vm-errs-{}", std::process::id()));
    // The HTTP port is taken by someone else.
    let mut holder = Child::spawn("port-holder", {
        let mut cmd = ns.command(python());
        cmd.args([
            "-c",
            "import socket,sys,time\ns=socket.socket();s.bind(('127.0.0.1',7400));s.listen()\nprint('bound',flush=True)\ntime.sleep(60)",
        ]);
        cmd
    });
    holder.expect_line("bound", Duration::from_secs(10));
    let out = ns
        .command(voicemesh_bin())
        .args(["coordinator", "--state-dir"])
        .arg(dir.join("state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("HTTP port 127.0.0.1:7400 is already in use"),
        "{err}"
    );
    holder.kill();

    // No JACK server.
    let out = ns
        .command(voicemesh_bin())
        .args(["node", "--audio", "jack"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no JACK server running"), "{err}");

    // ALSA without a sound card: the device named, and the way out.
    let cards = std::fs::read_to_string("/proc/asound/cards").unwrap_or_default();
    if !cards
        .lines()
        .any(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
    {
        let out = ns
            .command(voicemesh_bin())
            .args(["node", "--audio", "alsa"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("cannot open ALSA output device \"default\"")
                && err.contains("--audio null"),
            "{err}"
        );
    }

    // A bad flag value.
    let out = ns
        .command(voicemesh_bin())
        .args(["node", "--audio", "pulse"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unknown audio backend \"pulse\""), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
