//! The MCU simulator (`voicemesh mcu-sim`): the same [`McuNode`] as the firmware, on a std UDP
//! socket with virtual DACs, advertised over mDNS as `_voicemesh._udp` with `role=mcu`.
//!
//! [`start_sim`] binds the socket, starts the mDNS advertisement and spawns the node's task;
//! the returned [`SimHandle`] gives the bound address and a live view of the DAC codes and the
//! last report. [`run_sim`] does the same and waits until `cancel` fires (the CLI's entry point).
//! On cancel the node sends `Bye` to its coordinator, withdraws the mDNS record and returns.
//!
//! The loop is the call order of [`McuNode`]: datagram or deadline → `handle_*` → perform
//! every DAC op on the virtual DACs (they complete at once) → send every datagram to the
//! coordinator (the address the coordinator's datagrams come from).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::vec;
use std::vec::Vec;
use std::{format, string::String};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use voicemesh_node::NetScope;
use voicemesh_node::mdns::{self, NodeTxt};
use voicemesh_protocol::datagram::MAX_DATAGRAM_LEN;
use voicemesh_protocol::{CvReport, Message, Role};

use crate::dac::VirtualDac;
use crate::{DacOp, DacSpec, LocalTime, McuConfig, McuNode, engine::MAX_VOICES};

/// How the simulator is set up.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Node id (mDNS instance name, `Hello.id`); at most 32 bytes.
    pub id: String,
    /// Human-readable name; at most 32 bytes.
    pub name: String,
    /// Virtual DACs of 8 channels each, 12 bits, 0–5 V (1–4).
    pub dacs: u8,
    /// Voice slots (1–16).
    pub voices: u16,
    /// UDP port to listen on (0: any free port; the default is
    /// [`voicemesh_protocol::discovery::DEFAULT_MCU_PORT`]).
    pub port: u16,
    /// Loopback or a LAN interface: where the socket binds and mDNS runs.
    pub scope: NetScope,
    /// Advertise over mDNS (tests that hand the address over directly may turn it off).
    pub advertise: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            id: "mcu-sim".into(),
            name: "mcu-sim".into(),
            dacs: 1,
            voices: 2,
            port: voicemesh_protocol::discovery::DEFAULT_MCU_PORT,
            scope: NetScope::Loopback,
            advertise: true,
        }
    }
}

/// Why the simulator could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A configuration value is out of range.
    #[error("mcu-sim: {0}")]
    Config(String),
    /// The UDP socket could not be bound or failed.
    #[error("mcu-sim UDP socket {addr}: {source}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// mDNS could not start.
    #[error(transparent)]
    Mdns(#[from] mdns::MdnsError),
}

/// What the simulator shows of itself while it runs.
#[derive(Clone, Debug, Default)]
pub struct SimSnapshot {
    /// Whether a coordinator has welcomed it.
    pub joined: bool,
    /// Codes of the virtual DACs, channel 0 first.
    pub codes: Vec<u16>,
    /// The last report the node made (also sent to the coordinator).
    pub report: Option<CvReport>,
    /// The coordinator's address, once one spoke.
    pub coordinator: Option<SocketAddr>,
}

/// A running simulator.
#[derive(Debug)]
pub struct SimHandle {
    /// The address its UDP socket is bound to.
    pub local_addr: SocketAddr,
    snapshot: Arc<Mutex<SimSnapshot>>,
    faults: Arc<Mutex<Vec<bool>>>,
    task: JoinHandle<Result<(), SimError>>,
}

impl SimHandle {
    /// A copy of the current state.
    pub fn snapshot(&self) -> SimSnapshot {
        self.snapshot.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Makes virtual DAC `dac` fail (or work again), to exercise the fault path.
    pub fn set_dac_failing(&self, dac: usize, failing: bool) {
        if let Ok(mut f) = self.faults.lock()
            && let Some(x) = f.get_mut(dac)
        {
            *x = failing;
        }
    }

    /// Waits for the simulator to finish (after its cancel token fired).
    pub async fn join(self) -> Result<(), SimError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(SimError::Config(format!("simulator task failed: {e}"))),
        }
    }
}

fn short(s: &str, what: &str) -> Result<voicemesh_protocol::ShortStr, SimError> {
    voicemesh_protocol::ShortStr::try_from(s)
        .map_err(|_| SimError::Config(format!("{what} must be at most 32 bytes: {s:?}")))
}

/// Binds, advertises and spawns the simulator; it runs until `cancel` fires.
pub async fn start_sim(cfg: SimConfig, cancel: CancellationToken) -> Result<SimHandle, SimError> {
    if !(1..=4).contains(&cfg.dacs) {
        return Err(SimError::Config(format!(
            "--dacs must be 1–4, got {}",
            cfg.dacs
        )));
    }
    if !(1..=MAX_VOICES as u16).contains(&cfg.voices) {
        return Err(SimError::Config(format!(
            "--voices must be 1–{MAX_VOICES}, got {}",
            cfg.voices
        )));
    }
    let mcu = McuConfig {
        id: short(&cfg.id, "the id")?,
        name: short(&cfg.name, "the name")?,
        voices: cfg.voices,
        dacs: (0..cfg.dacs).map(|_| DacSpec::VIRTUAL_5V).collect(),
        session_id: rand::random(),
    };
    let addr = SocketAddr::new(cfg.scope.bind_ip(), cfg.port);
    let sock = UdpSocket::bind(addr)
        .await
        .map_err(|source| SimError::Socket { addr, source })?;
    let local_addr = sock
        .local_addr()
        .map_err(|source| SimError::Socket { addr, source })?;
    let channels = u16::from(cfg.dacs) * 8;
    let advert = if cfg.advertise {
        let txt = NodeTxt {
            id: cfg.id.clone(),
            voices: cfg.voices,
            cv: channels,
            engines: Vec::new(),
            port: local_addr.port(),
        };
        Some(mdns::advertise(
            cfg.scope,
            vec![txt.instance_as(Role::Mcu)],
            cancel.child_token(),
        )?)
    } else {
        None
    };
    tracing::info!(id = %cfg.id, %local_addr, channels, voices = cfg.voices, "mcu-sim listening");
    let snapshot = Arc::new(Mutex::new(SimSnapshot {
        codes: vec![0; usize::from(channels)],
        ..SimSnapshot::default()
    }));
    let faults = Arc::new(Mutex::new(vec![false; usize::from(cfg.dacs)]));
    let task = tokio::spawn(run_loop(
        sock,
        mcu,
        cancel,
        snapshot.clone(),
        faults.clone(),
        advert,
    ));
    Ok(SimHandle {
        local_addr,
        snapshot,
        faults,
        task,
    })
}

/// [`start_sim`], then waits until `cancel` fires and the simulator has said goodbye.
pub async fn run_sim(cfg: SimConfig, cancel: CancellationToken) -> Result<(), SimError> {
    start_sim(cfg, cancel).await?.join().await
}

/// How early the loop asks tokio to wake it before a deadline (its timer has 1 ms ticks and
/// rounds up); the rest is a `std::thread::sleep`, which is precise to tens of µs on Linux.
const TIMER_SLACK: Duration = Duration::from_millis(2);

async fn run_loop(
    sock: UdpSocket,
    cfg: McuConfig,
    cancel: CancellationToken,
    snapshot: Arc<Mutex<SimSnapshot>>,
    faults: Arc<Mutex<Vec<bool>>>,
    advert: Option<mdns::Advertisement>,
) -> Result<(), SimError> {
    let start = Instant::now();
    let local = move || LocalTime(start.elapsed().as_nanos() as u64);
    let mut dacs: Vec<VirtualDac> = cfg.dacs.iter().map(|_| VirtualDac::default()).collect();
    let mut node = McuNode::new(cfg, local());
    let mut coordinator: Option<SocketAddr> = None;
    let mut rx = vec![0u8; 2048];
    let mut tx = vec![0u8; MAX_DATAGRAM_LEN];
    loop {
        let wake = start + Duration::from_nanos(node.poll_timeout().0);
        tokio::select! {
            () = cancel.cancelled() => break,
            r = sock.recv_from(&mut rx) => match r {
                Ok((n, from)) => {
                    if node.handle_datagram(local(), &rx[..n]).from_coordinator {
                        coordinator = Some(from);
                    }
                }
                // ICMP port unreachable from a gone coordinator and the like: keep running.
                Err(e) => tracing::debug!("mcu-sim recv: {e}"),
            },
            () = tokio::time::sleep_until(wake.checked_sub(TIMER_SLACK).unwrap_or(wake)) => {
                // tokio's timer wheel wakes up to ~2 ms late (1 ms ticks, rounded up); the
                // firmware's hardware alarm does not. The last stretch is a precise sleep.
                if let Some(left) = wake.checked_duration_since(Instant::now()) {
                    std::thread::sleep(left);
                }
                node.handle_timeout(local())
            }
        }
        let failing = faults.lock().map(|f| f.clone()).unwrap_or_default();
        while let Some(op) = node.poll_dac(local()) {
            let ok = match op {
                DacOp::Init { dac } => {
                    let d = usize::from(dac);
                    dacs[d].failing = failing.get(d).copied().unwrap_or(false);
                    dacs[d].init_now().is_ok()
                }
                DacOp::Write(w) => {
                    let d = usize::from(w.dac);
                    dacs[d].failing = failing.get(d).copied().unwrap_or(false);
                    dacs[d].write_now(w.dac_channel, w.code).is_ok()
                }
            };
            node.dac_done(local(), op, ok);
        }
        let mut report = None;
        while let Some(n) = node.poll_transmit(local(), &mut tx) {
            if let Ok((_, f)) = voicemesh_protocol::datagram::decode_datagram(&tx[..n])
                && let Message::CvReport(r) = f.message
            {
                report = Some(r);
            }
            if let Some(c) = coordinator
                && let Err(e) = sock.send_to(&tx[..n], c).await
            {
                tracing::debug!("mcu-sim send to {c}: {e}");
            }
        }
        if let Ok(mut s) = snapshot.lock() {
            s.joined = node.joined();
            s.coordinator = coordinator;
            s.codes.clear();
            s.codes
                .extend((0..node.channels() as u16).map(|c| node.engine().code(c)));
            if report.is_some() {
                s.report = report;
            }
        }
    }
    node.close();
    if let Some(c) = coordinator {
        while let Some(n) = node.poll_transmit(local(), &mut tx) {
            let _ = sock.send_to(&tx[..n], c).await;
        }
    }
    if let Some(a) = advert {
        a.stop().await;
    }
    Ok(())
}
