//! Harness of the cross-crate scenario tests: real `voicemesh` processes in throw-away network
//! namespaces, real third-party peers, and analysis of the audio they render.
//!
//! Design: the test process itself stays in the root namespace. Everything that touches the
//! network — `voicemesh` daemons, Python peers, ptp4l, HTTP requests to the dashboard — runs
//! *inside* a [`Netns`] through `ip netns exec`, started with [`Netns::command`] and watched
//! with [`Child`]. HTTP requests are made by [`Netns::http_get`] / [`Netns::http_get_json`],
//! which run a few lines of Python (`urllib`) inside the namespace and hand back the body:
//! a test thread never has to `setns` itself, so tests can run in parallel threads of one
//! process. Multicast (mDNS, PTP, Link) therefore never reaches a real interface.
//!
//! Binaries come from the environment that `scripts/test-all.sh` prepares: [`voicemesh_bin`]
//! (`VOICEMESH_BIN`, the release build) and [`python`] (`VOICEMESH_PYTHON`, the venv with the
//! peers of `tests/requirements.txt`). A missing one is a loud failure, never a skip.
//!
//! The pure parts — [`read_wav_mono`], [`onsets`], [`peak_frequency`], [`midi_to_hz`] — have
//! unit tests here.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A JACK server (jackd2, dummy driver, 48 kHz, 256-frame periods) under a unique name
/// (`<prefix>-<pid>-<n>`), ready to take clients when [`Jackd::start`] returns.
///
/// Stopped with SIGTERM on drop, so jackd removes itself from JACK's shared server registry (a
/// SIGKILLed server stays registered, and after a few of those jackd refuses to start: "Too
/// many servers already active"); SIGKILL only if it has not exited within 5 s. It also gets
/// SIGTERM if the thread that started it dies without dropping it. Clients reach it by name:
/// `JACK_DEFAULT_SERVER` for processes, or an explicit server name.
#[derive(Debug)]
pub struct Jackd {
    /// The server's name.
    pub name: String,
    child: std::process::Child,
}

static JACKD_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Jackd {
    /// Starts the server and waits (with `jack_wait`, up to 10 s) until it answers.
    ///
    /// # Panics
    /// If jackd or jack_wait is missing (install Debian's jackd2), or the server does not
    /// come up.
    pub fn start(prefix: &str) -> Jackd {
        use std::os::unix::process::CommandExt;
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            JACKD_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut cmd = Command::new("jackd");
        cmd.args(["-n", &name, "-d", "dummy", "-r", "48000", "-p", "256"])
            .env("JACK_NO_AUDIO_RESERVATION", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; jackd gets SIGTERM if the starting thread dies
        // without running `Drop` (a crash), so no server outlives the test.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            })
        };
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start jackd ({e}): install Debian's jackd2 to run the JACK tests")
        });
        let j = Jackd { name, child };
        // jack_wait blocks until the server answers (its own readiness check), up to 10 s.
        let out = Command::new("jack_wait")
            .args(["-s", &j.name, "-w", "-t", "10"])
            .env("JACK_DEFAULT_SERVER", &j.name)
            .output()
            .unwrap_or_else(|e| panic!("cannot run jack_wait ({e}): install jackd2's tools"));
        assert!(
            out.status.success(),
            "jackd {} did not come up: {}{}",
            j.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        j
    }
}

impl Drop for Jackd {
    fn drop(&mut self) {
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A unique temporary directory path (`$TMPDIR/<prefix>-<pid>-<n>`), removed with everything
/// in it on drop. The directory itself is not created: code under test that must create its
/// state directory gets to do so.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

static TEMPDIR_COUNTER: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    /// A fresh path under the system's temporary directory; anything already there is removed.
    pub fn new(prefix: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            TEMPDIR_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `f` on a fresh thread inside a private, unnamed network namespace
/// (`unshare(CLONE_NEWNET)`) whose loopback is up with multicast on and a 224.0.0.0/4 route, and
/// returns its result. For in-process tests of multicast code (mDNS, PTP): nothing they send can
/// reach another test or a real interface, and the namespace vanishes with the thread. Build any
/// async runtime inside `f`, so its worker threads inherit the namespace.
///
/// # Panics
/// If `unshare` fails (the tests need root) or the loopback set-up fails; re-raises a panic of
/// `f`.
pub fn in_private_netns<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare with CLONE_NEWNET changes only this thread's namespace.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "unshare(CLONE_NEWNET) failed (the tests need root): {}",
                    std::io::Error::last_os_error()
                );
                for args in [
                    &["link", "set", "lo", "up"][..],
                    &["link", "set", "lo", "multicast", "on"],
                    &["route", "add", "224.0.0.0/4", "dev", "lo"],
                ] {
                    run("ip", args);
                }
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Path of the `voicemesh` binary under test, from `VOICEMESH_BIN`.
///
/// # Panics
/// If the variable is unset or names no file: run the tests through `scripts/test-all.sh`,
/// which builds the release binary and sets it.
pub fn voicemesh_bin() -> PathBuf {
    env_path(
        "VOICEMESH_BIN",
        "the voicemesh binary (cargo build --release --bin voicemesh)",
    )
}

/// Path of the Python interpreter with the test peers installed, from `VOICEMESH_PYTHON`.
///
/// # Panics
/// If the variable is unset or names no file: run the tests through `scripts/test-all.sh`,
/// which creates `.venv` from `tests/requirements.txt` and sets it.
pub fn python() -> PathBuf {
    env_path(
        "VOICEMESH_PYTHON",
        "a Python with tests/requirements.txt installed (.venv/bin/python)",
    )
}

fn env_path(var: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: it must name {what}. Run the tests with `bash scripts/test-all.sh`, which sets it.")
    });
    let p = PathBuf::from(p);
    assert!(
        p.is_file(),
        "{var}={} does not exist: it must name {what}. Run `bash scripts/test-all.sh`.",
        p.display()
    );
    p
}

/// Runs `program args…` to completion and panics with its output if it fails.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static NETNS_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace of its own, deleted on drop together with every process inside it.
///
/// Created with a unique name `vmt-<pid>-<counter>` (creation fails rather than reuse a
/// namespace someone else made), loopback up with multicast on and a route for 224.0.0.0/4, so
/// mDNS, PTP and Link run on `lo` alone.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace. Needs root (the tests run as root).
    ///
    /// # Panics
    /// If `ip netns add` fails (not root, no `ip`, or the name exists).
    pub fn new() -> Netns {
        let n = NETNS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("vmt-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name]);
        // From here on, Drop deletes it even if the set-up below panics.
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["link", "set", "lo", "multicast", "on"]);
        ns.ip(&["route", "add", "224.0.0.0/4", "dev", "lo"]);
        ns
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME args…` and returns its stdout.
    ///
    /// # Panics
    /// If the command fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Adds a stand-in "real" interface `name` with address `cidr` (e.g. `"10.9.0.1/24"`), up
    /// and with multicast on, whose [`Self::tx_packets`] shows whether anything left loopback.
    ///
    /// A `dummy` interface where the kernel has the dummy driver; otherwise (containers often
    /// lack it) one end of a veth pair whose other end, `<name>p`, is up in the same namespace.
    /// `name` must leave room for that suffix (at most 14 characters).
    pub fn add_dummy_iface(&self, name: &str, cidr: &str) {
        assert!(name.len() <= 14, "interface name {name:?} too long");
        let dummy = Command::new("ip")
            .args(["-n", &self.name, "link", "add", name, "type", "dummy"])
            .output()
            .expect("ip link add");
        if !dummy.status.success() {
            let peer = format!("{name}p");
            self.ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
            let off = format!("echo 1 > /proc/sys/net/ipv6/conf/{peer}/disable_ipv6");
            let _ = self.command("sh").args(["-c", &off]).status();
            self.ip(&["link", "set", &peer, "up"]);
        }
        // IPv4 only: otherwise the kernel's own IPv6 traffic (DAD, MLD, router solicitations)
        // moves the TX counter with nobody sending anything.
        let off = format!("echo 1 > /proc/sys/net/ipv6/conf/{name}/disable_ipv6");
        let out = self.command("sh").args(["-c", &off]).output().expect("sh");
        assert!(
            out.status.success(),
            "disabling IPv6 on {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.ip(&["addr", "add", cidr, "dev", name]);
        self.ip(&["link", "set", name, "multicast", "on"]);
        self.ip(&["link", "set", name, "up"]);
    }

    /// Packets sent through `iface` so far (the kernel's TX counter).
    pub fn tx_packets(&self, iface: &str) -> u64 {
        let out = self
            .command("cat")
            .arg(format!("/sys/class/net/{iface}/statistics/tx_packets"))
            .output()
            .expect("ip netns exec cat");
        assert!(
            out.status.success(),
            "no interface {iface} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("tx_packets is a number")
    }

    /// Body of `GET url`, fetched from inside the namespace (Python `urllib`, see the crate
    /// docs). `headers` are extra request headers (e.g. `("Authorization", "Bearer …")`).
    ///
    /// Returns the HTTP status and the body; connection errors are an `Err` with Python's
    /// message, so a test can retry while a daemon starts.
    pub fn http_get(&self, url: &str, headers: &[(&str, &str)]) -> Result<(u16, String), String> {
        const SCRIPT: &str = r#"
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1])
for h in sys.argv[2:]:
    k, v = h.split(":", 1)
    req.add_header(k, v)
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        status, body = r.status, r.read()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read()
sys.stdout.write(str(status) + "\n")
sys.stdout.flush()
sys.stdout.buffer.write(body)
"#;
        let mut c = self.command(python());
        c.args(["-c", SCRIPT, url]);
        for (k, v) in headers {
            c.arg(format!("{k}:{v}"));
        }
        let out = c.output().map_err(|e| format!("cannot run python: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (status, body) = text.split_once('\n').ok_or("no status line")?;
        let status = status.parse().map_err(|_| format!("bad status {status}"))?;
        Ok((status, body.to_owned()))
    }

    /// Runs `f` on a fresh thread that has entered this namespace (`setns`), and returns its
    /// result. Sockets `f` opens live in the namespace, so it can poll a daemon's HTTP API at
    /// millisecond rates with [`http_get_json_local`] (one Python start per request, as in
    /// [`Self::http_get`], costs tens of milliseconds). Only that thread moves; the test
    /// process stays where it is.
    pub fn in_ns<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(&path)
                        .unwrap_or_else(|e| panic!("opening {path}: {e}"));
                    use std::os::fd::AsRawFd;
                    // SAFETY: a valid namespace fd; setns only changes this thread's namespace.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// `GET url` from inside the namespace, expecting 200 and a JSON body.
    ///
    /// # Panics
    /// On a connection error, another status, or a body that is not JSON.
    pub fn http_get_json(&self, url: &str, headers: &[(&str, &str)]) -> serde_json::Value {
        let (status, body) = self
            .http_get(url, headers)
            .unwrap_or_else(|e| panic!("GET {url} in {}: {e}", self.name));
        assert_eq!(status, 200, "GET {url}: status {status}, body {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
    }
}

/// A veth pair joining two [`Netns`]: a point-to-point "LAN" between them, for clusters spread
/// over several namespaces (use `--lan --interface ADDR` for every daemon on it).
///
/// Each end has an IPv4 address on the same /24, IPv6 off, multicast on, and carries its
/// namespace's multicast route (224.0.0.0/4, moved off `lo`), so mDNS and PTP cross the pair.
/// The pair is created inside the first namespace and moved into the second, so its names
/// never exist in the root namespace; it disappears with the namespaces.
#[derive(Debug)]
pub struct VethLink {
    a_ns: String,
    a: String,
    b_ns: String,
    b: String,
}

static VETH_COUNTER: AtomicU32 = AtomicU32::new(0);

impl VethLink {
    /// Joins `a` (address `cidr_a`, e.g. `"10.61.0.1/24"`) and `b` (`cidr_b`).
    ///
    /// # Panics
    /// If an `ip` command fails.
    pub fn connect(a: &Netns, cidr_a: &str, b: &Netns, cidr_b: &str) -> VethLink {
        let n = VETH_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let link = VethLink {
            a_ns: a.name().to_owned(),
            a: format!("vma{tag}"),
            b_ns: b.name().to_owned(),
            b: format!("vmb{tag}"),
        };
        a.ip(&[
            "link",
            "add",
            &link.a,
            "type",
            "veth",
            "peer",
            "name",
            &link.b,
            "netns",
            b.name(),
        ]);
        for (ns, iface, cidr) in [(a, &link.a, cidr_a), (b, &link.b, cidr_b)] {
            let off = format!("echo 1 > /proc/sys/net/ipv6/conf/{iface}/disable_ipv6");
            let _ = ns.command("sh").args(["-c", &off]).status();
            ns.ip(&["addr", "add", cidr, "dev", iface]);
            ns.ip(&["link", "set", iface, "multicast", "on"]);
            ns.ip(&["route", "del", "224.0.0.0/4", "dev", "lo"]);
        }
        link.set_up(true);
        link
    }

    /// Name of the end in the first namespace.
    pub fn a_iface(&self) -> &str {
        &self.a
    }

    /// Name of the end in the second namespace.
    pub fn b_iface(&self) -> &str {
        &self.b
    }

    /// Brings both ends up (and restores the multicast routes, which the kernel drops with a
    /// link that goes down) or down: a partition, healed by `set_up(true)`.
    ///
    /// # Panics
    /// If an `ip` command fails.
    pub fn set_up(&self, up: bool) {
        for (ns, iface) in [(&self.a_ns, &self.a), (&self.b_ns, &self.b)] {
            let state = if up { "up" } else { "down" };
            run("ip", &["-n", ns, "link", "set", iface, state]);
            if up {
                run(
                    "ip",
                    &["-n", ns, "route", "replace", "224.0.0.0/4", "dev", iface],
                );
            }
        }
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill what still runs inside, then delete; never panic in drop.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<libc::pid_t>() {
                    // SAFETY: kill(2) with a pid read from the kernel; no memory is involved.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        // `ip netns delete` can fail transiently while another `ip netns` (of a test running in
        // parallel, here or in another process) remounts /run/netns: retry a few times.
        for _ in 0..10 {
            let ok = Command::new("ip")
                .args(["netns", "delete", &self.name])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok || !Path::new("/run/netns").join(&self.name).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Captured output lines of a [`Child`], and the condition variable that announces new ones.
#[derive(Debug, Default)]
struct Lines {
    lines: Mutex<LineBuf>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct LineBuf {
    all: Vec<String>,
    /// Streams (stdout, stderr) that reached end of file.
    closed: u8,
}

/// A spawned process that is killed when dropped, with its stdout and stderr captured line by
/// line (by two reader threads) so a test can wait for what it prints.
#[derive(Debug)]
pub struct Child {
    name: String,
    child: std::process::Child,
    out: Arc<Lines>,
    readers: Vec<JoinHandle<()>>,
}

impl Child {
    /// Spawns `cmd` with stdout and stderr piped; `name` labels it in messages.
    ///
    /// # Panics
    /// If the process cannot be started.
    pub fn spawn(name: &str, mut cmd: Command) -> Child {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let out = Arc::new(Lines::default());
        let mut readers = Vec::new();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        readers.push(Self::reader(stdout, out.clone()));
        readers.push(Self::reader(stderr, out.clone()));
        Child {
            name: name.to_owned(),
            child,
            out,
            readers,
        }
    }

    fn reader(stream: impl Read + Send + 'static, out: Arc<Lines>) -> JoinHandle<()> {
        std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                        out.lines.lock().unwrap().all.push(line);
                        out.changed.notify_all();
                    }
                }
            }
            out.lines.lock().unwrap().closed += 1;
            out.changed.notify_all();
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a line containing `pattern` has been printed (on stdout or stderr, also
    /// before this call) and returns it; `None` on timeout or when the process closed both
    /// streams without printing it. Woken by each new line, no polling.
    pub fn wait_for_line(&self, pattern: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        let mut g = self.out.lines.lock().unwrap();
        loop {
            if let Some(l) = g.all[seen..].iter().find(|l| l.contains(pattern)) {
                return Some(l.clone());
            }
            seen = g.all.len();
            if g.closed == 2 {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self.out.changed.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Like [`Self::wait_for_line`], but panics with the process's output on timeout.
    pub fn expect_line(&self, pattern: &str, timeout: Duration) -> String {
        self.wait_for_line(pattern, timeout).unwrap_or_else(|| {
            panic!(
                "{} did not print {pattern:?} within {timeout:?}; its output:\n{}",
                self.name,
                self.output()
            )
        })
    }

    /// Everything printed so far, one line per line.
    pub fn output(&self) -> String {
        self.out.lines.lock().unwrap().all.join("\n")
    }

    /// The exit status, if the process has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// Waits for the process to end, at most `timeout`; `None` if it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        // The readers see end of file when it exits (unless it left children holding its
        // pipes, hence the deadline on try_wait as well).
        let deadline = Instant::now() + timeout;
        {
            let mut g = self.out.lines.lock().unwrap();
            while g.closed < 2 {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                g = self.out.changed.wait_timeout(g, deadline - now).unwrap().0;
            }
        }
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the process and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
        for r in self.readers.drain(..) {
            // The pipes close when the process (and any child holding them) is gone; a reader
            // that still waits is left behind rather than blocking the test.
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }
}

/// A WAV file as mono `f32` samples (channels averaged) and its sample rate.
///
/// # Panics
/// If the file cannot be read or is not 16/24/32-bit integer or 32-bit float PCM.
pub fn read_wav_mono(path: impl AsRef<Path>) -> (Vec<f32>, u32) {
    let path = path.as_ref();
    let mut r = hound::WavReader::open(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let spec = r.spec();
    let ch = spec.channels.max(1) as usize;
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => r.samples::<f32>().map(|s| s.expect("sample")).collect(),
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            r.samples::<i32>()
                .map(|s| s.expect("sample") as f32 * scale)
                .collect()
        }
    };
    let mono = interleaved
        .chunks(ch)
        .map(|f| f.iter().sum::<f32>() / ch as f32)
        .collect();
    (mono, spec.sample_rate)
}

/// Frames at which a note starts: where the envelope (peak of |x| over 1 ms windows) rises
/// above `threshold` after at least `min_gap_s` seconds below it (the signal's start counts as
/// silence). Each onset is the first frame of the window that crossed, refined to the first
/// sample above the threshold.
pub fn onsets(samples: &[f32], sample_rate: u32, threshold: f32, min_gap_s: f64) -> Vec<usize> {
    let win = ((sample_rate as usize) / 1000).max(1);
    let min_gap = (min_gap_s * sample_rate as f64).round() as usize;
    let mut out = Vec::new();
    let mut last_loud: Option<usize> = None;
    for (w, chunk) in samples.chunks(win).enumerate() {
        let start = w * win;
        if let Some(i) = chunk.iter().position(|s| s.abs() > threshold) {
            let frame = start + i;
            let quiet_long_enough = match last_loud {
                None => true,
                Some(l) => frame.saturating_sub(l) >= min_gap,
            };
            if quiet_long_enough {
                out.push(frame);
            }
            last_loud = Some(start + chunk.iter().rposition(|s| s.abs() > threshold).unwrap_or(i));
        }
    }
    out
}

/// Frequency in Hz of the strongest spectral peak of `samples` between `f_lo` and `f_hi`.
///
/// Hann window, then the discrete-time Fourier transform evaluated directly (Goertzel) on a
/// grid of 0.5 Hz steps across the band, and finally a parabolic fit of the log-magnitude
/// around the best grid point, refined once more on a 0.01 Hz grid around it. Accurate to
/// better than 0.1 Hz on a 0.3 s segment of a sine or saw at 48 kHz, also with a second note an
/// octave or a fifth away outside the band.
///
/// # Panics
/// If the band is empty or above Nyquist, or there are fewer than 16 samples.
pub fn peak_frequency(samples: &[f32], sample_rate: u32, f_lo: f64, f_hi: f64) -> f64 {
    let sr = sample_rate as f64;
    assert!(samples.len() >= 16, "too few samples for a spectrum");
    assert!(
        0.0 <= f_lo && f_lo < f_hi && f_hi <= sr / 2.0,
        "bad band {f_lo}..{f_hi} Hz at {sr} Hz"
    );
    let n = samples.len();
    let windowed: Vec<f64> = samples
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let w = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / (n - 1) as f64).cos();
            s as f64 * w
        })
        .collect();
    let power = |f: f64| goertzel_power(&windowed, f / sr);

    let best_on_grid = |lo: f64, hi: f64, step: f64| -> (f64, f64) {
        let steps = ((hi - lo) / step).ceil() as usize;
        let mut best = (lo, f64::MIN);
        for k in 0..=steps {
            let f = (lo + k as f64 * step).min(hi);
            let p = power(f);
            if p > best.1 {
                best = (f, p);
            }
        }
        best
    };
    let (coarse, _) = best_on_grid(f_lo, f_hi, 0.5);
    let (fine, _) = best_on_grid((coarse - 0.5).max(f_lo), (coarse + 0.5).min(f_hi), 0.01);
    // Parabolic interpolation of log power over the fine grid's neighbours.
    let h = 0.01;
    let (a, b, c) = (
        power(fine - h).max(1e-300).ln(),
        power(fine).max(1e-300).ln(),
        power(fine + h).max(1e-300).ln(),
    );
    let denom = a - 2.0 * b + c;
    let delta = if denom.abs() > 0.0 {
        (0.5 * (a - c) / denom).clamp(-1.0, 1.0)
    } else {
        0.0
    };
    (fine + delta * h).clamp(f_lo, f_hi)
}

/// |X(f)|² of `x` at `cycles_per_sample` by the Goertzel recurrence.
fn goertzel_power(x: &[f64], cycles_per_sample: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * cycles_per_sample;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &v in x {
        let s0 = v + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    s1 * s1 + s2 * s2 - coeff * s1 * s2
}

/// Equal-tempered frequency of MIDI note `n` (A4 = note 69 = 440 Hz).
pub fn midi_to_hz(n: f64) -> f64 {
    440.0 * 2f64.powf((n - 69.0) / 12.0)
}

/// `GET url` from this process's own namespace (servers on the root namespace's loopback),
/// expecting 200 and a JSON body. For daemons inside a [`Netns`] use [`Netns::http_get_json`].
///
/// # Panics
/// On a connection error, another status, or a body that is not JSON.
pub fn http_get_json_local(url: &str) -> serde_json::Value {
    try_http_get_json_local(url).unwrap_or_else(|e| panic!("{e}"))
}

/// [`http_get_json_local`] that returns connection errors and non-200 answers as `Err`, for
/// polling a daemon that is still starting.
pub fn try_http_get_json_local(url: &str) -> Result<serde_json::Value, String> {
    let mut resp = ureq::get(url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("GET {url}: {e}"))?;
    serde_json::from_str(&body).map_err(|e| format!("GET {url}: not JSON ({e}): {body}"))
}

/// TAI − UTC: the grandmaster's cluster time is realtime + 37 s.
pub const TAI_OFFSET_NS: u64 = 37_000_000_000;

/// Now in cluster time, as every `voicemesh` process on this machine has it (they all read
/// `CLOCK_REALTIME`; the grandmaster adds the TAI offset).
pub fn cluster_now_ns() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    d.as_nanos() as u64 + TAI_OFFSET_NS
}

/// `clock_gettime(id)` in ns.
pub fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid, writable timespec.
    unsafe { libc::clock_gettime(id, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// `cluster_ns − CLOCK_MONOTONIC_RAW ns` (Ableton Link's host clock) on this machine, from the
/// tightest of a few samples of both clocks.
pub fn cluster_minus_monotonic_raw_ns() -> i128 {
    (0..5)
        .map(|_| {
            let a = clock_ns(libc::CLOCK_MONOTONIC_RAW);
            let r = clock_ns(libc::CLOCK_REALTIME);
            let b = clock_ns(libc::CLOCK_MONOTONIC_RAW);
            (b - a, r + i128::from(TAI_OFFSET_NS) - (a + b) / 2)
        })
        .min()
        .unwrap()
        .1
}

/// One JSON line from a Python Link peer (LinkPython-extern) on its stdout.
///
/// # Panics
/// When the peer has exited or said something that is not JSON.
pub fn link_peer_line(stdout: &mut impl std::io::BufRead) -> serde_json::Value {
    let mut s = String::new();
    let n = stdout.read_line(&mut s).expect("peer stdout");
    assert!(
        n > 0,
        "the Python Link peer exited (is LinkPython-extern installed?)"
    );
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("peer said {s:?}: {e}"))
}

/// Starts `voicemesh coordinator --state-dir STATE EXTRA…` in `ns`, waits for its dashboard
/// line and returns it with its `/api/cluster` URL (token included).
pub fn coordinator(ns: &Netns, state: &Path, extra: &[&str]) -> (Child, String) {
    let mut cmd = ns.command(voicemesh_bin());
    cmd.args(["coordinator", "--state-dir"])
        .arg(state)
        .args(extra);
    let c = Child::spawn("coordinator", cmd);
    let line = c.expect_line("dashboard: http://", Duration::from_secs(30));
    let dashboard = line.split("dashboard: ").nth(1).unwrap().trim().to_string();
    let api = dashboard.replacen("/?token=", "/api/cluster?token=", 1);
    (c, api)
}

/// Polls `api` from inside `ns` every 5 ms until `done` accepts the answer; returns it and
/// when it was seen.
///
/// # Panics
/// After `timeout`, with `what` and the last answer.
pub fn wait_api(
    ns: &Netns,
    api: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool + Send,
) -> (serde_json::Value, Instant) {
    try_wait_api(ns, api, timeout, done)
        .unwrap_or_else(|last| panic!("/api/cluster never showed {what}; last: {last:?}"))
}

/// [`wait_api`] without the panic: `Err` carries the last snapshot seen (if any), so a caller
/// can add its own context (e.g. the coordinator's output) to the failure.
pub fn try_wait_api(
    ns: &Netns,
    api: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool + Send,
) -> Result<(serde_json::Value, Instant), Option<serde_json::Value>> {
    ns.in_ns(move || {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < timeout {
            if let Ok(v) = try_http_get_json_local(api) {
                if done(&v) {
                    return Ok((v, Instant::now()));
                }
                last = Some(v);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(last)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SR: u32 = 48_000;

    fn sine(f: f64, secs: f64, amp: f64) -> Vec<f32> {
        let n = (secs * SR as f64) as usize;
        (0..n)
            .map(|i| (amp * (2.0 * std::f64::consts::PI * f * i as f64 / SR as f64).sin()) as f32)
            .collect()
    }

    /// A band-limited sawtooth like the engine's PolyBLEP oscillator: naive saw with the
    /// PolyBLEP correction at each wrap.
    fn polyblep_saw(f: f64, secs: f64, amp: f64) -> Vec<f32> {
        let n = (secs * SR as f64) as usize;
        let dt = f / SR as f64;
        let mut phase = 0.123;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut v = 2.0 * phase - 1.0;
            v -= if phase < dt {
                let t = phase / dt;
                t + t - t * t - 1.0
            } else if phase > 1.0 - dt {
                let t = (phase - 1.0) / dt;
                t * t + t + t + 1.0
            } else {
                0.0
            };
            out.push((amp * v) as f32);
            phase += dt;
            if phase >= 1.0 {
                phase -= 1.0;
            }
        }
        out
    }

    #[test]
    fn midi_note_frequencies() {
        assert_eq!(midi_to_hz(69.0), 440.0);
        assert!((midi_to_hz(60.0) - 261.625_565).abs() < 1e-5);
        assert!((midi_to_hz(81.0) - 880.0).abs() < 1e-9);
    }

    #[test]
    fn peak_of_a_sine_within_a_tenth_of_a_hertz() {
        for f in [110.0, 261.625_565, 440.0, 443.7, 1234.56] {
            let s = sine(f, 0.3, 0.5);
            let got = peak_frequency(&s, SR, f * 0.9, f * 1.1);
            assert!((got - f).abs() <= 0.1, "{f} Hz measured as {got}");
        }
    }

    #[test]
    fn peak_of_a_polyblep_saw_within_a_tenth_of_a_hertz() {
        for note in [45.0, 57.0, 60.0, 69.5, 76.0] {
            let f = midi_to_hz(note);
            let s = polyblep_saw(f, 0.3, 0.4);
            // Band around the fundamental, half a semitone either way.
            let got = peak_frequency(&s, SR, midi_to_hz(note - 0.5), midi_to_hz(note + 0.5));
            assert!(
                (got - f).abs() <= 0.1,
                "note {note}: {f} Hz measured as {got}"
            );
        }
    }

    #[test]
    fn two_notes_are_told_apart_by_band() {
        // C4 and G4 sawtooths sounding together.
        let (a, b) = (midi_to_hz(60.0), midi_to_hz(67.0));
        let mix: Vec<f32> = polyblep_saw(a, 0.3, 0.3)
            .iter()
            .zip(polyblep_saw(b, 0.3, 0.3))
            .map(|(x, y)| x + y)
            .collect();
        for f in [a, b] {
            let got = peak_frequency(&mix, SR, f * 0.97, f * 1.03);
            assert!(
                (got - f).abs() <= 0.1,
                "{f} Hz in the mix measured as {got}"
            );
        }
    }

    #[test]
    fn onsets_found_after_silence_only() {
        let mut s = vec![0.0f32; SR as usize / 10];
        let note = sine(440.0, 0.1, 0.5);
        let first = s.len();
        s.extend(&note);
        s.extend(vec![0.0; SR as usize / 5]);
        let second = s.len();
        s.extend(&note);
        // A short dip (2 ms) inside a note is not a new onset with a 50 ms minimum gap.
        s.extend(vec![0.0; SR as usize / 500]);
        s.extend(&note);
        let o = onsets(&s, SR, 0.1, 0.05);
        assert_eq!(o.len(), 2, "{o:?}");
        // The sine crosses 0.1 within a few samples of its start.
        assert!(o[0] >= first && o[0] - first < 10, "{o:?} vs {first}");
        assert!(o[1] >= second && o[1] - second < 10, "{o:?} vs {second}");
        // With a 1 ms minimum gap the dip counts as a new onset.
        assert_eq!(onsets(&s, SR, 0.1, 0.001).len(), 3);
        assert!(onsets(&vec![0.0; 1000], SR, 0.1, 0.05).is_empty());
    }

    #[test]
    fn wav_round_trip_mono_and_stereo() {
        let dir = std::env::temp_dir().join(format!("vmt-wav-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stereo.wav");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 44_100,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&path, spec).unwrap();
        for (l, r) in [(16384i16, 0i16), (-32768, -32768), (0, 8192)] {
            w.write_sample(l).unwrap();
            w.write_sample(r).unwrap();
        }
        w.finalize().unwrap();
        let (mono, sr) = read_wav_mono(&path);
        assert_eq!(sr, 44_100);
        assert_eq!(mono, vec![0.25, -1.0, 0.125]);

        let path = dir.join("float.wav");
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 48_000,
            bits_per_sample: 32,
            sample_format: hound::SampleFormat::Float,
        };
        let mut w = hound::WavWriter::create(&path, spec).unwrap();
        for v in [0.5f32, -0.25] {
            w.write_sample(v).unwrap();
        }
        w.finalize().unwrap();
        assert_eq!(read_wav_mono(&path), (vec![0.5, -0.25], 48_000));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn netns_exists(name: &str) -> bool {
        run("ip", &["netns", "list"])
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
    }

    #[test]
    fn netns_is_unique_isolated_and_cleaned_up() {
        let (a, b) = (Netns::new(), Netns::new());
        assert_ne!(a.name(), b.name());
        assert!(
            a.name()
                .starts_with(&format!("vmt-{}-", std::process::id()))
        );
        let name = a.name().to_owned();
        assert!(netns_exists(&name));
        // Loopback up, multicast on, the multicast route on lo.
        let link = a.ip(&["link", "show", "lo"]);
        assert!(link.contains("UP") && link.contains("MULTICAST"), "{link}");
        assert!(
            a.ip(&["route", "show", "table", "main"])
                .contains("224.0.0.0/4 dev lo")
        );
        // A dummy "LAN" interface with a counter that moves only when something is sent on it.
        a.add_dummy_iface("lan0", "10.77.0.1/24");
        let before = a.tx_packets("lan0");
        let send_udp = |dst: &str| {
            let out = a
                .command(python())
                .args([
                    "-c",
                    "import socket,sys,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor _ in range(3):\n s.sendto(b'x',(sys.argv[1],9)); time.sleep(0.05)",
                    dst,
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        send_udp("127.0.0.1");
        assert_eq!(a.tx_packets("lan0"), before, "loopback traffic left lo");
        send_udp("10.77.0.99");
        assert!(
            a.tx_packets("lan0") > before,
            "traffic to the stand-in LAN is counted"
        );
        // The interface is not visible outside.
        assert!(!run("ip", &["link", "show"]).contains("lan0"));

        // Processes inside die with the namespace.
        let mut sleeper = {
            let mut c = a.command("sleep");
            c.arg("600");
            Child::spawn("sleep", c)
        };
        drop(a);
        assert!(!netns_exists(&name), "{name} still exists");
        assert!(
            sleeper.wait_timeout(Duration::from_secs(5)).is_some(),
            "process inside survived"
        );
    }

    #[test]
    fn child_lines_are_awaited_and_process_killed_on_drop() {
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "echo starting; echo warn >&2; sleep 0.3; echo ready on 127.0.0.1:1234; sleep 600",
        ]);
        let child = Child::spawn("sh", c);
        let t0 = Instant::now();
        let line = child.expect_line("ready on", Duration::from_secs(5));
        assert_eq!(line, "ready on 127.0.0.1:1234");
        assert!(
            t0.elapsed() >= Duration::from_millis(250),
            "waited for the line"
        );
        assert!(t0.elapsed() < Duration::from_secs(2), "woken promptly");
        // Lines printed earlier are found too, on either stream.
        assert!(child.wait_for_line("warn", Duration::ZERO).is_some());
        assert!(
            child
                .wait_for_line("never printed", Duration::from_millis(100))
                .is_none()
        );
        let pid = child.id() as libc::pid_t;
        drop(child);
        // SAFETY: signal 0 only checks whether the pid exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "child {pid} still alive after drop");
    }

    #[test]
    fn wait_for_line_returns_when_the_process_ends() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo bye"]);
        let child = Child::spawn("sh", c);
        let t0 = Instant::now();
        assert!(
            child
                .wait_for_line("not there", Duration::from_secs(10))
                .is_none()
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn veth_link_joins_two_namespaces_and_partitions() {
        let (a, b) = (Netns::new(), Netns::new());
        let link = VethLink::connect(&a, "10.78.0.1/24", &b, "10.78.0.2/24");
        // A UDP datagram from b reaches a listener in a, unless the link is down.
        let listener = |ns: &Netns| {
            let mut c = ns.command(python());
            c.args([
                "-u",
                "-c",
                "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('10.78.0.1',9999))\nprint('bound')\nprint('got', s.recv(100))",
            ]);
            Child::spawn("udp listener", c)
        };
        let send = |ns: &Netns| {
            let out = ns
                .command(python())
                .args([
                    "-c",
                    "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor _ in range(5):\n  try: s.sendto(b'x',('10.78.0.1',9999))\n  except OSError: pass\n  time.sleep(0.05)",
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ns in [&a, &b] {
            let routes = ns.ip(&["route", "show", "table", "main"]);
            assert!(routes.contains("224.0.0.0/4 dev vm"), "{routes}");
            assert!(!routes.contains("dev lo"), "{routes}");
        }
        let rx = listener(&a);
        rx.expect_line("bound", Duration::from_secs(10));
        send(&b);
        rx.expect_line("got", Duration::from_secs(5));

        link.set_up(false);
        let rx = listener(&a);
        rx.expect_line("bound", Duration::from_secs(10));
        send(&b);
        assert!(
            rx.wait_for_line("got", Duration::from_millis(300))
                .is_none(),
            "partitioned"
        );
        link.set_up(true);
        assert!(
            b.ip(&["route", "show", "table", "main"])
                .contains(&format!("224.0.0.0/4 dev {}", link.b_iface()))
        );
        send(&b);
        rx.expect_line("got", Duration::from_secs(5));
        assert!(a.ip(&["link", "show", link.a_iface()]).contains("UP"));
    }

    #[test]
    fn http_json_from_inside_a_namespace() {
        let ns = Netns::new();
        let dir = std::env::temp_dir().join(format!("vmt-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("cluster.json"),
            r#"{"nodes": [1, 2], "tempo_bpm": 120.0}"#,
        )
        .unwrap();
        let mut cmd = ns.command(python());
        cmd.args(["-u", "-m", "http.server", "--bind", "127.0.0.1", "8765"])
            .current_dir(&dir);
        let server = Child::spawn("http.server", cmd);
        server.expect_line("Serving HTTP", Duration::from_secs(10));
        let v = ns.http_get_json("http://127.0.0.1:8765/cluster.json", &[("X-Test", "1")]);
        assert_eq!(v["tempo_bpm"], 120.0);
        assert_eq!(v["nodes"].as_array().unwrap().len(), 2);
        let (status, _) = ns.http_get("http://127.0.0.1:8765/missing", &[]).unwrap();
        assert_eq!(status, 404);
        // The root namespace does not see the server.
        assert!(
            ureq::get("http://127.0.0.1:8765/cluster.json")
                .call()
                .is_err()
        );
        drop(server);
        drop(ns);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    #[should_panic(expected = "scripts/test-all.sh")]
    fn missing_binary_names_the_test_script() {
        env_path("VOICEMESH_SURELY_UNSET_VARIABLE", "nothing");
    }
}
