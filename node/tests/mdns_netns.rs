//! mDNS over real sockets, each test in a network namespace of its own (`vm-mdns-<pid>-<n>`,
//! deleted on drop, also when the test panics): loopback scope keeps every packet on lo even
//! with a real-looking interface next to it, and python `zeroconf` finds our node and is found
//! by our browser.
//!
//! Python: `VOICEMESH_PYTHON` if set (scripts/test-all.sh points it at a venv with zeroconf),
//! else a venv created once under the target directory with `pip install zeroconf`.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use voicemesh_node::NetScope;
use voicemesh_node::mdns::{BrowseEvent, NodeTxt, ResolvedService, advertise, browse, mdns_socket};
use voicemesh_protocol::discovery::{NODE_SERVICE, TXT_KEYS};

static COUNTER: AtomicU32 = AtomicU32::new(0);
const STEP: Duration = Duration::from_secs(10);

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// A namespace with lo up; with `veth`, also vmx0 (10.254.0.1/24, default route) and its
    /// peer vmx1, both up, IPv6 off.
    fn new(veth: bool) -> Netns {
        let name = format!(
            "vm-mdns-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        let n = ns.name.as_str();
        run(&["ip", "-n", n, "link", "set", "lo", "up"]);
        if veth {
            run(&[
                "ip",
                "netns",
                "exec",
                n,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]);
            run(&[
                "ip", "-n", n, "link", "add", "vmx0", "type", "veth", "peer", "name", "vmx1",
            ]);
            run(&[
                "ip",
                "netns",
                "exec",
                n,
                "sysctl",
                "-qw",
                "net.ipv6.conf.vmx0.disable_ipv6=1",
                "net.ipv6.conf.vmx1.disable_ipv6=1",
            ]);
            run(&["ip", "-n", n, "addr", "add", "10.254.0.1/24", "dev", "vmx0"]);
            run(&["ip", "-n", n, "link", "set", "vmx0", "up"]);
            run(&["ip", "-n", n, "link", "set", "vmx1", "up"]);
            run(&["ip", "-n", n, "route", "add", "default", "dev", "vmx0"]);
        }
        ns
    }

    /// Runs `f` on a thread that entered the namespace, in a tokio runtime built there.
    fn run<F, Fut, R>(&self, f: F) -> R
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = R>,
        R: Send + 'static,
    {
        run_in(&self.name, f)
    }

    /// Packets sent by `dev` so far.
    fn tx_packets(&self, dev: &str) -> u64 {
        tx_packets_in(&self.name, dev)
    }

    /// `program` run inside the namespace.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

/// Packets sent by `dev` of namespace `name` so far (sysfs as `ip netns exec` mounts it).
fn tx_packets_in(name: &str, dev: &str) -> u64 {
    let path = format!("/sys/class/net/{dev}/statistics/tx_packets");
    run(&["ip", "netns", "exec", name, "cat", &path])
        .trim()
        .parse()
        .unwrap()
}

/// Runs `f` on a thread that entered namespace `name`, in a tokio runtime built there.
fn run_in<F, Fut, R>(name: &str, f: F) -> R
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R>,
    R: Send + 'static,
{
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: setns only changes this thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn node_txt(id: &str, port: u16) -> NodeTxt {
    NodeTxt {
        id: id.into(),
        voices: 12,
        cv: 0,
        engines: vec!["saw".into(), "fm".into()],
        port,
    }
}

async fn next_resolved(rx: &mut Receiver<BrowseEvent>, instance: &str) -> ResolvedService {
    loop {
        match timeout(STEP, rx.recv())
            .await
            .expect("no mDNS event in time")
        {
            Some(BrowseEvent::Resolved(s)) if s.instance == instance => return s,
            Some(_) => {}
            None => panic!("browser ended"),
        }
    }
}

async fn next_removed(rx: &mut Receiver<BrowseEvent>, instance: &str) {
    loop {
        match timeout(STEP, rx.recv())
            .await
            .expect("no mDNS event in time")
        {
            Some(BrowseEvent::Removed { instance: i }) if i == instance => return,
            Some(_) => {}
            None => panic!("browser ended"),
        }
    }
}

#[test]
fn loopback_scope_sends_nothing_on_the_real_interface() {
    let ns = Netns::new(true);
    let before = ns.tx_packets("vmx0");
    let (resolve_ms, removed_ms) = ns.run(|| async {
        let cancel = CancellationToken::new();
        let mut rx = browse(NetScope::Loopback, NODE_SERVICE, cancel.clone()).unwrap();
        let t0 = Instant::now();
        let txt = node_txt("lo-node.1", 4433);
        let ad = advertise(NetScope::Loopback, vec![txt.instance()], cancel.clone()).unwrap();
        let s = next_resolved(&mut rx, "lo-node.1").await;
        let resolve_ms = t0.elapsed().as_secs_f64() * 1e3;
        assert_eq!(s.addrs, [Ipv4Addr::LOCALHOST]);
        assert_eq!(s.port, 4433);
        assert_eq!(s.fullname, "lo-node\\.1._voicemesh._udp.local.");
        let props = txt.properties();
        assert_eq!(s.txt.len(), TXT_KEYS.len());
        for (k, v) in &props {
            assert_eq!(s.txt(k), Some(v.as_str()), "TXT {k}");
        }
        // A second browser started later finds it by querying (the announcements are over
        // by the time it would have heard them only if it started > 1 s later; either way it
        // must resolve).
        let mut rx2 = browse(NetScope::Loopback, NODE_SERVICE, cancel.clone()).unwrap();
        next_resolved(&mut rx2, "lo-node.1").await;
        // Goodbye.
        let t1 = Instant::now();
        ad.stop().await;
        next_removed(&mut rx, "lo-node.1").await;
        let removed_ms = t1.elapsed().as_secs_f64() * 1e3;
        cancel.cancel();
        (resolve_ms, removed_ms)
    });
    let after = ns.tx_packets("vmx0");
    eprintln!(
        "loopback mDNS: resolved {resolve_ms:.1} ms after advertise, removed {removed_ms:.0} ms after goodbye; vmx0 tx_packets {before} -> {after}"
    );
    assert_eq!(before, after, "packets left through vmx0 in loopback scope");

    // The counter does see what goes out of vmx0: a LAN-scope mDNS socket there sends an
    // IGMP membership report (what mdns-sd did even when told loopback only).
    let name = ns.name.clone();
    let lan = ns.run(move || async move {
        let _s = mdns_socket(NetScope::Lan(Ipv4Addr::new(10, 254, 0, 1))).unwrap();
        // Polls the counter until the report shows (there is no event to await).
        let deadline = Instant::now() + STEP;
        let mut n = tx_packets_in(&name, "vmx0");
        while n == after && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            n = tx_packets_in(&name, "vmx0");
        }
        n
    });
    assert!(
        lan > after,
        "a LAN-scope join did not show on vmx0 ({after} -> {lan})"
    );
}

/// The python interpreter with zeroconf: `VOICEMESH_PYTHON`, or a venv made once here.
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("VOICEMESH_PYTHON") {
        let ok = Command::new(&p)
            .args(["-c", "import zeroconf"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "VOICEMESH_PYTHON={p} cannot import zeroconf");
        return PathBuf::from(p);
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mdns-zeroconf-venv");
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    // Tests in other processes may get here at once: one creates the venv, under a lock.
    let lock = std::fs::File::create(dir.with_extension("lock")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own; released when `lock` is closed.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let py = dir.join("bin/python");
    let ready = Command::new(&py)
        .args(["-c", "import zeroconf"])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        let out = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .output()
            .expect("VOICEMESH_PYTHON is unset and python3 cannot be run");
        assert!(
            out.status.success(),
            "VOICEMESH_PYTHON is unset and `python3 -m venv` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(&py)
            .args(["-m", "pip", "install", "-q", "zeroconf"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "VOICEMESH_PYTHON is unset and `pip install zeroconf` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    py
}

const PY_BROWSE: &str = r#"
import json, sys, threading
from zeroconf import Zeroconf, ServiceBrowser, IPVersion, ServiceStateChange
want = sys.argv[1] + "._voicemesh._udp.local."
zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
seen = threading.Event()
def on_change(zeroconf, service_type, name, state_change):
    if name == want and state_change is not ServiceStateChange.Removed:
        seen.set()
browser = ServiceBrowser(zc, "_voicemesh._udp.local.", handlers=[on_change])
if not seen.wait(15):
    print("not found", flush=True); zc.close(); sys.exit(1)
info = zc.get_service_info("_voicemesh._udp.local.", want, timeout=5000)
if info is None:
    print("not resolved", flush=True); zc.close(); sys.exit(1)
print(json.dumps({"port": info.port, "server": info.server,
    "addresses": info.parsed_addresses(),
    "txt": {k.decode(): (v.decode() if v is not None else None) for k, v in info.properties.items()}}), flush=True)
zc.close()
"#;

const PY_REGISTER: &str = r#"
import socket, sys
from zeroconf import Zeroconf, ServiceInfo, IPVersion
name, port = sys.argv[1], int(sys.argv[2])
zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
info = ServiceInfo("_voicemesh._udp.local.", name + "._voicemesh._udp.local.",
    addresses=[socket.inet_aton("127.0.0.1")], port=port,
    properties={"id": name, "role": "node", "proto": "1", "flag": None},
    server=name + "-host.local.")
zc.register_service(info)
print("registered", flush=True)
sys.stdin.read()
zc.unregister_service(info)
zc.close()
print("unregistered", flush=True)
"#;

/// Kills a child on drop (the test may panic while it runs).
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn python_zeroconf_finds_our_node_with_every_txt_key() {
    let py = python();
    let ns = Netns::new(false);
    let cancel = CancellationToken::new();
    let txt = node_txt("py-sees-us", 5511);
    let ad_cancel = cancel.clone();
    let instance = txt.instance();
    // The advertisement runs on the namespace's runtime while python browses.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stop = cancel.clone();
    let ns_name = ns.name.clone();
    let runner = std::thread::spawn(move || {
        run_in(&ns_name, move || async move {
            let ad = advertise(NetScope::Loopback, vec![instance], ad_cancel).unwrap();
            ready_tx.send(()).unwrap();
            stop.cancelled().await;
            ad.stop().await;
        })
    });
    ready_rx.recv().unwrap();
    let out = ns
        .command(py.to_str().unwrap())
        .args(["-c", PY_BROWSE, "py-sees-us"])
        .output()
        .unwrap();
    cancel.cancel();
    runner.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "zeroconf did not find us: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("zeroconf saw: {stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["port"], 5511);
    assert_eq!(v["server"], "vm-py-sees-us.local.");
    assert_eq!(v["addresses"], serde_json::json!(["127.0.0.1"]));
    for (k, val) in txt.properties() {
        assert_eq!(v["txt"][k], serde_json::Value::String(val), "TXT {k}");
    }
}

#[test]
fn our_browser_resolves_a_python_zeroconf_service() {
    let py = python();
    let ns = Netns::new(false);
    let t0 = Instant::now();
    let mut child = Reap(
        ns.command(py.to_str().unwrap())
            .args(["-c", PY_REGISTER, "py-node", "6622"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let stdin = child.0.stdin.take().unwrap();
    let (first, ms, registered_ms) = ns.run(move || async move {
        let cancel = CancellationToken::new();
        let mut rx = browse(NetScope::Loopback, NODE_SERVICE, cancel.clone()).unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let l = lines.next();
            (l, lines)
        })
        .await
        .unwrap();
        assert_eq!(line.0.unwrap().unwrap(), "registered");
        let registered_ms = t0.elapsed().as_secs_f64() * 1e3;
        let s = next_resolved(&mut rx, "py-node").await;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        assert_eq!(s.port, 6622);
        assert_eq!(s.host, "py-node-host.local.");
        assert_eq!(s.addrs, [Ipv4Addr::LOCALHOST]);
        assert_eq!(s.txt("id"), Some("py-node"));
        assert_eq!(s.txt("role"), Some("node"));
        assert_eq!(s.txt("proto"), Some("1"));
        assert_eq!(s.txt("flag"), Some(""));
        // python unregisters (goodbye) when its stdin closes.
        drop(stdin);
        next_removed(&mut rx, "py-node").await;
        cancel.cancel();
        (s, ms, registered_ms)
    });
    eprintln!(
        "resolved zeroconf's {} {ms:.0} ms after starting python (it reported `registered` after {registered_ms:.0} ms)",
        first.fullname
    );
}
