//! The VoiceMesh coordinator: finds nodes, hands out voices, takes notes from OSC and serves
//! the HTTP API and dashboard.
//!
//! The decisions live in a sans-IO core, the [`allocator::VoiceAllocator`], which takes `now`
//! as a value and returns the messages to send. Around it the tokio glue runs a handful of
//! tasks that share one small lock-protected state: mDNS browsing ([`discovery`]), one QUIC
//! control session per node ([`session`]), the OSC socket ([`osc`] parses), the lease-renewal
//! timer, and the axum server. [`start`] binds every socket first, so a port in use or an
//! unwritable state directory is reported before anything runs; [`RunningCoordinator::wait`]
//! returns once the shutdown token is cancelled and every task has finished.
//!
//! Time: events are stamped in cluster time from the [`ClusterClock`] the caller passes in (on
//! the coordinator it is the grandmaster's clock; the CLI runs PTP beside it).
#![deny(missing_docs)]

pub mod advertise;
pub mod allocator;
pub mod config;
pub mod cv;
pub mod discovery;
mod http;
pub mod jack_midi;
pub mod link;
pub mod mcu;
pub mod onsets;
pub mod osc;
mod oscquery;
pub mod rtpmidi;
pub mod session;
mod state;
pub mod tempo;
pub mod token;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use voicemesh_node::NetScope;
use voicemesh_node::clock::ClusterClock;
use voicemesh_protocol::Timeline;

pub use http::INDEX_HTML;
pub use state::{
    ClusterSnapshot, CoordinatorInfo, LatencySnapshot, LatencySummary, NodeSnapshot, OscSnapshot,
    VoiceCounters,
};

use allocator::{AllocatorConfig, VoiceAllocator};
use state::{Inner, Shared};

/// Tempo of the timeline until Ableton Link drives it, in milli-BPM.
pub const DEFAULT_MILLI_BPM: u32 = 120_000;

/// How the coordinator runs.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Id of this coordinator instance (sent in `Welcome`, shown in the API).
    pub id: String,
    /// State directory (holds the token file).
    pub state_dir: PathBuf,
    /// HTTP API and dashboard address (default 127.0.0.1:7400).
    pub http: SocketAddr,
    /// OSC UDP address (default 127.0.0.1:9000).
    pub osc: SocketAddr,
    /// OSC TCP port (SLIP or length-prefixed framing) on the OSC address's IP; `None` = the
    /// port the UDP socket got.
    pub osc_tcp_port: Option<u16>,
    /// OSCQuery HTTP port on the OSC address's IP (0 = any free port); `None` = no OSCQuery.
    pub oscquery_port: Option<u16>,
    /// Added to the current cluster time on every event (default 5 ms; 0 = as soon as possible).
    pub lookahead: Duration,
    /// Heartbeat interval of the control sessions (default 100 ms).
    pub heartbeat: Duration,
    /// A node silent this long is marked offline (default 250 ms).
    pub offline_after: Duration,
    /// Voice lease length (default 1 s); held voices are renewed every quarter of it.
    pub lease: Duration,
    /// Where mDNS and the node sessions may go.
    pub scope: NetScope,
    /// Access token for the HTTP API; `None` loads or creates `state_dir/token`.
    pub token: Option<String>,
    /// Take part in Ableton Link sessions from the start (off by default in the library, on
    /// in `voicemesh coordinator`); it can be switched at run time (docs/link.md).
    pub link: bool,
    /// RTP-MIDI endpoint (control port; data port +1); `None` (the library default) = off;
    /// `voicemesh coordinator` turns it on at port 5004.
    pub rtpmidi: Option<rtpmidi::RtpMidiConfig>,
    /// JACK MIDI input port; `None` = off.
    pub jack_midi: Option<jack_midi::JackMidiConfig>,
    /// Publish the coordinator's services over mDNS in `scope` (see [`advertise`]).
    pub advertise: bool,
}

impl CoordinatorConfig {
    /// The defaults, loopback scope, with `state_dir`.
    pub fn new(state_dir: PathBuf) -> Self {
        CoordinatorConfig {
            id: "coordinator".into(),
            state_dir,
            http: SocketAddr::from((
                [127, 0, 0, 1],
                voicemesh_protocol::discovery::DEFAULT_HTTP_PORT,
            )),
            osc: SocketAddr::from((
                [127, 0, 0, 1],
                voicemesh_protocol::discovery::DEFAULT_OSC_PORT,
            )),
            osc_tcp_port: None,
            oscquery_port: Some(0),
            lookahead: Duration::from_millis(5),
            heartbeat: Duration::from_millis(100),
            offline_after: Duration::from_millis(250),
            lease: Duration::from_secs(1),
            scope: NetScope::Loopback,
            token: None,
            link: false,
            rtpmidi: None,
            jack_midi: None,
            advertise: true,
        }
    }
}

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The HTTP address is taken.
    #[error(
        "HTTP port {0} is already in use (another coordinator running? choose another with --http)"
    )]
    HttpPortInUse(SocketAddr),
    /// The OSC address is taken.
    #[error("OSC port {0} is already in use (choose another with --osc)")]
    OscPortInUse(SocketAddr),
    /// The RTP-MIDI control or data port is taken.
    #[error(
        "RTP-MIDI port {0} or the one above it is already in use (choose another with --rtpmidi-port, 0 = off)"
    )]
    RtpMidiPortInUse(SocketAddr),
    /// The JACK MIDI input could not be opened.
    #[error("JACK MIDI input: {0}")]
    JackMidi(String),
    /// Another bind failure.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The state directory cannot be created or written.
    #[error("state directory {path} not writable: {source}")]
    StateDirNotWritable {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The token file exists but holds no valid token.
    #[error(
        "corrupt token file {path}: expected 16–128 characters of A–Z, a–z, 0–9, '_' or '-'; fix or delete it"
    )]
    CorruptToken {
        /// The token file.
        path: PathBuf,
    },
    /// The token given in the configuration is not acceptable.
    #[error("the token given is not valid: use 16–128 characters of A–Z, a–z, 0–9, '_' or '-'")]
    BadToken,
    /// A duration in the configuration is unusable.
    #[error("invalid configuration: {0}")]
    BadConfig(String),
    /// The QUIC client endpoint could not be created.
    #[error("cannot create the QUIC endpoint: {0}")]
    Quic(String),
    /// mDNS could not be started.
    #[error("cannot start mDNS: {0}")]
    Mdns(String),
    /// `state_dir/config.json` is corrupt, of another schema version or unreadable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
}

/// Why the coordinator stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// A started coordinator.
#[derive(Debug)]
pub struct RunningCoordinator {
    shared: Arc<Shared>,
    http_addr: SocketAddr,
    osc_addr: SocketAddr,
    osc_tcp_addr: SocketAddr,
    oscquery_addr: Option<SocketAddr>,
    token: Arc<str>,
    tracker: TaskTracker,
    connectors: discovery::Connectors,
    advertisement: Option<voicemesh_node::mdns::Advertisement>,
    error: Arc<Mutex<Option<RunError>>>,
    jack_midi_port: Option<String>,
}

impl RunningCoordinator {
    /// Where the HTTP API listens (with the real port if 0 was asked for).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where OSC is received (with the real port if 0 was asked for).
    pub fn osc_addr(&self) -> SocketAddr {
        self.osc_addr
    }

    /// The RTP-MIDI endpoint, when enabled (its control port, invitations, sessions).
    pub fn rtpmidi(&self) -> Option<&std::sync::Arc<rtpmidi::Handle>> {
        self.shared.rtpmidi.get()
    }

    /// The JACK MIDI input port's full name, when enabled.
    pub fn jack_midi_port(&self) -> Option<&str> {
        self.jack_midi_port.as_deref()
    }

    /// Where OSC over TCP is accepted.
    pub fn osc_tcp_addr(&self) -> SocketAddr {
        self.osc_tcp_addr
    }

    /// Where the OSCQuery server listens, if it runs.
    pub fn oscquery_addr(&self) -> Option<SocketAddr> {
        self.oscquery_addr
    }

    /// The API access token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The dashboard's URL, token included.
    pub fn dashboard_url(&self) -> String {
        format!("http://{}/?token={}", self.http_addr, self.token)
    }

    /// The same data `/api/cluster` serves.
    pub fn snapshot(&self) -> ClusterSnapshot {
        self.shared.snapshot()
    }

    /// Changes the cluster's tempo and transport (see [`tempo`]).
    pub fn tempo(&self) -> tempo::TempoHandle {
        tempo::TempoHandle::new(self.shared.clone())
    }

    /// Keeps a control session with a node at `addr` without mDNS (tests, static setups).
    pub fn add_node_addr(&self, addr: SocketAddr) {
        self.connectors.add(addr);
    }

    /// Keeps a UDP link with an MCU node at `addr` without mDNS (tests, static setups).
    pub fn add_mcu_addr(&self, addr: SocketAddr) {
        self.connectors.add_mcu(addr);
    }

    /// The full DNS-SD names of the services published over mDNS (empty when not advertising).
    pub fn advertised(&self) -> &[String] {
        self.advertisement.as_ref().map_or(&[], |a| a.fullnames())
    }

    /// Waits until the shutdown token is cancelled and every task has finished.
    pub async fn wait(self) -> Result<(), RunError> {
        self.tracker.close();
        self.tracker.wait().await;
        if let Some(a) = self.advertisement {
            // The tasks end on shutdown; this sends the mDNS goodbye and waits until it is out.
            a.stop().await;
        }
        self.connectors.endpoint.wait_idle().await;
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn bind_error(e: std::io::Error, what: &'static str, addr: SocketAddr) -> StartError {
    if e.kind() == std::io::ErrorKind::AddrInUse && what == "HTTP" {
        StartError::HttpPortInUse(addr)
    } else if e.kind() == std::io::ErrorKind::AddrInUse && what == "OSC" {
        StartError::OscPortInUse(addr)
    } else {
        StartError::Bind {
            what,
            addr,
            source: e,
        }
    }
}

/// Binds every socket, then starts discovery, sessions, OSC, lease renewal and HTTP.
pub async fn start(
    cfg: CoordinatorConfig,
    clock: Arc<ClusterClock>,
    shutdown: CancellationToken,
) -> Result<RunningCoordinator, StartError> {
    for (name, d) in [
        ("heartbeat", cfg.heartbeat),
        ("offline_after", cfg.offline_after),
        ("lease", cfg.lease),
    ] {
        if d.is_zero() {
            return Err(StartError::BadConfig(format!(
                "{name} must be longer than 0"
            )));
        }
    }
    if cfg.offline_after <= cfg.heartbeat {
        return Err(StartError::BadConfig(format!(
            "offline_after ({:?}) must be longer than the heartbeat interval ({:?})",
            cfg.offline_after, cfg.heartbeat
        )));
    }
    let token: Arc<str> = token::load_or_create(cfg.token.as_deref(), &cfg.state_dir)?.into();
    let settings = config::load(&cfg.state_dir)?;
    let http_listener = tokio::net::TcpListener::bind(cfg.http)
        .await
        .map_err(|e| bind_error(e, "HTTP", cfg.http))?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|e| bind_error(e, "HTTP", cfg.http))?;
    let osc_socket = UdpSocket::bind(cfg.osc)
        .await
        .map_err(|e| bind_error(e, "OSC", cfg.osc))?;
    let osc_addr = osc_socket
        .local_addr()
        .map_err(|e| bind_error(e, "OSC", cfg.osc))?;
    let rtp_bound = match &cfg.rtpmidi {
        Some(r) => Some(rtpmidi::bind(r).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                StartError::RtpMidiPortInUse(r.control)
            } else {
                StartError::Bind {
                    what: "RTP-MIDI",
                    addr: r.control,
                    source: e,
                }
            }
        })?),
        None => None,
    };
    let jack_input = match &cfg.jack_midi {
        Some(j) => Some(jack_midi::open(j).map_err(StartError::JackMidi)?),
        None => None,
    };
    let tcp_want = SocketAddr::new(osc_addr.ip(), cfg.osc_tcp_port.unwrap_or(osc_addr.port()));
    let osc_tcp = tokio::net::TcpListener::bind(tcp_want)
        .await
        .map_err(|e| bind_error(e, "OSC TCP", tcp_want))?;
    let osc_tcp_addr = osc_tcp
        .local_addr()
        .map_err(|e| bind_error(e, "OSC TCP", tcp_want))?;
    let oscquery_listener = match cfg.oscquery_port {
        Some(port) => {
            let want = SocketAddr::new(osc_addr.ip(), port);
            let l = tokio::net::TcpListener::bind(want)
                .await
                .map_err(|e| bind_error(e, "OSCQuery", want))?;
            let a = l
                .local_addr()
                .map_err(|e| bind_error(e, "OSCQuery", want))?;
            Some((l, a))
        }
        None => None,
    };
    let oscquery_addr = oscquery_listener.as_ref().map(|(_, a)| *a);
    let endpoint = session::client_endpoint(SocketAddr::new(cfg.scope.bind_ip(), 0))
        .map_err(StartError::Quic)?;

    let alloc_cfg = AllocatorConfig {
        lookahead_ns: cfg.lookahead.as_nanos() as u64,
        lease_ns: cfg.lease.as_nanos() as u64,
        renew_every_ns: (cfg.lease / 4).as_nanos().max(1) as u64,
        policy: settings.policy.policy,
        steal: settings.policy.steal,
        routes: settings.channels.clone(),
        ..AllocatorConfig::default()
    };
    let timeline = Timeline::from_milli_bpm(DEFAULT_MILLI_BPM, clock.now());
    let cv =
        cv::CvRouter::new(settings.cv.clone(), cfg.lookahead.as_nanos() as u64).map_err(|e| {
            config::ConfigError::Corrupt {
                path: config::path(&cfg.state_dir),
                detail: format!("cv.{e}"),
            }
        })?;
    let shared = Arc::new(Shared {
        id: cfg.id.clone(),
        clock,
        lookahead: cfg.lookahead,
        heartbeat: cfg.heartbeat,
        offline_after: cfg.offline_after,
        lease: cfg.lease,
        inner: Mutex::new(Inner {
            alloc: VoiceAllocator::new(alloc_cfg),
            cv,
            nodes: Default::default(),
            counters: Default::default(),
            latency: Default::default(),
            latency_rtpmidi: Default::default(),
            next_generation: 0,
            tempo: tempo::TempoState::new(timeline, settings.link.quantum),
            mcus: Default::default(),
            onsets: Default::default(),
            osc: osc::server::OscState::new(cfg.lookahead.as_nanos() as u64),
        }),
        renew_wakeup: tokio::sync::Notify::new(),
        tempo_changed: tokio::sync::Notify::new(),
        link_enabled: tokio::sync::watch::Sender::new(cfg.link),
        rtpmidi: Default::default(),
    });

    let tracker = TaskTracker::new();
    let connectors =
        discovery::Connectors::new(shared.clone(), endpoint, tracker.clone(), shutdown.clone());
    let mdns_events = discovery::start_browser(cfg.scope, shutdown.clone())
        .map_err(|e| StartError::Mdns(e.to_string()))?;
    tracker.spawn(discovery::browse(
        mdns_events,
        connectors.clone(),
        shutdown.clone(),
    ));
    osc::server::spawn(
        shared.clone(),
        osc_socket,
        Some(osc_tcp),
        &tracker,
        shutdown.clone(),
    );
    tracker.spawn(renew_task(shared.clone(), shutdown.clone()));
    tracker.spawn(link::glue::run(
        tempo::TempoHandle::new(shared.clone()),
        shared.clock.clone(),
        cfg.scope,
        shared.link_enabled.subscribe(),
        tracker.clone(),
        shutdown.clone(),
    ));
    if let (Some(r), Some(b)) = (&cfg.rtpmidi, rtp_bound) {
        let h = rtpmidi::start(
            r,
            &settings.rtpmidi,
            b,
            shared.clone(),
            cfg.scope,
            &tracker,
            shutdown.clone(),
        );
        let _ = shared.rtpmidi.set(h);
    }
    let ports = advertise::Ports {
        http: Some(http_addr),
        osc_udp: Some(osc_addr),
        osc_tcp: Some(osc_tcp_addr),
        oscquery: oscquery_addr,
        apple_midi: shared.rtpmidi.get().map(|h| h.control_addr()),
    };
    let advertisement = if cfg.advertise {
        let services = advertise::services(&cfg.id, &ports);
        Some(
            advertise::start(&cfg.id, cfg.scope, &services, shutdown.clone())
                .map_err(|e| StartError::Mdns(e.to_string()))?,
        )
    } else {
        None
    };
    let jack_midi_port = jack_input.as_ref().map(|i| i.port_name().to_string());
    if let Some(input) = jack_input {
        tracing::info!(port = input.port_name(), "JACK MIDI input");
        let (s, stop) = (shared.clone(), shutdown.clone());
        // A long-running blocking task: the tracker waits for it at shutdown.
        tracker.spawn_blocking(move || jack_midi::run(input, s, stop));
    }

    let error = Arc::new(Mutex::new(None));
    let store = Arc::new(http::ConfigStore::new(cfg.state_dir.clone(), settings));
    let app = http::router(shared.clone(), token.clone(), store);
    let (err_slot, stop) = (error.clone(), shutdown.clone());
    tracker.spawn(async move {
        let served = axum::serve(http_listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!("HTTP server failed: {e}");
            *err_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(RunError::Http(e));
        }
    });
    if let Some((listener, _)) = oscquery_listener {
        let host = oscquery::HostInfo {
            name: format!("VoiceMesh {}", cfg.id),
            osc_udp: osc_addr,
        };
        let app = oscquery::router(shared.clone(), host);
        let stop = shutdown.clone();
        tracker.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!("OSCQuery server failed: {e}");
            }
        });
    }
    tracing::info!(%http_addr, %osc_addr, %osc_tcp_addr, ?oscquery_addr, "coordinator started");
    Ok(RunningCoordinator {
        shared,
        http_addr,
        osc_addr,
        osc_tcp_addr,
        oscquery_addr,
        token,
        tracker,
        connectors,
        advertisement,
        error,
        jack_midi_port,
    })
}

/// Sends lease renewals when the allocator says they are due.
async fn renew_task(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let wait = {
            let now = shared.now();
            let mut g = shared.lock();
            let actions = g.alloc.renewals(now);
            g.dispatch(actions, None);
            g.alloc
                .poll_timeout()
                .map(|t| Duration::from_nanos(t.nanos_since(now).max(0) as u64))
        };
        // Without held voices, sleep until a note-on wakes us (bounded, to stay robust).
        let wait = wait.unwrap_or(Duration::from_secs(1));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = shared.renew_wakeup.notified() => {}
            _ = sleep(wait) => {}
        }
    }
}
