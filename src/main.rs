//! `voicemesh`: one binary for every Linux role of a VoiceMesh cluster.
//!
//! This file only parses arguments and wires the crates together; everything that does the
//! work lives in `voicemesh-coordinator`, `voicemesh-node` and `voicemesh-protocol`.

mod bench_input;
mod bench_sync;
mod demo;
mod mcu_sim;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use voicemesh_coordinator::{CoordinatorConfig, RunningCoordinator};
use voicemesh_node::clock::ClusterClock;
use voicemesh_node::clock::ptp::{self, PtpConfig};
use voicemesh_node::{AudioSpec, NetScope, NodeConfig, RunningNode};
use voicemesh_protocol::discovery;

/// VoiceMesh turns the computers on a LAN into one polyphonic instrument.
///
/// Run one `coordinator` per cluster and one `node` per machine with a sound card, or `demo`
/// to run a whole cluster on this machine.
#[derive(Debug, Parser)]
#[command(name = "voicemesh", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator: discovers nodes, allocates voices, serves OSC and the dashboard,
    /// and is the PTP grandmaster of the cluster.
    Coordinator(CoordinatorArgs),
    /// Run a node: a real-time synth engine that plays what the coordinator sends, at the
    /// cluster time stamped on it.
    Node(NodeArgs),
    /// Start a coordinator and two nodes on this machine and play a short phrase across both.
    ///
    /// By default every packet stays on the loopback interface; `--lan` opts in to the real
    /// network.
    Demo(DemoArgs),
    /// Measure this machine: how many synth voices one core renders in real time.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run a simulated MCU node: the Teensy CV firmware's core on this machine, with virtual
    /// 12-bit 0–5 V DACs, advertised over mDNS as `role=mcu` so a coordinator finds it.
    McuSim(McuSimArgs),
}

#[derive(Debug, Args)]
struct McuSimArgs {
    /// Name of this MCU node; also its id unless --id is given.
    #[arg(long, value_name = "NAME", default_value = "mcu-sim")]
    name: String,
    /// Stable id of this MCU node, unique in the cluster (default: the name).
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// CV channels: 8, 16, 24 or 32 (one virtual 8-channel DAC per 8 channels).
    #[arg(long, value_name = "N", default_value_t = 8)]
    channels: u16,
    /// Voice slots the coordinator may give this node (1–16).
    #[arg(long, value_name = "N", default_value_t = 2)]
    voices: u16,
    /// UDP port of the session (0 = any free port; it is advertised over mDNS).
    #[arg(long, value_name = "PORT", default_value_t = discovery::DEFAULT_MCU_PORT)]
    port: u16,
    /// Print every DAC code change: `mcu-sim NAME: dac ch C code N at_ns T seen_unix_ns U`, with
    /// T the cluster time the node wrote it at (`-` when it could not report it) and U when the
    /// change was seen (realtime clock, within 5 ms).
    #[arg(long)]
    print_codes: bool,
    /// Use the real network (mDNS and the session on a LAN interface) instead of loopback only.
    #[arg(long)]
    lan: bool,
    /// With --lan: the IPv4 address of the interface to use (default: the first interface that
    /// is up, multicast-capable and not loopback).
    #[arg(long, value_name = "ADDR", requires = "lan")]
    interface: Option<Ipv4Addr>,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Voices per core of each synth engine rendered in real time at 48 kHz in 64-frame
    /// blocks, on one thread of this machine. Ends with one line
    /// `reference_voices_per_core=N fm_voices_per_core=M` for scripts.
    Engine(BenchEngineArgs),
    /// The voice allocator core on 64 nodes × 16 voices: note-on + note-off pairs per second
    /// and the p99 time of one operation. Ends with one line `pairs_per_s=N p99_op_us=M`.
    Alloc(BenchAllocArgs),
    /// Input latency inside the coordinator: RTP-MIDI and OSC datagram received → VoiceOn
    /// written to the node's session (median, p99), on loopback in this process. Ends with one
    /// line `rtpmidi_p50_us=A rtpmidi_p99_us=B osc_p50_us=C osc_p99_us=D`.
    Input(bench_input::BenchInputArgs),
    /// Onset spread across nodes: a coordinator and three nodes as processes (in network
    /// namespaces on one bridge when run as root, with a ptp4l -S pair as the floor; on
    /// loopback otherwise), node clocks started off on purpose; plays chords over all nodes and
    /// measures when each node's output really emits each note (CLOCK_MONOTONIC). Ends with
    /// one line `p50_onset_spread_us=A p99_onset_spread_us=B max_onset_spread_us=C
    /// converge_s=D`.
    Sync(BenchSyncArgs),
}

#[derive(Debug, Args)]
struct BenchSyncArgs {
    /// Chords measured after convergence.
    #[arg(long, value_name = "N", default_value_t = 200)]
    chords: u32,
    /// Time between chords, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    interval_ms: u64,
    /// Clock offset the first node starts with, in ms (the others: −MS and MS/2).
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 3.0,
        allow_negative_numbers = true
    )]
    offset_ms: f64,
    /// Clock rate error the first node starts with, in ppm (the others: −PPM and −PPM/2).
    #[arg(
        long,
        value_name = "PPM",
        default_value_t = 50.0,
        allow_negative_numbers = true
    )]
    rate_ppm: f64,
    /// The coordinator's lookahead, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 20)]
    lookahead_ms: u64,
    /// Give up when the cluster has not converged after this many seconds.
    #[arg(long, value_name = "S", default_value_t = 60)]
    converge_timeout_s: u64,
    /// Always use network namespaces on a bridge (fails when not root).
    #[arg(long, conflicts_with = "loopback")]
    netns: bool,
    /// Loopback, even as root.
    #[arg(long)]
    loopback: bool,
}

#[derive(Debug, Args)]
struct BenchAllocArgs {
    /// Wall time spent measuring, in seconds.
    #[arg(long, value_name = "S", default_value_t = 2.0)]
    seconds: f64,
}

#[derive(Debug, Args)]
struct BenchEngineArgs {
    /// Wall time spent measuring each engine, in seconds.
    #[arg(long, value_name = "S", default_value_t = 2.0)]
    seconds: f64,
}

/// Where traffic goes and how PTP runs; shared by every role.
#[derive(Debug, Args, Clone)]
struct NetArgs {
    /// Use the real network (mDNS, PTP and QUIC on a LAN interface) instead of loopback only.
    #[arg(long)]
    lan: bool,
    /// With --lan: the IPv4 address of the interface to use (default: the first interface that
    /// is up, multicast-capable and not loopback).
    #[arg(long, value_name = "ADDR", requires = "lan")]
    interface: Option<Ipv4Addr>,
    /// PTP event port (Sync, Delay_Req). Standard PTP equipment uses 319.
    #[arg(long, value_name = "PORT", default_value_t = discovery::DEFAULT_PTP_EVENT_PORT)]
    ptp_event_port: u16,
    /// PTP general port (Announce, Follow_Up, Delay_Resp). Standard PTP equipment uses 320.
    #[arg(long, value_name = "PORT", default_value_t = discovery::DEFAULT_PTP_GENERAL_PORT)]
    ptp_general_port: u16,
    /// PTP domain number.
    #[arg(long, value_name = "N", default_value_t = 0)]
    ptp_domain: u8,
}

/// Loopback, or the LAN interface `interface` (default: the first usable one) with `--lan`.
fn scope_of(lan: bool, interface: Option<Ipv4Addr>) -> Result<NetScope> {
    if !lan {
        return Ok(NetScope::Loopback);
    }
    match interface {
        Some(a) => Ok(NetScope::Lan(a)),
        None => NetScope::first_lan().context("--lan"),
    }
}

impl NetArgs {
    fn scope(&self) -> Result<NetScope> {
        scope_of(self.lan, self.interface)
    }

    fn ptp(&self, scope: NetScope) -> PtpConfig {
        PtpConfig {
            event_port: self.ptp_event_port,
            general_port: self.ptp_general_port,
            domain: self.ptp_domain,
            scope,
        }
    }
}

#[derive(Debug, Args)]
struct CoordinatorArgs {
    /// Directory for the access token, configuration and journal
    /// (default: $XDG_DATA_HOME/voicemesh, else ~/.local/share/voicemesh).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Address of the dashboard and HTTP API.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7400")]
    http: SocketAddr,
    /// Address of the OSC server (UDP).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9000")]
    osc: SocketAddr,
    /// TCP port of OSC over TCP (SLIP or length-prefixed), on the --osc address (default: the
    /// same port as UDP; 0 = any free port).
    #[arg(long, value_name = "PORT")]
    osc_tcp_port: Option<u16>,
    /// HTTP port of the OSCQuery server, on the --osc address (0 = any free port).
    #[arg(long, value_name = "PORT", default_value_t = 9001)]
    oscquery_port: u16,
    /// Do not run the OSCQuery server.
    #[arg(long)]
    no_oscquery: bool,
    /// How far ahead of now each event is scheduled, in milliseconds (0 = as soon as possible).
    #[arg(long, value_name = "MS", default_value_t = 5)]
    lookahead_ms: u64,
    /// Access token for the HTTP API (default: the one stored in the state directory, created
    /// on first start).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Instance id of this coordinator.
    #[arg(long, value_name = "ID", default_value = "coordinator")]
    id: String,
    /// Take part in Ableton Link sessions (the default; on 127.0.0.1 only, or on every interface
    /// with --lan).
    #[arg(long, overrides_with = "no_link")]
    link: bool,
    /// Do not take part in Ableton Link.
    #[arg(long, overrides_with = "link")]
    no_link: bool,
    #[command(flatten)]
    rtpmidi: RtpMidiArgs,
    #[command(flatten)]
    net: NetArgs,
}

#[derive(Debug, Args)]
struct RtpMidiArgs {
    /// RTP-MIDI (AppleMIDI) control port; the data port is the one above (0 = RTP-MIDI off).
    #[arg(long, value_name = "PORT", default_value_t = voicemesh_coordinator::rtpmidi::DEFAULT_PORT)]
    rtpmidi_port: u16,
    /// RTP-MIDI session name shown to peers (and advertised over mDNS).
    #[arg(long, value_name = "NAME", default_value = "VoiceMesh")]
    rtpmidi_name: String,
    /// Invite this RTP-MIDI session and keep it: `ip:port`, `ip` (port 5004) or an mDNS
    /// session name (repeatable).
    #[arg(long, value_name = "TARGET")]
    rtpmidi_invite: Vec<String>,
    /// Drop an RTP-MIDI session silent this long, in seconds (its held notes are released).
    #[arg(long, value_name = "S", default_value_t = 60.0)]
    rtpmidi_timeout: f64,
    /// Take MIDI from a JACK MIDI input port (`voicemesh:midi_in`; the server is
    /// $JACK_DEFAULT_SERVER or `default`).
    #[arg(long)]
    jack_midi: bool,
    /// Connect this JACK MIDI output port (full name, e.g. `a2j:Keystation [20] (capture):
    /// Keystation MIDI 1`) to the input at start (repeatable; implies --jack-midi).
    #[arg(long, value_name = "PORT")]
    jack_midi_connect: Vec<String>,
}

impl RtpMidiArgs {
    fn config(
        &self,
        scope: NetScope,
    ) -> Result<Option<voicemesh_coordinator::rtpmidi::RtpMidiConfig>> {
        if self.rtpmidi_port == 0 {
            return Ok(None);
        }
        if !(self.rtpmidi_timeout.is_finite() && self.rtpmidi_timeout >= 1.0) {
            bail!("--rtpmidi-timeout must be at least 1 second");
        }
        for t in &self.rtpmidi_invite {
            voicemesh_coordinator::rtpmidi::Target::parse(t)
                .map_err(|e| anyhow::anyhow!("--rtpmidi-invite: {e}"))?;
        }
        Ok(Some(voicemesh_coordinator::rtpmidi::RtpMidiConfig {
            control: SocketAddr::new(scope.bind_ip(), self.rtpmidi_port),
            name: self.rtpmidi_name.clone(),
            invite: self.rtpmidi_invite.clone(),
            silence_timeout: Duration::from_secs_f64(self.rtpmidi_timeout),
        }))
    }
}

#[derive(Debug, Args)]
struct NodeArgs {
    /// Human-readable name of this node (default: the host name).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Stable id of this node, unique in the cluster (default: the name).
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// Number of synth voices.
    #[arg(long, value_name = "N", default_value_t = 8)]
    voices: u16,
    /// Audio output: `jack`, `alsa` or `alsa:DEVICE` (an ALSA PCM such as `hw:0,0`, or `null`
    /// as a sink), `wav:DIR` (one WAV file per node recorded in real time, paced by the cluster
    /// clock, for headless machines), `null` (paced by a timer, output discarded) or `auto`
    /// (JACK if a server runs, else WAV files under ./voicemesh-audio; also when JACK is not
    /// installed).
    #[arg(long, value_name = "SPEC", default_value = "auto")]
    audio: AudioSpec,
    /// Sample rate for the alsa, wav and null outputs (JACK uses the server's).
    #[arg(long, value_name = "HZ", default_value_t = 48_000)]
    sample_rate: u32,
    /// UDP port of the QUIC control session (0 = any free port; it is advertised over mDNS).
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    port: u16,
    /// Test only: start the node's cluster clock this many milliseconds off (before PTP
    /// disciplines it), to show PTP pulling it in.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 0.0,
        allow_negative_numbers = true,
        help_heading = "Testing"
    )]
    test_clock_offset_ms: f64,
    /// Test only: start the node's cluster clock running this many ppm fast (negative: slow).
    #[arg(
        long,
        value_name = "PPM",
        default_value_t = 0.0,
        allow_negative_numbers = true,
        help_heading = "Testing"
    )]
    test_clock_rate_ppm: f64,
    #[command(flatten)]
    net: NetArgs,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, value_name = "N")]
    seconds: Option<f64>,
    /// Audio output of both nodes: `auto`, `jack`, `alsa[:DEVICE]`, `wav:DIR` or `null` (see
    /// `voicemesh node`).
    /// `auto` uses JACK when a server runs, else WAV files under ./voicemesh-demo-audio.
    #[arg(long, value_name = "SPEC", default_value = "auto")]
    audio: AudioSpec,
    /// Address of the dashboard and HTTP API.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7400")]
    http: SocketAddr,
    /// Address of the OSC server (UDP).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9000")]
    osc: SocketAddr,
    /// State directory of the demo's coordinator (default: a fresh temporary directory).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Join Ableton Link sessions (on by itself with --lan; off otherwise, since Link
    /// multicasts).
    #[arg(long)]
    link: bool,
    #[command(flatten)]
    net: NetArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The demo speaks for itself on stdout; the daemons log what they do. RUST_LOG overrides.
    let default_filter = match cli.command {
        Command::Demo(_) => "warn",
        _ => "warn,voicemesh=info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Coordinator(a) => run_coordinator(a).await,
            Command::Node(a) => run_node(a).await,
            Command::Demo(a) => demo::run(a).await,
            Command::McuSim(a) => mcu_sim::run(a).await,
            Command::Bench(BenchCommand::Engine(a)) => {
                tokio::task::spawn_blocking(move || bench_engine(a))
                    .await
                    .context("the benchmark thread")?
            }
            Command::Bench(BenchCommand::Sync(a)) => {
                let b = bench_sync::SyncBench {
                    chords: a.chords,
                    interval: Duration::from_millis(a.interval_ms),
                    offset_ms: a.offset_ms,
                    rate_ppm: a.rate_ppm,
                    lookahead_ms: a.lookahead_ms,
                    converge_timeout: Duration::from_secs(a.converge_timeout_s),
                    netns: if a.netns {
                        Some(true)
                    } else if a.loopback {
                        Some(false)
                    } else {
                        None
                    },
                };
                tokio::task::spawn_blocking(move || bench_sync::run(&b).map(|_| ()))
                    .await
                    .context("the benchmark thread")?
            }
            Command::Bench(BenchCommand::Input(a)) => bench_input::run(a).await,
            Command::Bench(BenchCommand::Alloc(a)) => {
                tokio::task::spawn_blocking(move || bench_alloc(a))
                    .await
                    .context("the benchmark thread")?
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `voicemesh bench engine`: measures each engine on this thread and prints a table, then the
/// one machine-readable line.
fn bench_engine(a: BenchEngineArgs) -> Result<()> {
    use voicemesh_node::engine::bench;
    if !(a.seconds.is_finite() && a.seconds > 0.0 && a.seconds <= 600.0) {
        bail!(
            "--seconds {} must be a number of seconds above 0 and at most 600",
            a.seconds
        );
    }
    println!(
        "voices rendered in real time by one core ({} Hz, {}-frame blocks, {} voices at once, {} s each):",
        bench::SAMPLE_RATE,
        bench::BLOCK,
        bench::VOICES,
        a.seconds
    );
    println!("{:<28} {:>14}", "engine", "voices/core");
    let mut per_core = Vec::new();
    for engine in ["subtractive", "fm2"] {
        let v = bench::measure(engine, a.seconds)
            .with_context(|| format!("measuring engine {engine}"))?;
        println!("{engine:<28} {:>14.0}", v.floor());
        per_core.push(v.floor() as u64);
    }
    let naive = bench::measure_naive(a.seconds);
    println!(
        "{:<28} {:>14.0}   (naive scalar voice, for comparison: subtractive is {:.1}x)",
        "naive",
        naive.floor(),
        per_core[0] as f64 / naive.max(1.0)
    );
    println!(
        "reference_voices_per_core={} fm_voices_per_core={}",
        per_core[0], per_core[1]
    );
    Ok(())
}

/// `voicemesh bench alloc`: measures the allocator core on this thread and ends with the one
/// machine-readable line.
fn bench_alloc(a: BenchAllocArgs) -> Result<()> {
    use voicemesh_coordinator::allocator::bench;
    if !(a.seconds.is_finite() && a.seconds > 0.0 && a.seconds <= 600.0) {
        bail!(
            "--seconds {} must be a number of seconds above 0 and at most 600",
            a.seconds
        );
    }
    println!(
        "voice allocator core, {} nodes x {} voices, note-on + note-off pairs for {} s:",
        bench::NODES,
        bench::VOICES,
        a.seconds
    );
    let (steals, steal_p99) = bench::measure_steal(a.seconds / 4.0);
    println!(
        "stealing (cluster full, oldest): note_ons_per_s={:.0} p99_op_us={steal_p99:.3}",
        steals.floor()
    );
    let (pairs, p99) = bench::measure(a.seconds);
    println!("pairs_per_s={:.0} p99_op_us={p99:.3}", pairs.floor());
    Ok(())
}

/// Cancels `token` on Ctrl-C (SIGINT) or SIGTERM.
fn cancel_on_signals(token: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = token.cancelled() => return,
        }
        eprintln!("stopping…");
        token.cancel();
    });
    Ok(())
}

fn default_state_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("voicemesh"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/share/voicemesh")),
        None => bail!("no state directory: set --state-dir, XDG_DATA_HOME or HOME"),
    }
}

/// Starts the grandmaster clock, its PTP instance and the coordinator.
async fn start_coordinator(
    cfg: CoordinatorConfig,
    ptp_cfg: PtpConfig,
    shutdown: &CancellationToken,
) -> Result<(RunningCoordinator, tokio::task::JoinHandle<()>)> {
    let clock = Arc::new(ClusterClock::new());
    let coordinator = voicemesh_coordinator::start(cfg, clock.clone(), shutdown.clone())
        .await
        .context("starting the coordinator")?;
    let ptp_shutdown = shutdown.clone();
    let ptp_task = tokio::spawn(async move {
        if let Err(e) = ptp::run_grandmaster(ptp_cfg, clock, ptp_shutdown.clone()).await {
            tracing::error!("PTP grandmaster stopped: {e}");
            eprintln!("error: PTP grandmaster: {e}; nodes will free-run");
        }
    });
    Ok((coordinator, ptp_task))
}

/// The coordinator's configuration: its defaults, with what the command line sets.
fn coordinator_config(
    id: String,
    state_dir: PathBuf,
    http: SocketAddr,
    osc: SocketAddr,
    lookahead_ms: u64,
    token: Option<String>,
    scope: NetScope,
) -> CoordinatorConfig {
    CoordinatorConfig {
        id,
        http,
        osc,
        lookahead: Duration::from_millis(lookahead_ms),
        scope,
        token,
        ..CoordinatorConfig::new(state_dir)
    }
}

async fn run_coordinator(a: CoordinatorArgs) -> Result<()> {
    let scope = a.net.scope()?;
    let state_dir = match a.state_dir {
        Some(d) => d,
        None => default_state_dir()?,
    };
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone())?;
    let mut cfg = coordinator_config(
        a.id,
        state_dir,
        a.http,
        a.osc,
        a.lookahead_ms,
        a.token,
        scope,
    );
    cfg.link = !a.no_link;
    cfg.rtpmidi = a.rtpmidi.config(scope)?;
    cfg.jack_midi = (a.rtpmidi.jack_midi || !a.rtpmidi.jack_midi_connect.is_empty()).then(|| {
        voicemesh_coordinator::jack_midi::JackMidiConfig {
            connect: a.rtpmidi.jack_midi_connect.clone(),
            ..Default::default()
        }
    });
    cfg.osc_tcp_port = a.osc_tcp_port;
    cfg.oscquery_port = (!a.no_oscquery).then_some(a.oscquery_port);
    let (coordinator, ptp_task) = start_coordinator(cfg, a.net.ptp(scope), &shutdown).await?;
    println!("coordinator running ({})", scope_text(scope));
    println!("dashboard: {}", coordinator.dashboard_url());
    println!("osc: udp://{}", coordinator.osc_addr());
    if let Some(r) = coordinator.rtpmidi() {
        println!(
            "rtpmidi: udp://{} (control; data port +1)",
            r.control_addr()
        );
    }
    if let Some(p) = coordinator.jack_midi_port() {
        println!("jack-midi: {p}");
    }
    println!("osc: tcp://{}", coordinator.osc_tcp_addr());
    if let Some(a) = coordinator.oscquery_addr() {
        println!("oscquery: http://{a}/");
    }
    let result = coordinator.wait().await;
    shutdown.cancel();
    let _ = ptp_task.await;
    result.context("coordinator")?;
    Ok(())
}

fn scope_text(scope: NetScope) -> String {
    match scope {
        NetScope::Loopback => "loopback only".into(),
        NetScope::Lan(a) => format!("LAN interface {a}"),
    }
}

/// A node's configuration: its defaults, with the network settings of the command line.
fn node_config(id: &str, name: &str, net: &NetArgs, scope: NetScope) -> NodeConfig {
    NodeConfig {
        name: name.to_string(),
        scope,
        ptp: net.ptp(scope),
        ..NodeConfig::new(id)
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}

async fn run_node(a: NodeArgs) -> Result<()> {
    let scope = a.net.scope()?;
    let name = a.name.unwrap_or_else(host_name);
    let id = a.id.unwrap_or_else(|| name.clone());
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone())?;
    if !a.test_clock_offset_ms.is_finite() || a.test_clock_offset_ms.abs() > 3_600_000.0 {
        bail!(
            "--test-clock-offset-ms {} (must be within ±3600000)",
            a.test_clock_offset_ms
        );
    }
    let cfg = NodeConfig {
        voices: a.voices,
        audio: a.audio,
        sample_rate: a.sample_rate,
        quic_port: a.port,
        test_clock_offset_ns: (a.test_clock_offset_ms * 1e6).round() as i64,
        test_clock_rate_ppm: a.test_clock_rate_ppm,
        ..node_config(&id, &name, &a.net, scope)
    };
    let node = voicemesh_node::start(cfg, shutdown.clone())
        .await
        .with_context(|| format!("starting node {name}"))?;
    print_node(&name, &node, scope);
    if a.test_clock_offset_ms != 0.0 || a.test_clock_rate_ppm != 0.0 {
        println!(
            "node {name}: test clock error: started {} ms off, {} ppm fast",
            a.test_clock_offset_ms, a.test_clock_rate_ppm
        );
    }
    // One plain line: what real-time treatment the audio got and how to get more.
    println!("node {name}: {}", node.realtime());
    node.wait().await.with_context(|| format!("node {name}"))?;
    Ok(())
}

fn print_node(name: &str, node: &RunningNode, scope: NetScope) {
    println!(
        "node {name}: control session on quic://{} ({}), audio: {}",
        node.quic_addr(),
        scope_text(scope),
        node.audio_description()
    );
}
