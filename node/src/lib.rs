//! The VoiceMesh Linux node: a real-time synth engine, its audio backend, the cluster clock
//! and the control session with the coordinator.
//!
//! [`start`] brings a node up and returns a [`RunningNode`]: it opens the audio backend (JACK,
//! a WAV recorder or a null sink, see [`audio`]) around the [`engine`], starts the PTP slave
//! that disciplines the node's [`clock::ClusterClock`], binds the QUIC control port
//! ([`session`]) and advertises the node over mDNS ([`mdns`]). Everything runs until the
//! shutdown token is cancelled; [`RunningNode::wait`] then resolves once every task has ended,
//! the mDNS record is withdrawn and any WAV output is finalized.
#![deny(missing_docs)]

pub mod audio;
pub mod clock;
pub mod engine;
pub mod error;
pub mod mdns;
pub mod net;
pub mod rt;
pub mod session;

pub use audio::{AudioSpec, ParseAudioSpecError};
pub use error::NodeError;
pub use net::NetScope;

use clock::ClusterClock;
use clock::ptp::{PtpConfig, PtpStatus};
use engine::EngineCounters;
use session::SessionShared;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Default voice pool size.
pub const DEFAULT_VOICES: u16 = 8;
/// Largest voice pool a node accepts.
pub const MAX_VOICES: u16 = 256;
/// Default sample rate of the paced backends.
pub const DEFAULT_SAMPLE_RATE: u32 = 48_000;
/// The synth engines this node runs (announced in `Hello` and the mDNS TXT record).
pub const ENGINES: [&str; engine::ENGINE_COUNT] = engine::ENGINE_NAMES;

/// Whether a JACK server answers (the default one, or `$JACK_DEFAULT_SERVER`): opens and
/// closes a client through the run-time loaded libjack. Never starts a server; `false` when
/// JACK is not installed.
pub fn jack_server_running() -> bool {
    audio::jack::server_running()
}

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Stable id (mDNS instance name, file names, JACK client name).
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Voice pool size (default [`DEFAULT_VOICES`]).
    pub voices: u16,
    /// Audio backend.
    pub audio: AudioSpec,
    /// Where the node's traffic may go.
    pub scope: NetScope,
    /// QUIC control port; 0 = any free port.
    pub quic_port: u16,
    /// Sample rate of the WAV and null backends (JACK uses the server's).
    pub sample_rate: u32,
    /// PTP slave settings.
    pub ptp: PtpConfig,
    /// Test only: start the cluster clock this many ns ahead of the local guess (see
    /// [`ClusterClock::with_error`]); 0 in normal use.
    pub test_clock_offset_ns: i64,
    /// Test only: start the cluster clock this many ppm fast; 0 in normal use.
    pub test_clock_rate_ppm: f64,
}

impl NodeConfig {
    /// A loopback node `id` with defaults: 8 voices, `auto` audio, any QUIC port, 48 kHz.
    pub fn new(id: &str) -> Self {
        NodeConfig {
            id: id.to_string(),
            name: id.to_string(),
            voices: DEFAULT_VOICES,
            audio: AudioSpec::Auto,
            scope: NetScope::Loopback,
            quic_port: 0,
            sample_rate: DEFAULT_SAMPLE_RATE,
            ptp: PtpConfig::default(),
            test_clock_offset_ns: 0,
            test_clock_rate_ppm: 0.0,
        }
    }

    fn validate(&self) -> Result<(), NodeError> {
        let bad = |s: String| Err(NodeError::Config(s));
        if self.id.is_empty() || self.id.len() > 32 {
            return bad(format!("node id {:?} must be 1–32 bytes", self.id));
        }
        if !self
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return bad(format!(
                "node id {:?} may only contain ASCII letters, digits, '-', '_' and '.'",
                self.id
            ));
        }
        if self.name.len() > 32 {
            return bad(format!("node name {:?} is longer than 32 bytes", self.name));
        }
        if self.voices == 0 || self.voices > MAX_VOICES {
            return bad(format!("voices = {} (must be 1–{MAX_VOICES})", self.voices));
        }
        if !self.test_clock_rate_ppm.is_finite() || self.test_clock_rate_ppm.abs() > 1_000.0 {
            return bad(format!(
                "test clock rate error {} ppm (must be within ±1000)",
                self.test_clock_rate_ppm
            ));
        }
        if !(8_000..=384_000).contains(&self.sample_rate) {
            return bad(format!(
                "sample rate {} Hz (must be 8000–384000)",
                self.sample_rate
            ));
        }
        Ok(())
    }
}

/// A running node. Dropping it does not stop it: cancel the shutdown token, then
/// [`RunningNode::wait`].
#[derive(Debug)]
pub struct RunningNode {
    quic_addr: SocketAddr,
    audio_description: String,
    realtime: rt::RtReport,
    sample_rate: u32,
    clock: Arc<ClusterClock>,
    ptp: Arc<PtpStatus>,
    counters: Arc<EngineCounters>,
    shared: Arc<SessionShared>,
    tasks: Vec<(&'static str, JoinHandle<Result<(), NodeError>>)>,
}

impl RunningNode {
    /// The address the QUIC control server listens on.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// Where the sound goes, e.g. `JACK client voicemesh-a -> system:playback_1` or
    /// `WAV file /x/a.wav`.
    pub fn audio_description(&self) -> String {
        self.audio_description.clone()
    }

    /// What real-time treatment the audio thread and the process got, with how to get more;
    /// `to_string()` is the one line the CLI prints at start.
    pub fn realtime(&self) -> &rt::RtReport {
        &self.realtime
    }

    /// The audio sample rate in use.
    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// The node's cluster clock.
    pub fn clock(&self) -> Arc<ClusterClock> {
        self.clock.clone()
    }

    /// The PTP slave's report.
    pub fn ptp_status(&self) -> Arc<PtpStatus> {
        self.ptp.clone()
    }

    /// The engine's counters (active voices, late events, lease expiries, xruns, load).
    pub fn counters(&self) -> Arc<EngineCounters> {
        self.counters.clone()
    }

    /// `CvSet` messages refused because this node has no CV outputs.
    pub fn cv_rejected(&self) -> u32 {
        self.shared
            .cv_rejected
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Frames from the coordinator that failed to decode.
    pub fn bad_frames(&self) -> u32 {
        self.shared
            .bad_frames
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Resolves when every task of the node has ended (after the shutdown token was
    /// cancelled, or a task failed); returns the first error.
    pub async fn wait(self) -> Result<(), NodeError> {
        let mut first: Option<NodeError> = None;
        for (name, task) in self.tasks {
            let r = match task.await {
                Ok(r) => r,
                Err(e) => Err(NodeError::Task {
                    task: name,
                    detail: e.to_string(),
                }),
            };
            if let Err(e) = r {
                tracing::error!("node task {name} failed: {e}");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Starts a node: audio backend and engine, PTP slave, QUIC control server, mDNS
/// advertisement. Runs until `shutdown` is cancelled.
pub async fn start(cfg: NodeConfig, shutdown: CancellationToken) -> Result<RunningNode, NodeError> {
    cfg.validate()?;
    let clock = Arc::new(ClusterClock::with_error(
        cfg.test_clock_offset_ns,
        cfg.test_clock_rate_ppm,
    ));
    let ptp = Arc::new(PtpStatus::default());
    let counters = Arc::new(EngineCounters::default());

    // QUIC first: a port in use fails before anything else has started.
    let server_cfg = session::server_config(&cfg.id)?;
    let addr = SocketAddr::new(cfg.scope.bind_ip(), cfg.quic_port);
    let endpoint = quinn::Endpoint::server(server_cfg, addr)
        .map_err(|source| NodeError::QuicBind { addr, source })?;
    let quic_addr = endpoint
        .local_addr()
        .map_err(|source| NodeError::QuicBind { addr, source })?;

    // The audio backend runs on its own token so it can be stopped if a later step fails.
    let audio_stop = shutdown.child_token();
    let audio = audio::start(
        &cfg.audio,
        audio::AudioParams {
            id: cfg.id.clone(),
            name: cfg.name.clone(),
            voices: cfg.voices,
            sample_rate: cfg.sample_rate,
            clock: clock.clone(),
            counters: counters.clone(),
        },
        audio_stop.clone(),
    )?;
    let txt = mdns::NodeTxt {
        id: cfg.id.clone(),
        voices: cfg.voices,
        cv: 0,
        engines: ENGINES.iter().map(|s| s.to_string()).collect(),
        port: quic_addr.port(),
    };
    let advert = match mdns::advertise(cfg.scope, vec![txt.instance()], shutdown.child_token()) {
        Ok(a) => a,
        Err(e) => {
            audio_stop.cancel();
            let _ = audio.task.await;
            endpoint.close(quinn::VarInt::from_u32(0), b"start failed");
            return Err(NodeError::Mdns(e.to_string()));
        }
    };

    let shared = Arc::new(SessionShared {
        id: cfg.id.clone(),
        name: cfg.name.clone(),
        voices: cfg.voices,
        engines: txt.engines.clone(),
        sample_rate: audio.sample_rate,
        clock: clock.clone(),
        ptp: ptp.clone(),
        counters: counters.clone(),
        sender: Mutex::new(audio.sender),
        onsets: Mutex::new(audio.onsets),
        cv_rejected: AtomicU32::new(0),
        bad_frames: AtomicU32::new(0),
    });

    let mut tasks: Vec<(&'static str, JoinHandle<Result<(), NodeError>>)> = Vec::new();
    tasks.push(("audio", audio.task));
    {
        let (c, s, t) = (clock.clone(), ptp.clone(), shutdown.clone());
        let ptp_cfg = cfg.ptp;
        tasks.push((
            "ptp",
            tokio::spawn(async move {
                clock::ptp::run_slave(ptp_cfg, c, s, t)
                    .await
                    .map_err(NodeError::from)
            }),
        ));
    }
    tasks.push((
        "session",
        tokio::spawn(session::serve(endpoint, shared.clone(), shutdown.clone())),
    ));
    {
        let t = shutdown.clone();
        tasks.push((
            "mdns",
            tokio::spawn(async move {
                t.cancelled().await;
                advert.stop().await;
                Ok(())
            }),
        ));
    }
    tracing::info!(
        "node {} up: QUIC {quic_addr}, audio: {}, {} voices",
        cfg.id,
        audio.description,
        cfg.voices
    );
    Ok(RunningNode {
        quic_addr,
        audio_description: audio.description,
        realtime: audio.realtime,
        sample_rate: audio.sample_rate,
        clock,
        ptp,
        counters,
        shared,
        tasks,
    })
}
