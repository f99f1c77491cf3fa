//! The JACK backend: one client `voicemesh-<id>`, one output port `out`, connected to
//! `system:playback_1` and `_2` when they exist.
//!
//! JACK runs the callback on its own real-time thread. Block start cluster time (first
//! version; the timing issue refines it) = `clock.to_cluster(CLOCK_REALTIME now)` at the start
//! of the callback plus the playback latency of `out`, re-read whenever JACK recomputes
//! latencies.
//!
//! The process thread is JACK's: its scheduling is whatever the server gives its clients
//! (`jackd -R -P N`). The first callback records it ([`crate::rt::current_sched`], no
//! allocation) so the node can say what it got; the node locks its own memory.

use super::{AudioParams, RunningAudio};
use crate::clock::{ClusterClock, local_now_ns};
use crate::engine::{Engine, EngineCounters};
use crate::error::NodeError;
use jack::{AudioOut, Client, ClientOptions, Control, LatencyType, Port, ProcessScope};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

/// How long `start` waits for the first callback to learn the process thread's scheduling.
const FIRST_CALLBACK_WAIT: Duration = Duration::from_secs(2);

/// The process thread's scheduling, written once by the first callback.
#[derive(Debug, Default)]
struct SeenSched {
    seen: AtomicBool,
    policy: AtomicI32,
    priority: AtomicI32,
}
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
    counters: Arc<EngineCounters>,
    sched: Arc<SeenSched>,
}

impl jack::ProcessHandler for Process {
    fn process(&mut self, _: &Client, ps: &ProcessScope) -> Control {
        let entered = super::monotonic_ns();
        if !self.sched.seen.load(Ordering::Relaxed) {
            let s = crate::rt::current_sched();
            self.sched.policy.store(s.policy, Ordering::Relaxed);
            self.sched.priority.store(s.priority, Ordering::Relaxed);
            self.sched.seen.store(true, Ordering::Release);
        }
        let now = local_now_ns();
        let lat = self.latency_ns.load(Ordering::Relaxed) as i64;
        let start = self.clock.to_cluster(now).add_nanos(lat);
        let buf = self.out.as_mut_slice(ps);
        let frames = buf.len();
        self.engine.render(start, buf);
        super::record_block_load(&self.counters, entered, frames, self.engine.sample_rate());
        Control::Continue
    }
}

struct Notifications {
    counters: Arc<EngineCounters>,
    out: Port<jack::Unowned>,
    latency_ns: Arc<AtomicU64>,
    sample_rate: u32,
}

/// Playback latency of `out` in frames: its own, or (when the server has not propagated it to
/// our port, as jackd2 does not for a client without a latency callback) the largest of the
/// ports it feeds, e.g. `system:playback_1`.
fn playback_latency(client: &Client, out: &Port<jack::Unowned>) -> u32 {
    let (_, own) = out.get_latency_range(LatencyType::Playback);
    out.get_connections()
        .iter()
        .filter_map(|name| client.port_by_name(name))
        .map(|p| p.get_latency_range(LatencyType::Playback).1)
        .fold(own, u32::max)
}

impl Notifications {
    fn update_latency(&self, client: &Client) {
        let max = playback_latency(client, &self.out);
        tracing::debug!(
            "JACK playback latency of {}: {max} frames",
            self.out.name().unwrap_or_default()
        );
        let ns = u64::from(max) * 1_000_000_000 / u64::from(self.sample_rate.max(1));
        self.latency_ns.store(ns, Ordering::Relaxed);
    }
}

impl jack::NotificationHandler for Notifications {
    fn xrun(&mut self, _: &Client) -> Control {
        self.counters.xruns.fetch_add(1, Ordering::Relaxed);
        Control::Continue
    }

    fn graph_reorder(&mut self, c: &Client) -> Control {
        self.update_latency(c);
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
    let sched = Arc::new(SeenSched::default());
    let process = Process {
        engine,
        out,
        clock: p.clock.clone(),
        latency_ns: latency_ns.clone(),
        counters: p.counters.clone(),
        sched: sched.clone(),
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
    let description = if connected.is_empty() {
        format!(
            "JACK client {client_name} (port {out_name}, not connected: no system:playback ports)"
        )
    } else {
        format!("JACK client {client_name} -> {}", connected.join(", "))
    };

    // What the server's process thread got: wait for the first callback (it comes within a
    // period once the client is active) rather than guess.
    let deadline = std::time::Instant::now() + FIRST_CALLBACK_WAIT;
    while !sched.seen.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let thread_sched = if sched.seen.load(Ordering::Acquire) {
        Ok(crate::rt::ThreadSched {
            policy: sched.policy.load(Ordering::Relaxed),
            priority: sched.priority.load(Ordering::Relaxed),
        })
    } else {
        Err(format!(
            "no process callback within {} s: is the JACK server running its driver?",
            FIRST_CALLBACK_WAIT.as_secs()
        ))
    };
    // The server recomputes port latencies after the connections above; once a cycle has run
    // they are in place (the graph_reorder notification keeps the value fresh afterwards).
    let max = active
        .as_client()
        .port_by_name(&out_name)
        .map_or(0, |p| playback_latency(active.as_client(), &p));
    latency_ns.store(
        u64::from(max) * 1_000_000_000 / u64::from(sr.max(1)),
        Ordering::Relaxed,
    );
    tracing::info!("{description}, {sr} Hz, output latency {max} frames");
    let realtime = crate::rt::RtReport {
        thread: "JACK process thread".into(),
        sched: thread_sched,
        refused: None,
        memory: crate::rt::lock_memory(),
    };

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
        realtime,
        task,
    })
}
