//! The coordinator's mDNS advertisement and its OSCQuery server, seen by real third-party
//! peers: python `zeroconf` finds every service type with the right port, and
//! `python-oscquery`'s browser finds the OSCQuery service over mDNS and its client reads the
//! tree and HOST_INFO. In a private network namespace (loopback only).

use std::time::Duration;
use voicemesh_tests::{Child, Netns, TempDir, python, voicemesh_bin};

struct Coordinator {
    ns: Netns,
    _dir: TempDir,
    proc: Child,
    http: u16,
    osc: u16,
    oscquery: u16,
    rtpmidi: u16,
}

fn port_of(line: &str) -> u16 {
    let rest = line.rsplit(':').next().unwrap();
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no port in {line:?}"))
}

fn start() -> Coordinator {
    let ns = Netns::new();
    let dir = TempDir::new("oscquery");
    let mut cmd = ns.command(voicemesh_bin());
    cmd.args(["coordinator", "--id", "studio", "--state-dir"])
        .arg(dir.0.join("state"))
        .args(["--oscquery-port", "9123"]);
    let proc = Child::spawn("coordinator", cmd);
    let dash = proc.expect_line("dashboard: http://", Duration::from_secs(30));
    let http = port_of(dash.split("/?token").next().unwrap());
    let osc = port_of(&proc.expect_line("osc: udp://", Duration::from_secs(5)));
    let oscquery = port_of(
        proc.expect_line("oscquery: http://", Duration::from_secs(5))
            .trim_end_matches('/'),
    );
    assert_eq!(oscquery, 9123);
    let rtpmidi = port_of(
        proc.expect_line("rtpmidi: udp://", Duration::from_secs(5))
            .split(' ')
            .nth(1)
            .unwrap(),
    );
    Coordinator {
        ns,
        _dir: dir,
        proc,
        http,
        osc,
        oscquery,
        rtpmidi,
    }
}

fn run_python(c: &Coordinator, script: &str) -> serde_json::Value {
    let mut cmd = c.ns.command(python());
    cmd.args(["-c", script]);
    let mut p = Child::spawn("python", cmd);
    let st = p
        .wait_timeout(Duration::from_secs(60))
        .expect("python finishes");
    let out = p.output();
    assert!(st.success(), "{out}\ncoordinator:\n{}", c.proc.output());
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("RESULT "))
        .unwrap_or_else(|| panic!("no result line in {out}"));
    serde_json::from_str(line.split_once("RESULT ").unwrap().1).unwrap()
}

#[test]
fn zeroconf_finds_every_coordinator_service_with_its_port() {
    let c = start();
    let script = r#"
import json, time
from zeroconf import Zeroconf, ServiceBrowser, ServiceListener
TYPES = ["_voicemesh-coord._udp.local.", "_osc._udp.local.", "_oscjson._tcp.local.", "_http._tcp.local.", "_apple-midi._udp.local."]
zc = Zeroconf(interfaces=["127.0.0.1"])
found = {}
class L(ServiceListener):
    def add_service(self, z, t, name):
        info = z.get_service_info(t, name, timeout=3000)
        if info:
            found[t] = {"name": name, "port": info.port, "addresses": info.parsed_addresses(),
                        "txt": {k.decode(): (v or b"").decode() for k, v in info.properties.items()}}
    def update_service(self, z, t, name): self.add_service(z, t, name)
    def remove_service(self, z, t, name): pass
ServiceBrowser(zc, TYPES, L())
deadline = time.time() + 15
while time.time() < deadline and len(found) < 5:
    time.sleep(0.05)
time.sleep(0.5)
zc.close()
print("RESULT " + json.dumps(found))
"#;
    let found = run_python(&c, script);
    let port = |t: &str| {
        found[t]["port"]
            .as_u64()
            .unwrap_or_else(|| panic!("{t} not found: {found}"))
    };
    assert_eq!(port("_osc._udp.local."), u64::from(c.osc));
    assert_eq!(port("_oscjson._tcp.local."), u64::from(c.oscquery));
    assert_eq!(port("_http._tcp.local."), u64::from(c.http));
    assert_eq!(port("_voicemesh-coord._udp.local."), u64::from(c.osc));
    let coord = &found["_voicemesh-coord._udp.local."];
    assert_eq!(coord["txt"]["id"], "studio");
    assert_eq!(coord["txt"]["http"], c.http.to_string());
    assert_eq!(coord["txt"]["oscquery"], c.oscquery.to_string());
    assert_eq!(coord["addresses"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(
        found["_osc._udp.local."]["name"],
        "VoiceMesh studio._osc._udp.local."
    );
    // `voicemesh coordinator` runs RTP-MIDI: its control port is published as _apple-midi._udp.
    assert_eq!(port("_apple-midi._udp.local."), u64::from(c.rtpmidi));
    assert_eq!(coord["txt"]["apple_midi"], c.rtpmidi.to_string());
}

#[test]
fn python_oscquery_browses_and_reads_the_tree_and_host_info() {
    let c = start();
    // python-oscquery's browser listens on every interface of the namespace (only lo here).
    let script = r#"
import json, time
from pythonoscquery.osc_query_browser import OSCQueryBrowser
from pythonoscquery.osc_query_client import OSCQueryClient
b = OSCQueryBrowser()
deadline = time.time() + 15
svc = None
while time.time() < deadline and svc is None:
    time.sleep(0.1)
    svc = b.find_service_by_name("VoiceMesh")
assert svc is not None, "no OSCQuery service found"
osc_found = [s.name for s in b.get_discovered_osc() if s is not None]
client = OSCQueryClient(svc)
hi = client.get_host_info()
root = client.query_node("/")
note = client.query_node("/voicemesh/note")
cutoff = client.query_node("/voicemesh/param/cutoff")
missing = client.query_node("/voicemesh/nonesuch")
def paths(n, out):
    if n.full_path: out.append(n.full_path)
    for c in (n.contents or []): paths(c, out)
    return out
b.zc.close()
print("RESULT " + json.dumps({
    "service_port": svc.port, "osc_services": osc_found,
    "host": {"name": hi.name, "port": hi.osc_port, "transport": hi.osc_transport, "ip": hi.osc_ip,
             "extensions": hi.extensions},
    "paths": paths(root, []),
    "note": {"access": int(note.access), "value": note.value, "description": note.description},
    "cutoff": cutoff.value,
    "missing": missing is None,
}))
"#;
    let r = run_python(&c, script);
    assert_eq!(r["service_port"], u64::from(c.oscquery));
    assert!(
        r["osc_services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "VoiceMesh studio._osc._udp.local."),
        "{r}"
    );
    assert_eq!(r["host"]["name"], "VoiceMesh studio");
    assert_eq!(r["host"]["port"], u64::from(c.osc));
    assert_eq!(r["host"]["transport"], "UDP");
    assert_eq!(r["host"]["ip"], "127.0.0.1");
    assert_eq!(r["host"]["extensions"]["VALUE"], true);
    let paths: Vec<&str> = r["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for p in [
        "/",
        "/voicemesh",
        "/voicemesh/note",
        "/voicemesh/panic",
        "/voicemesh/cc",
        "/voicemesh/bend",
        "/voicemesh/pressure",
        "/voicemesh/cv",
        "/voicemesh/subscribe",
        "/voicemesh/param",
        "/voicemesh/param/cutoff",
        "/voicemesh/voice/cutoff",
    ] {
        assert!(paths.contains(&p), "{p} missing from the tree: {paths:?}");
    }
    assert_eq!(r["note"]["access"], 2);
    assert_eq!(r["note"]["value"], serde_json::json!([60, 0, 0]));
    assert_eq!(r["cutoff"], serde_json::json!([20000.0]));
    assert_eq!(r["missing"], true);
}

/// The raw JSON: TYPE, RANGE and attribute queries as the OSCQuery proposal describes them.
#[test]
fn the_tree_carries_types_ranges_and_answers_attribute_queries() {
    let c = start();
    let base = format!("http://127.0.0.1:{}", c.oscquery);
    let (note, bend_range, cutoff_value, status_unknown, status_attr) = c.ns.in_ns(|| {
        let get = |p: &str| voicemesh_tests::http_get_json_local(&format!("{base}{p}"));
        let code = |p: &str| match ureq::get(&format!("{base}{p}")).call() {
            Ok(r) => r.status().as_u16(),
            Err(ureq::Error::StatusCode(s)) => s,
            Err(e) => panic!("{e}"),
        };
        (
            get("/voicemesh/note"),
            get("/voicemesh/bend?RANGE"),
            get("/voicemesh/param/cutoff?VALUE"),
            code("/voicemesh/nope"),
            code("/voicemesh/note?BOGUS"),
        )
    });
    assert_eq!(note["FULL_PATH"], "/voicemesh/note");
    assert_eq!(note["TYPE"], "iii");
    assert_eq!(note["ACCESS"], 2);
    assert_eq!(
        note["RANGE"],
        serde_json::json!([{"MIN":0,"MAX":127},{"MIN":0,"MAX":127},{"MIN":0,"MAX":15}])
    );
    assert_eq!(
        bend_range,
        serde_json::json!({"RANGE": [{"MIN":-8192,"MAX":8191},{"MIN":0,"MAX":15}]})
    );
    assert_eq!(cutoff_value, serde_json::json!({"VALUE": [20000.0]}));
    assert_eq!(status_unknown, 404);
    assert_eq!(status_attr, 400);
}
