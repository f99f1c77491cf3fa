//! The JACK backend: one client `voicemesh-<id>`, one output port `out`, connected to
//! `system:playback_1` and `_2` when they exist.
//!
//! JACK runs the callback on its own real-time thread. Block start cluster time (first
//! version; the timing issue refines it) = `clock.to_cluster(CLOCK_REALTIME now)` at the start
//! of the callback plus the playback latency of `out`, re-read whenever JACK recomputes
//! latencies.

use super::{AudioParams, RunningAudio};
use crate::clock::{ClusterClock, local_now_ns};
use crate::engine::{Engine, EngineCounters};
use crate::error::NodeError;
use jack::{AudioOut, Client, ClientOptions, Control, LatencyType, Port, ProcessScope};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_util::sync::CancellationToken;

/// Playback ports `out` is connected to, when they exist.
pub const PLAYBACK_PORTS: [&str; 2] = ["system:playback_1", "system:playback_2"];

/// Opens the JACK client `voicemesh-<id>` without starting a server.
pub fn open_client(id: &str) -> Result<Client, NodeError> {
    let name = format!("voicemesh-{id}");
    match Client::new(&name, ClientOptions::NO_START_SERVER) {
        Ok((client, _status)) => Ok(client),
        Err(jack::Error::ClientError(status))
            if status.contains(jack::ClientStatus::SERVER_FAILED)
                || status.contains(jack::ClientStatus::SERVER_ERROR) =>
        {
            Err(NodeError::NoJackServer {
                detail: format!("{status:?}"),
            })
        }
        Err(e) => Err(NodeError::NoJackServer {
            detail: e.to_string(),
        }),
    }
}

struct Process {
    engine: Engine,
    out: Port<AudioOut>,
    clock: Arc<ClusterClock>,
    latency_ns: Arc<AtomicU64>,
}

impl jack::ProcessHandler for Process {
    fn process(&mut self, _: &Client, ps: &ProcessScope) -> Control {
        let now = local_now_ns();
        let lat = self.latency_ns.load(Ordering::Relaxed) as i64;
        let start = self.clock.to_cluster(now).add_nanos(lat);
        let buf = self.out.as_mut_slice(ps);
        self.engine.render_timed(start, buf);
        Control::Continue
    }
}

struct Notifications {
    counters: Arc<EngineCounters>,
    out: Port<jack::Unowned>,
    latency_ns: Arc<AtomicU64>,
    sample_rate: u32,
}

impl Notifications {
    fn update_latency(&self) {
        let (_, max) = self.out.get_latency_range(LatencyType::Playback);
        let ns = u64::from(max) * 1_000_000_000 / u64::from(self.sample_rate.max(1));
        self.latency_ns.store(ns, Ordering::Relaxed);
    }
}

impl jack::NotificationHandler for Notifications {
    fn xrun(&mut self, _: &Client) -> Control {
        self.counters.xruns.fetch_add(1, Ordering::Relaxed);
        Control::Continue
    }

    fn graph_reorder(&mut self, _: &Client) -> Control {
        self.update_latency();
        Control::Continue
    }

    unsafe fn shutdown(&mut self, status: jack::ClientStatus, reason: &str) {
        tracing::error!("the JACK server shut the client down ({status:?}): {reason}");
    }
}

/// Starts the engine on `client`.
pub fn start(
    client: Client,
    p: AudioParams,
    shutdown: CancellationToken,
) -> Result<RunningAudio, NodeError> {
    let sr = client.sample_rate();
    let client_name = client.name().to_string();
    let out = client
        .register_port("out", AudioOut::default())
        .map_err(|e| NodeError::Jack(format!("cannot register port {client_name}:out: {e}")))?;
    let out_name = out
        .name()
        .map_err(|e| NodeError::Jack(format!("port name: {e}")))?;
    let (engine, sender) = Engine::new(p.voices, sr, p.counters.clone());
    let latency_ns = Arc::new(AtomicU64::new(0));
    let notifications = Notifications {
        counters: p.counters.clone(),
        out: out.clone_unowned(),
        latency_ns: latency_ns.clone(),
        sample_rate: sr,
    };
    let process = Process {
        engine,
        out,
        clock: p.clock.clone(),
        latency_ns: latency_ns.clone(),
    };
    let active = client
        .activate_async(notifications, process)
        .map_err(|e| NodeError::Jack(format!("cannot activate client {client_name}: {e}")))?;

    let mut connected = Vec::new();
    for dest in PLAYBACK_PORTS {
        if active.as_client().port_by_name(dest).is_some() {
            match active.as_client().connect_ports_by_name(&out_name, dest) {
                Ok(()) => connected.push(dest),
                Err(e) => tracing::warn!("cannot connect {out_name} to {dest}: {e}"),
            }
        }
    }
    // Latencies are known once connected; the graph_reorder notification keeps it fresh.
    let (_, max) = active
        .as_client()
        .port_by_name(&out_name)
        .map(|p| p.get_latency_range(LatencyType::Playback))
        .unwrap_or((0, 0));
    latency_ns.store(
        u64::from(max) * 1_000_000_000 / u64::from(sr.max(1)),
        Ordering::Relaxed,
    );

    let description = if connected.is_empty() {
        format!(
            "JACK client {client_name} (port {out_name}, not connected: no system:playback ports)"
        )
    } else {
        format!("JACK client {client_name} -> {}", connected.join(", "))
    };
    tracing::info!("{description}, {sr} Hz, output latency {} frames", max);

    let task = tokio::spawn(async move {
        shutdown.cancelled().await;
        let r = tokio::task::spawn_blocking(move || active.deactivate()).await;
        match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(NodeError::Jack(format!("deactivating the client: {e}"))),
            Err(e) => Err(NodeError::Task {
                task: "jack",
                detail: e.to_string(),
            }),
        }
    });
    Ok(RunningAudio {
        description,
        sample_rate: sr,
        sender,
        task,
    })
}
