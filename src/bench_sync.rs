//! `voicemesh bench sync`: how closely the nodes of a real cluster start the notes of a chord.
//!
//! Starts a coordinator and three nodes as separate processes of this binary, each node's
//! cluster clock deliberately started off (`--test-clock-offset-ms`, `--test-clock-rate-ppm`),
//! plays chords whose notes the round-robin policy spreads over all three nodes, and measures
//! each chord's onset spread: `max − min` over the nodes of the `CLOCK_MONOTONIC` instant at
//! which each node's audio output emits the note's first frame (every process of the machine
//! shares that clock, so this is the truth, not the nodes' own opinion of the time). The nodes
//! report those instants in their `Onset` messages; the coordinator groups them into chords
//! (`/api/onsets`).
//!
//! As root it builds a small LAN of network namespaces on one bridge (unique names, deleted at
//! the end): one namespace for the coordinator, one per node, and two for a `ptp4l -S` pair
//! (both `free_running 1`: one system clock is shared by every namespace, nobody may steer
//! it) whose offset rms, measured in the same run over the same kind of veth path, is printed
//! as the floor software timestamping allows. Otherwise the cluster runs on loopback (other
//! VoiceMesh processes on this machine's loopback may then join it) and no floor is measured.
//!
//! Convergence: from the nodes' start, a probe chord every [`PROBE_EVERY`]; `converge_s` is
//! when the first probe of an unbroken run of [`CONVERGED_PROBES`] probes, each reaching every
//! node within [`CONVERGED_NS`], was emitted. The last line is
//! `p50_onset_spread_us=A p99_onset_spread_us=B max_onset_spread_us=C converge_s=D`.

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Nodes in the measured cluster.
pub const NODES: usize = 3;
/// A probe chord this often while waiting for convergence.
pub const PROBE_EVERY: Duration = Duration::from_millis(200);
/// Onset spread under which a probe counts as converged: one sample at 48 kHz.
pub const CONVERGED_NS: u64 = 20_800;
/// Consecutive converged probes that make convergence: 5 s within one sample, so a cluster
/// whose servos still ring after their first good seconds is not called converged ("converge
/// and stay converged"), and the measured chords start on a settled cluster.
pub const CONVERGED_PROBES: usize = 25;

/// What `voicemesh bench sync` is asked to do.
#[derive(Debug, Clone)]
pub struct SyncBench {
    /// Chords measured after convergence.
    pub chords: u32,
    /// Time between chords.
    pub interval: Duration,
    /// Clock offset of the first node, ms (the others get −offset and offset/2).
    pub offset_ms: f64,
    /// Clock rate error of the first node, ppm (the others get −rate and −rate/2).
    pub rate_ppm: f64,
    /// Lookahead of the coordinator.
    pub lookahead_ms: u64,
    /// Give up when convergence takes longer.
    pub converge_timeout: Duration,
    /// Use network namespaces (needs root); `None`: when root.
    pub netns: Option<bool>,
}

/// The figures of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncReport {
    /// Per-chord spreads of the measured chords, ns, sorted.
    pub spreads_ns: Vec<u64>,
    /// Seconds from the nodes' start to convergence.
    pub converge_s: f64,
    /// ptp4l's offset rms on the same bridge, ns (namespace mode only).
    pub ptp4l_rms_ns: Option<f64>,
}

impl SyncReport {
    /// Nearest-rank percentile of the spreads, µs.
    pub fn percentile_us(&self, p: f64) -> f64 {
        let v = &self.spreads_ns;
        if v.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
        v[rank.min(v.len()) - 1] as f64 / 1000.0
    }

    /// The one machine-readable line.
    pub fn summary_line(&self) -> String {
        format!(
            "p50_onset_spread_us={:.2} p99_onset_spread_us={:.2} max_onset_spread_us={:.2} converge_s={:.2}",
            self.percentile_us(50.0),
            self.percentile_us(99.0),
            self.spreads_ns
                .last()
                .map_or(f64::NAN, |m| *m as f64 / 1000.0),
            self.converge_s
        )
    }
}

use voicemesh_node::audio::monotonic_ns as mono_ns;

/// One OSC bundle of `/voicemesh/note` messages `(note, velocity)` on channel 0, so the
/// coordinator stamps them all with one `at`.
pub(crate) fn note_bundle(notes: impl Iterator<Item = (i32, i32)>) -> Result<Vec<u8>> {
    note_bundle_on(notes.map(|(n, v)| (n, v, 0)))
}

/// [`note_bundle`] with each note's MIDI channel: `(note, velocity, channel)` (the demo sends
/// the chord on channel 0 and its root, for the MCU node, on channel 1).
pub(crate) fn note_bundle_on(notes: impl Iterator<Item = (i32, i32, i32)>) -> Result<Vec<u8>> {
    use rosc::{OscBundle, OscMessage, OscPacket, OscTime, OscType};
    let content = notes
        .map(|(n, v, ch)| {
            OscPacket::Message(OscMessage {
                addr: "/voicemesh/note".into(),
                args: vec![OscType::Int(n), OscType::Int(v), OscType::Int(ch)],
            })
        })
        .collect();
    let bundle = OscPacket::Bundle(OscBundle {
        timetag: OscTime {
            seconds: 0,
            fractional: 1,
        },
        content,
    });
    rosc::encoder::encode(&bundle).context("encoding OSC")
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process whose output lines are collected; killed (SIGTERM, then SIGKILL) on drop.
struct Proc {
    name: String,
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command) -> Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        Ok(Proc {
            name: name.to_owned(),
            child,
            lines,
        })
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The first output line containing `pattern`, waiting up to `timeout`.
    fn wait_line(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(pattern)) {
                return Ok(l);
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!(
                    "{} exited ({st}) before printing {pattern:?}:\n{}",
                    self.name,
                    self.lines().join("\n")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} printed no {pattern:?} within {timeout:?}:\n{}",
                    self.name,
                    self.lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
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

// ---------------------------------------------------------------------------------------------
// Network namespaces

static NS_COUNTER: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Namespaces on one bridge: `hub` holds the bridge, each member one veth end with
/// `10.77.0.(i+1)/24`. Everything is deleted on drop (processes inside are killed first).
struct Lan {
    hub: String,
    members: Vec<String>,
}

impl Lan {
    fn new(members: usize) -> Result<Lan> {
        let tag = format!(
            "vmbs{}-{}",
            std::process::id(),
            NS_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut lan = Lan {
            hub: format!("{tag}-hub"),
            members: Vec::new(),
        };
        ip(&["netns", "add", &lan.hub])?;
        ip(&["-n", &lan.hub, "link", "add", "br0", "type", "bridge"])?;
        // Flood multicast to every port: no IGMP querier runs on this LAN.
        ip(&[
            "-n",
            &lan.hub,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", &lan.hub, "link", "set", "br0", "up"])?;
        for i in 0..members {
            let ns = format!("{tag}-m{i}");
            ip(&["netns", "add", &ns])?;
            lan.members.push(ns.clone());
            let (hub_end, end) = (format!("v{i}"), format!("e{i}"));
            ip(&[
                "-n", &lan.hub, "link", "add", &hub_end, "type", "veth", "peer", "name", &end,
                "netns", &ns,
            ])?;
            ip(&["-n", &lan.hub, "link", "set", &hub_end, "master", "br0"])?;
            ip(&["-n", &lan.hub, "link", "set", &hub_end, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "addr", "add", &Self::cidr(i), "dev", &end])?;
            ip(&["-n", &ns, "link", "set", &end, "multicast", "on"])?;
            ip(&["-n", &ns, "link", "set", &end, "up"])?;
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", &end])?;
        }
        Ok(lan)
    }

    fn addr(i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    fn cidr(i: usize) -> String {
        format!("{}/24", Self::addr(i))
    }

    fn iface(i: usize) -> String {
        format!("e{i}")
    }

    fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.members[i]]).arg(program);
        c
    }

    /// Runs `f` on a thread that entered member `i`'s namespace.
    fn in_ns<R: Send>(&self, i: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
        let path = format!("/run/netns/{}", self.members[i]);
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<R> {
                    let file =
                        std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                    use std::os::fd::AsRawFd;
                    // SAFETY: a valid namespace fd; setns changes only this thread's namespace.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        bail!("setns {path}: {}", std::io::Error::last_os_error());
                    }
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.members.iter().chain(std::iter::once(&self.hub)) {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<libc::pid_t>() {
                        // SAFETY: kill(2) on a pid the kernel listed in our namespace.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            for _ in 0..10 {
                let ok = Command::new("ip")
                    .args(["netns", "delete", ns])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok || !Path::new("/run/netns").join(ns).exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Talking to the coordinator

/// `GET path` on `addr` (HTTP/1.1, `Connection: close`), the body as JSON.
fn http_get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("HTTP answer without a header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    serde_json::from_str(body).with_context(|| format!("GET {path}: not JSON: {body}"))
}

struct Api {
    http: SocketAddr,
    token: String,
    osc: SocketAddr,
    socket: UdpSocket,
}

impl Api {
    fn get(&self, what: &str) -> Result<serde_json::Value> {
        http_get_json(self.http, &format!("/api/{what}?token={}", self.token))
    }

    /// One datagram: the note-offs of `release`, then the note-ons of `notes` (one `at`).
    fn chord(&self, notes: &[i32], release: &[i32]) -> Result<()> {
        let bytes = note_bundle(
            release
                .iter()
                .map(|n| (*n, 0))
                .chain(notes.iter().map(|n| (*n, 100))),
        )?;
        self.socket.send_to(&bytes, self.osc)?;
        Ok(())
    }
}

/// One chord as `/api/onsets` reports it.
#[derive(Debug, Clone, Copy)]
struct Chord {
    nodes: usize,
    spread_ns: Option<u64>,
    first_mono: Option<u64>,
}

fn chords(v: &serde_json::Value) -> Vec<Chord> {
    v["chords"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| Chord {
                    nodes: c["nodes"].as_u64().unwrap_or(0) as usize,
                    spread_ns: c["emitted_spread_ns"].as_u64(),
                    first_mono: c["first_emitted_mono_ns"].as_u64(),
                })
                .collect()
        })
        .unwrap_or_default()
}

const CHORD: [[i32; NODES]; 2] = [[60, 64, 67], [62, 65, 69]];

/// Plays probes until convergence, then the measured chords; returns (converge instant in
/// mono ns, measured chords' spreads).
fn drive(
    api: &Api,
    b: &SyncBench,
    nodes_started: u64,
    on_measure: &mut dyn FnMut(),
) -> Result<(u64, Vec<u64>)> {
    // Every node online first.
    let deadline = Instant::now() + b.converge_timeout;
    loop {
        let v = api.get("cluster");
        let online = v.as_ref().map_or(0, |v| {
            v["nodes"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|n| n["online"] == true).count())
        });
        if online >= NODES {
            println!(
                "all {NODES} nodes online {:.2} s after they started",
                mono_ns().saturating_sub(nodes_started) as f64 / 1e9
            );
            break;
        }
        if Instant::now() > deadline {
            bail!("only {online} of {NODES} nodes came online within the convergence timeout");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Probes.
    let mut k = 0usize;
    let mut converged_at = None;
    let mut next_poll = Instant::now() + Duration::from_secs(1);
    while converged_at.is_none() {
        if Instant::now() > deadline {
            bail!(
                "no convergence within {:?}: the last probes' spreads were {:?}",
                b.converge_timeout,
                chords(&api.get("onsets")?)
                    .iter()
                    .rev()
                    .take(CONVERGED_PROBES)
                    .map(|c| c.spread_ns)
                    .collect::<Vec<_>>()
            );
        }
        api.chord(&CHORD[k % 2], &CHORD[(k + 1) % 2])?;
        k += 1;
        std::thread::sleep(PROBE_EVERY);
        if Instant::now() >= next_poll {
            next_poll = Instant::now() + Duration::from_secs(1);
            let all = chords(&api.get("onsets")?);
            converged_at = converged(&all);
        }
    }
    let converged_at = converged_at.unwrap_or(nodes_started);
    let probes: Vec<String> = chords(&api.get("onsets")?)
        .iter()
        .filter_map(|c| {
            let m = c.first_mono?;
            let s = c.spread_ns?;
            (m <= converged_at).then(|| {
                format!(
                    "{:.1}s:{}{:.1}",
                    m.saturating_sub(nodes_started) as f64 / 1e9,
                    if c.nodes < NODES { "(partial)" } else { "" },
                    s as f64 / 1000.0
                )
            })
        })
        .collect();
    println!(
        "probe chords before convergence (time since the nodes started: spread µs): {}",
        probes.join(" ")
    );
    // The measurement.
    on_measure();
    let start = mono_ns();
    for i in 0..b.chords as usize {
        api.chord(&CHORD[(k + i) % 2], &CHORD[(k + i + 1) % 2])?;
        std::thread::sleep(b.interval);
    }
    api.chord(&[], &CHORD[(k + b.chords as usize + 1) % 2])?;
    // Every node reports its onsets with its heartbeat: wait for all of them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let measured: Vec<Chord> = chords(&api.get("onsets")?)
            .into_iter()
            .filter(|c| c.first_mono.is_some_and(|m| m >= start))
            .collect();
        let complete = measured.iter().filter(|c| c.nodes == NODES).count();
        if complete >= b.chords as usize || Instant::now() > deadline {
            if complete < b.chords as usize {
                bail!(
                    "only {complete} of {} chords reached all {NODES} nodes (chords seen: {})",
                    b.chords,
                    measured.len()
                );
            }
            // Late events (arrived after their block was rendered) explain outliers.
            if let Ok(v) = api.get("cluster") {
                let late: Vec<String> = v["nodes"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|n| {
                                format!("{}={}", n["id"].as_str().unwrap_or("?"), n["late_events"])
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                println!("late events per node (whole run): {}", late.join(" "));
            }
            let mut spreads: Vec<u64> = measured
                .iter()
                .filter(|c| c.nodes == NODES)
                .filter_map(|c| c.spread_ns)
                .collect();
            spreads.sort_unstable();
            return Ok((converged_at, spreads));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The emission instant of the first probe of the first unbroken run of
/// [`CONVERGED_PROBES`] chords that reached every node within [`CONVERGED_NS`].
fn converged(all: &[Chord]) -> Option<u64> {
    let ok = |c: &Chord| c.nodes == NODES && c.spread_ns.is_some_and(|s| s <= CONVERGED_NS);
    let mut run = 0usize;
    for (i, c) in all.iter().enumerate() {
        if ok(c) {
            run += 1;
            if run == CONVERGED_PROBES {
                return all[i + 1 - CONVERGED_PROBES].first_mono;
            }
        } else {
            run = 0;
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// ptp4l floor

/// A free-running `ptp4l -S` pair on two members of the LAN, and a thread sampling the
/// slave's `offsetFromMaster` through `pmc` (ptp4l prints no offsets while free-running).
struct Ptp4lFloor {
    _gm: Proc,
    _slave: Proc,
    samples: Arc<Mutex<Vec<(u64, f64)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

/// How often the floor's offset is sampled.
const PMC_EVERY: Duration = Duration::from_millis(125);

impl Ptp4lFloor {
    /// Starts the pair on members `gm` and `slave` (domain 99, so it never meets the
    /// cluster's PTP, which is on its own ports anyway; `free_running 1` on both: the system
    /// clock is shared by every namespace and nobody may steer it).
    fn start(lan: &Lan, dir: &Path, gm: usize, slave: usize) -> Result<Ptp4lFloor> {
        which("ptp4l")?;
        let pmc = which("pmc")?;
        let common = "[global]\nfree_running 1\ndomainNumber 99\nlogSyncInterval -3\n\
                      logMinDelayReqInterval -3\nlogAnnounceInterval -2\n\
                      announceReceiptTimeout 3\ntx_timestamp_timeout 100\n";
        let uds = |name: &str| dir.join(format!("{name}.sock"));
        let run = |i: usize, name: &str, extra: &str| -> Result<Proc> {
            let cfg = dir.join(format!("{name}.cfg"));
            std::fs::write(
                &cfg,
                format!("{common}{extra}uds_address {}\n", uds(name).display()),
            )?;
            let mut c = lan.command(i, "ptp4l");
            c.args(["-S", "-m", "-q", "-f"])
                .arg(&cfg)
                .args(["-i", &Lan::iface(i)]);
            Proc::spawn(&format!("ptp4l {name}"), c)
        };
        let gm = run(gm, "gm", "priority1 1\n")?;
        let slave = run(slave, "slave", "slaveOnly 1\n")?;
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (server, client) = (uds("slave"), uds("pmc"));
        {
            let (samples, stop) = (samples.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let out = Command::new(&pmc)
                        .args(["-u", "-b", "0", "-d", "99", "-s"])
                        .arg(&server)
                        .arg("-i")
                        .arg(&client)
                        .arg("GET CURRENT_DATA_SET")
                        .output();
                    let t = mono_ns();
                    if let Some(off) = out
                        .ok()
                        .and_then(|o| parse_offset_from_master(&String::from_utf8_lossy(&o.stdout)))
                    {
                        samples
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((t, off));
                    }
                    std::thread::sleep(PMC_EVERY);
                }
            });
        }
        Ok(Ptp4lFloor {
            _gm: gm,
            _slave: slave,
            samples,
            stop,
        })
    }

    /// The rms of the offsets sampled since `from` (mono ns), ns, and how many.
    fn rms_since(&self, from: u64) -> Option<(f64, usize)> {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let v: Vec<f64> = s.iter().filter(|(t, _)| *t >= from).map(|x| x.1).collect();
        rms(&v).map(|r| (r, v.len()))
    }
}

impl Drop for Ptp4lFloor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `offsetFromMaster` from pmc's answer to `GET CURRENT_DATA_SET`, ns.
fn parse_offset_from_master(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("offsetFromMaster"))
        .and_then(|v| v.trim().parse().ok())
}

/// Root mean square (None for no values).
fn rms(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt())
}

fn which(program: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found (install linuxptp)"))
}

// ---------------------------------------------------------------------------------------------
// The run

fn node_args(b: &SyncBench, k: usize) -> Vec<String> {
    let f = [1.0, -1.0, 0.5][k % 3];
    let g = [1.0, -1.0, -0.5][k % 3];
    vec![
        "--voices".into(),
        "8".into(),
        "--audio".into(),
        "null".into(),
        format!("--test-clock-offset-ms={}", b.offset_ms * f),
        format!("--test-clock-rate-ppm={}", b.rate_ppm * g),
    ]
}

fn parse_coordinator(coord: &mut Proc) -> Result<(SocketAddr, String, SocketAddr)> {
    let dash = coord.wait_line("dashboard: http://", Duration::from_secs(30))?;
    let url = dash
        .split("dashboard: http://")
        .nth(1)
        .context("dashboard line")?
        .trim();
    let (host, token) = url.split_once("/?token=").context("dashboard URL")?;
    let osc = coord.wait_line("osc: udp://", Duration::from_secs(5))?;
    let osc = osc.split("osc: udp://").nth(1).context("osc line")?.trim();
    Ok((
        host.parse().context("dashboard address")?,
        token.to_owned(),
        osc.parse().context("OSC address")?,
    ))
}

/// Runs the benchmark and prints its report; returns the figures.
pub fn run(b: &SyncBench) -> Result<SyncReport> {
    if b.chords == 0 {
        bail!("--chords must be at least 1");
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let netns = b.netns.unwrap_or(root);
    if netns && !root {
        bail!("--netns needs root (it creates network namespaces)");
    }
    let exe = std::env::current_exe().context("finding this binary")?;
    let dir = std::env::temp_dir().join(format!(
        "voicemesh-bench-sync-{}-{}",
        std::process::id(),
        NS_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());
    let lookahead = b.lookahead_ms.to_string();
    println!(
        "onset spread of {} chords over {NODES} nodes (null outputs at 48 kHz, lookahead {} ms), \
         node clocks started off by {:+} / {:+} / {:+} ms and {:+} / {:+} / {:+} ppm",
        b.chords,
        b.lookahead_ms,
        b.offset_ms,
        -b.offset_ms,
        b.offset_ms / 2.0,
        b.rate_ppm,
        -b.rate_ppm,
        -b.rate_ppm / 2.0
    );
    let state = dir.join("state");
    let state = state.to_string_lossy().into_owned();
    if netns {
        // Members: 0 coordinator, 1..=NODES nodes, then the ptp4l pair.
        let lan = Lan::new(NODES + 3)?;
        println!(
            "network: {} namespaces on one bridge ({}…), veth links",
            NODES + 3,
            lan.hub
        );
        let mut cmd = lan.command(0, &exe);
        cmd.args([
            "coordinator",
            "--state-dir",
            &state,
            "--lookahead-ms",
            &lookahead,
            "--lan",
            "--interface",
            &Lan::addr(0),
        ]);
        let mut coord = Proc::spawn("coordinator", cmd)?;
        let (http, token, osc) = parse_coordinator(&mut coord)?;
        let (gm, slave) = (NODES + 1, NODES + 2);
        let floor = Ptp4lFloor::start(&lan, &dir, gm, slave)?;
        let nodes_started = mono_ns();
        let mut nodes = Vec::new();
        for k in 0..NODES {
            let name = format!("sync{}", k + 1);
            let mut cmd = lan.command(k + 1, &exe);
            cmd.args(["node", "--name", &name, "--lan", "--interface"])
                .arg(Lan::addr(k + 1))
                .args(node_args(b, k));
            nodes.push(Proc::spawn(&name, cmd)?);
        }
        for n in &mut nodes {
            n.wait_line("control session on quic://", Duration::from_secs(30))?;
        }
        let b2 = b.clone();
        let result = lan.in_ns(0, move || -> Result<(u64, Vec<u64>, u64)> {
            let api = Api {
                http,
                token,
                osc,
                socket: UdpSocket::bind("127.0.0.1:0")?,
            };
            let mut measure_from = 0;
            let (conv, spreads) = drive(&api, &b2, nodes_started, &mut || {
                measure_from = mono_ns();
            })?;
            Ok((conv, spreads, measure_from))
        })?;
        let (conv, spreads, measure_from) = result.map_err(|e| {
            anyhow::anyhow!(
                "{e:#}\ncoordinator:\n{}\nnodes:\n{}",
                coord.lines().join("\n"),
                nodes
                    .iter()
                    .map(|n| n.lines().join("\n"))
                    .collect::<Vec<_>>()
                    .join("\n--\n")
            )
        })?;
        // The floor: the slave's offsets while the chords were measured (by then it has run
        // as long as the convergence took).
        let rms = floor.rms_since(measure_from);
        match rms {
            Some((_, n)) => println!("ptp4l floor: {n} offsetFromMaster samples (pmc)"),
            None => {
                println!("ptp4l floor: pmc returned no offsetFromMaster while the chords played")
            }
        }
        Ok(report(spreads, conv, nodes_started, rms.map(|r| r.0)))
    } else {
        println!("network: loopback (no namespaces, no ptp4l floor)");
        let domain = (100 + std::process::id() % 100).to_string();
        let ports = 20_000 + (std::process::id() % 10_000) * 2;
        let (ev, general) = (ports.to_string(), (ports + 1).to_string());
        let ptp = [
            "--ptp-domain",
            &domain,
            "--ptp-event-port",
            &ev,
            "--ptp-general-port",
            &general,
        ];
        let mut cmd = Command::new(&exe);
        cmd.args([
            "coordinator",
            "--state-dir",
            &state,
            "--lookahead-ms",
            &lookahead,
            "--http",
            "127.0.0.1:0",
            "--osc",
            "127.0.0.1:0",
        ])
        .args(ptp);
        let mut coord = Proc::spawn("coordinator", cmd)?;
        let (http, token, osc) = parse_coordinator(&mut coord)?;
        let nodes_started = mono_ns();
        let mut nodes = Vec::new();
        for k in 0..NODES {
            let name = format!("sync{}-{}", std::process::id(), k + 1);
            let mut cmd = Command::new(&exe);
            cmd.args(["node", "--name", &name])
                .args(ptp)
                .args(node_args(b, k));
            nodes.push(Proc::spawn(&name, cmd)?);
        }
        for n in &mut nodes {
            n.wait_line("control session on quic://", Duration::from_secs(30))?;
        }
        let api = Api {
            http,
            token,
            osc,
            socket: UdpSocket::bind("127.0.0.1:0")?,
        };
        let (conv, spreads) = drive(&api, b, nodes_started, &mut || {})?;
        Ok(report(spreads, conv, nodes_started, None))
    }
}

/// Builds and prints the report.
fn report(spreads_ns: Vec<u64>, conv: u64, nodes_started: u64, rms: Option<f64>) -> SyncReport {
    let r = SyncReport {
        spreads_ns,
        converge_s: conv.saturating_sub(nodes_started) as f64 / 1e9,
        ptp4l_rms_ns: rms,
    };
    print_report(&r);
    r
}

struct RemoveDir(PathBuf);
impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn print_report(r: &SyncReport) {
    let v = &r.spreads_ns;
    println!(
        "onset spread distribution ({} chords, all {NODES} nodes):",
        v.len()
    );
    let edges = [1_000u64, 2_000, 5_000, 10_000, 20_800, u64::MAX];
    let mut lo = 0u64;
    for hi in edges {
        let n = v.iter().filter(|s| **s >= lo && **s < hi).count();
        let label = if hi == u64::MAX {
            format!(">= {:.1} µs", lo as f64 / 1000.0)
        } else {
            format!("{:.1}–{:.1} µs", lo as f64 / 1000.0, hi as f64 / 1000.0)
        };
        println!("  {label:<16} {n:>5}  {}", "#".repeat(n.div_ceil(4)));
        lo = hi;
    }
    for p in [50.0, 90.0, 99.0] {
        println!("  p{p:<3} {:>8.2} µs", r.percentile_us(p));
    }
    match r.ptp4l_rms_ns {
        Some(rms) => println!(
            "ptp4l -S floor (free-running pair on the same bridge, same run): offset rms {:.2} µs",
            rms / 1000.0
        ),
        None => println!("ptp4l -S floor: not measured"),
    }
    println!("{}", r.summary_line());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convergence_is_the_start_of_the_first_good_run() {
        let c = |nodes, s, m| Chord {
            nodes,
            spread_ns: Some(s),
            first_mono: Some(m),
        };
        let mut all = vec![c(3, 3_000_000, 1), c(2, 10, 2)];
        for i in 0..5 {
            all.push(c(3, 1_000, 10 + i));
        }
        all.push(c(3, 30_000, 20));
        assert_eq!(converged(&all), None);
        for i in 0..CONVERGED_PROBES as u64 {
            all.push(c(3, 500, 100 + i));
        }
        assert_eq!(converged(&all), Some(100));
    }

    #[test]
    fn pmc_offsets_are_parsed() {
        let answer = "sending: GET CURRENT_DATA_SET\n\t52a08a.fffe.d5f7e9-1 seq 0 RESPONSE \
                      MANAGEMENT CURRENT_DATA_SET\n\t\tstepsRemoved     1\n\t\t\
                      offsetFromMaster -1569.0\n\t\tmeanPathDelay    2721.0\n";
        assert_eq!(parse_offset_from_master(answer), Some(-1569.0));
        assert_eq!(
            parse_offset_from_master("sending: GET CURRENT_DATA_SET\n"),
            None
        );
        assert_eq!(
            rms(&[300.0, -400.0]),
            Some(((90_000.0f64 + 160_000.0) / 2.0).sqrt())
        );
        assert_eq!(rms(&[]), None);
    }

    #[test]
    fn summary_line_has_the_four_figures() {
        let r = SyncReport {
            spreads_ns: vec![1_000, 2_000, 3_000, 50_000],
            converge_s: 4.5,
            ptp4l_rms_ns: None,
        };
        assert_eq!(
            r.summary_line(),
            "p50_onset_spread_us=2.00 p99_onset_spread_us=50.00 max_onset_spread_us=50.00 converge_s=4.50"
        );
    }
}
