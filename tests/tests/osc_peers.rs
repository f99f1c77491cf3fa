//! OSC from real third-party senders into a cluster of real processes (`voicemesh coordinator`
//! and a `voicemesh node` recording to a WAV file), in a private network namespace:
//!
//! - python-osc bundles with future timetags start their notes at the timetag: the onset found
//!   in the node's audio, placed in cluster time by the recording's first-frame time, is within
//!   1 ms of the timetag (NTP → cluster time: UTC + 37 s, docs/osc.md);
//! - liblo's `oscsend` starts and stops a note;
//! - OSC over TCP, SLIP-framed (OSC 1.1) and length-prefixed (OSC 1.0), from a Python socket;
//! - subscribers over TCP and UDP get `/voicemesh/state/*` replies, and `/voicemesh/tempo` and
//!   `/voicemesh/transport` reach the tempo API.
//!
//! Judges timing, so it runs in the serial `timed` group of scripts/test-all.sh.

use std::time::Duration;
use voicemesh_tests::{
    Child, Netns, TempDir, onsets, python, read_wav_mono, try_wait_api, voicemesh_bin,
};

/// TAI − UTC: cluster time is the grandmaster's CLOCK_REALTIME plus this.
const TAI_OFFSET_NS: i128 = 37_000_000_000;

struct Cluster {
    ns: Netns,
    dir: TempDir,
    coordinator: Child,
    api: String,
}

fn start() -> Cluster {
    let ns = Netns::new();
    let dir = TempDir::new("osc-peers");
    let mut cmd = ns.command(voicemesh_bin());
    cmd.args(["coordinator", "--state-dir"])
        .arg(dir.0.join("state"));
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
            .arg(format!("wav:{}", self.dir.0.display()));
        let child = Child::spawn(name, cmd);
        child.expect_line("control session on quic://", Duration::from_secs(30));
        child
    }

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

    fn python(&self, script: &str) -> String {
        let mut cmd = self.ns.command(python());
        cmd.args(["-c", script]);
        let mut p = Child::spawn("python", cmd);
        let st = p
            .wait_timeout(Duration::from_secs(30))
            .expect("python finishes");
        assert!(st.success(), "{}", p.output());
        p.output()
    }
}

fn online(v: &serde_json::Value) -> bool {
    v["nodes"]
        .as_array()
        .is_some_and(|ns| ns.iter().any(|n| n["online"] == true))
}

fn active(v: &serde_json::Value) -> u64 {
    v["voices"]["active"].as_u64().unwrap_or(0)
}

#[test]
fn python_osc_timetags_start_notes_at_their_time_within_1ms() {
    let c = start();
    let mut node = c.node("tt");
    c.wait_api(Duration::from_secs(15), online);

    // Three bundles stamped 400, 700 and 1000 ms ahead, each with a note-on; the note-offs in
    // bundles 150 ms after each. The script prints the timetags it used (system time, s).
    let script = r#"
import time
from pythonosc.udp_client import SimpleUDPClient
from pythonosc.osc_bundle_builder import OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder
c = SimpleUDPClient("127.0.0.1", 9000)
def bundle(t, note, vel):
    b = OscBundleBuilder(t)
    m = OscMessageBuilder(address="/voicemesh/note")
    for a in (note, vel, 0): m.add_arg(a)
    b.add_content(m.build())
    c.send(b.build())
t0 = time.time()
for i, note in enumerate((60, 64, 67)):
    t = t0 + 0.4 + 0.3 * i
    bundle(t, note, 100)
    bundle(t + 0.15, note, 0)
    print("TIMETAG %.9f" % t)
"#;
    let out = c.python(script);
    let tags: Vec<i128> = out
        .lines()
        .filter_map(|l| l.strip_prefix("TIMETAG "))
        .map(|s| {
            let (sec, frac) = s.trim().split_once('.').unwrap();
            let ns = sec.parse::<i128>().unwrap() * 1_000_000_000
                + format!("{frac:0<9}")[..9].parse::<i128>().unwrap();
            ns + TAI_OFFSET_NS
        })
        .collect();
    assert_eq!(tags.len(), 3, "{out}");
    // Held for later, then played: six commands scheduled, none late.
    let v = c.wait_api(Duration::from_secs(5), |v| {
        v["osc"]["scheduled"] == 6 && v["osc"]["pending"] == 0 && active(v) == 0
    });
    assert_eq!(v["osc"]["late"], 0, "{v}");
    assert_eq!(v["osc"]["notes"], 6, "{v}");

    node.signal(libc::SIGTERM);
    assert!(
        node.wait_timeout(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "{}",
        node.output()
    );
    let (samples, sr) = read_wav_mono(c.dir.0.join("tt.wav"));
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.dir.0.join("tt.json")).unwrap()).unwrap();
    let first = i128::from(sidecar["first_frame_cluster_ns"].as_u64().unwrap());
    let found = onsets(&samples, sr, 1e-3, 0.05);
    assert_eq!(found.len(), 3, "three notes, onsets at frames {found:?}");
    for (frame, tag) in found.iter().zip(&tags) {
        let heard = first + (*frame as i128) * 1_000_000_000 / i128::from(sr);
        let off_us = (heard - tag) as f64 / 1000.0;
        println!("onset {off_us:+.1} µs from its timetag");
        assert!(
            off_us.abs() < 1000.0,
            "onset {off_us} µs from the timetag (frame {frame})"
        );
    }
}

#[test]
fn liblo_oscsend_tcp_framings_and_feedback() {
    let c = start();
    let _node = c.node("peers");
    c.wait_api(Duration::from_secs(15), online);

    // liblo's oscsend (a separate C implementation): note on, then off.
    let oscsend = |args: &[&str]| {
        let mut cmd = c.ns.command("oscsend");
        cmd.args(["127.0.0.1", "9000"]).args(args);
        let st = cmd.status().expect("oscsend runs (liblo-tools)");
        assert!(st.success());
    };
    oscsend(&["/voicemesh/note", "iii", "62", "90", "0"]);
    c.wait_api(Duration::from_secs(3), |v| active(v) == 1);
    oscsend(&["/voicemesh/note", "iii", "62", "0", "0"]);
    c.wait_api(Duration::from_secs(3), |v| active(v) == 0);
    // A float-typed message from liblo too, and one with a wrong type (counted).
    oscsend(&["/voicemesh/param/cutoff", "f", "1234.5"]);
    oscsend(&["/voicemesh/note", "s", "x"]);
    c.wait_api(Duration::from_secs(3), |v| {
        v["osc"]["dropped"]["bad_args"] == 1
    });

    // TCP: SLIP (OSC 1.1) and length-prefixed (OSC 1.0) from plain Python sockets, and a
    // subscription over the SLIP connection that answers with /voicemesh/state/* messages.
    let script = r#"
import socket, struct, time
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_message import OscMessage
def msg(addr, *args):
    m = OscMessageBuilder(address=addr)
    for a in args: m.add_arg(a)
    return m.build().dgram
END, ESC = 0xC0, 0xDB
def slip(p):
    out = bytearray([END])
    for b in p:
        if b == END: out += bytes([ESC, 0xDC])
        elif b == ESC: out += bytes([ESC, 0xDD])
        else: out.append(b)
    out.append(END)
    return bytes(out)
s = socket.create_connection(("127.0.0.1", 9000))
s.sendall(slip(msg("/voicemesh/subscribe")))
s.sendall(slip(msg("/voicemesh/note", 64, 100, 0)))
# Read SLIP frames until the state shows the voice.
buf, frames, seen = b"", [], {}
deadline = time.time() + 5
s.settimeout(0.5)
while time.time() < deadline and seen.get("/voicemesh/state/voices", [0])[0] != 1:
    try:
        data = s.recv(4096)
    except socket.timeout:
        continue
    buf += data
    while True:
        i = buf.find(bytes([END]), 1)
        if i < 0: break
        frame, buf = buf[:i+1], buf[i+1:]
        raw = frame.strip(bytes([END])).replace(bytes([ESC, 0xDC]), bytes([END])).replace(bytes([ESC, 0xDD]), bytes([ESC]))
        if raw:
            m = OscMessage(raw)
            seen[m.address] = list(m.params)
print("STATE", sorted(seen.items()))
s.sendall(slip(msg("/voicemesh/note", 64, 0, 0)))
s.close()
t = socket.create_connection(("127.0.0.1", 9000))
p = msg("/voicemesh/note", 65, 100, 0)
t.sendall(struct.pack(">i", len(p)) + p)
time.sleep(0.3)
p = msg("/voicemesh/note", 65, 0, 0)
t.sendall(struct.pack(">i", len(p)) + p)
time.sleep(0.1)
t.close()
# UDP: subscribe from one socket (replies to its own port), change tempo and transport from
# another, and watch the state follow.
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 0))
u.settimeout(0.2)
u.sendto(msg("/voicemesh/subscribe"), ("127.0.0.1", 9000))
w = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp = {}
def pump(until):
    deadline = time.time() + 5
    while time.time() < deadline and not until():
        try:
            m = OscMessage(u.recv(65536))
            udp[m.address] = list(m.params)
        except socket.timeout:
            pass
pump(lambda: "/voicemesh/state/tempo" in udp and "/voicemesh/state/transport" in udp)
print("UDP_BEFORE", udp.get("/voicemesh/state/tempo"), udp.get("/voicemesh/state/transport"))
w.sendto(msg("/voicemesh/tempo", 98.5), ("127.0.0.1", 9000))
w.sendto(msg("/voicemesh/transport", 1), ("127.0.0.1", 9000))
# The tempo comes back as the timeline has it: nanoseconds per beat, sent as a float32.
tempo = lambda: udp.get("/voicemesh/state/tempo", [0.0])[0]
pump(lambda: abs(tempo() - 98.5) < 1e-3 and udp.get("/voicemesh/state/transport") == [1])
print("UDP_AFTER %.3f" % tempo(), udp.get("/voicemesh/state/transport"))
print("DONE")
"#;
    let out = c.python(script);
    let state = out.lines().find(|l| l.starts_with("STATE")).unwrap();
    assert!(
        state.contains("('/voicemesh/state/voices', [1, 8])"),
        "{state}"
    );
    assert!(state.contains("('/voicemesh/state/nodes', [1])"), "{state}");
    assert!(
        state.contains("('/voicemesh/state/param/cutoff', [1234.5])"),
        "{state}"
    );
    assert!(out.contains("UDP_BEFORE [120.0] [0]"), "{out}");
    assert!(out.contains("UDP_AFTER 98.500 [1]"), "{out}");
    let v = c.wait_api(Duration::from_secs(3), |v| {
        v["osc"]["notes"] == 6 && active(v) == 0
    });
    assert_eq!(v["osc"]["tcp_connections"], 2, "{v}");
    let bpm = v["tempo"]["tempo_bpm"].as_f64().unwrap();
    assert!((bpm - 98.5).abs() < 1e-3, "{v}");
    assert_eq!(v["tempo"]["playing"], true, "{v}");
    assert_eq!(
        v["osc"]["subscribers"], 1,
        "the UDP subscription lasts: {v}"
    );
}
