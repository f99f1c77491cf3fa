//! The JACK backend: one client `voicemesh-<id>`, one output port `out`, connected to
//! `system:playback_1` and `_2` when they exist.
//!
//! libjack is loaded at run time through [`super::ffi::jack`], so building the node needs no
//! JACK development files; a machine without jackd2 gets [`NodeError::JackNotInstalled`] from
//! `--audio jack` (and `--audio auto` falls back to WAV files). A server is never started:
//! the client joins the one named by `$JACK_DEFAULT_SERVER`, else `default`, and
//! [`NodeError::NoJackServer`] says so when none runs.
//!
//! JACK runs the handler on its own real-time thread. Block start cluster time =
//! `clock.to_cluster(CLOCK_REALTIME now)` at the start of the handler plus the playback
//! latency of `out`, which the client's [`Monitor`](super::ffi::jack::Monitor) re-reads
//! whenever JACK reorders the graph or recomputes latencies. When the server reports 0 for
//! `out` itself (jackd2 may not propagate latency to a client's port), the largest playback
//! latency of the ports `out` feeds (e.g. `system:playback_1`) is used. The handler also
//! moves the monitor's xrun count into the engine counters and records its load; it only
//! reads and writes atomics and renders: no allocation, no lock, no blocking.
//!
//! The process thread is JACK's: its scheduling is whatever the server gives its clients
//! (`jackd -R -P N`). The first handler call records it ([`crate::rt::current_sched`], no
//! allocation) so the node can say what it got; the node locks its own memory.

use super::ffi::jack::{Client, JackError};
use super::{AudioParams, RunningAudio};
use crate::clock::local_now_ns;
use crate::engine::Engine;
use crate::error::NodeError;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long `start` waits for the first callback to learn the process thread's scheduling.
const FIRST_CALLBACK_WAIT: Duration = Duration::from_secs(2);

/// How often the backend's task looks whether the server shut the client down.
const SHUTDOWN_POLL: Duration = Duration::from_millis(500);

/// Playback ports `out` is connected to, when they exist.
pub const PLAYBACK_PORTS: [&str; 2] = ["system:playback_1", "system:playback_2"];

/// The process thread's scheduling, written once by the first callback.
#[derive(Debug, Default)]
struct SeenSched {
    seen: AtomicBool,
    policy: AtomicI32,
    priority: AtomicI32,
}

/// Maps a failed client open to the node's error: no server (or one that refused the client)
/// is [`NodeError::NoJackServer`], a missing libjack [`NodeError::JackNotInstalled`].
fn open_error(e: JackError) -> NodeError {
    match e {
        JackError::NotInstalled { library, detail } => NodeError::JackNotInstalled {
            detail: format!("{library} cannot be loaded: {detail}"),
        },
        JackError::MissingSymbol { .. } => NodeError::JackNotInstalled {
            detail: e.to_string(),
        },
        JackError::NoServer { server, status } => NodeError::NoJackServer {
            detail: format!("server {server:?}, libjack: {status}"),
        },
        e @ JackError::OpenFailed { .. } => NodeError::NoJackServer {
            detail: e.to_string(),
        },
        e => NodeError::Jack(e.to_string()),
    }
}

/// Opens the JACK client `voicemesh-<id>` on the default server (`$JACK_DEFAULT_SERVER`, else
/// `default`) without starting one.
pub fn open_client(id: &str) -> Result<Client, NodeError> {
    Client::open(&format!("voicemesh-{id}"), None).map_err(open_error)
}

/// Whether a JACK server answers on the default server: opens and closes a client. Never
/// starts a server; `false` as well when libjack is not installed.
pub fn server_running() -> bool {
    Client::open(&format!("voicemesh-probe-{}", std::process::id()), None).is_ok()
}

fn frames_to_ns(frames: u32, sample_rate: u32) -> u64 {
    u64::from(frames) * 1_000_000_000 / u64::from(sample_rate.max(1))
}

/// Starts the engine on `client`: registers `out`, activates, connects to the system
/// playback ports.
pub fn start(
    client: Client,
    p: AudioParams,
    shutdown: CancellationToken,
) -> Result<RunningAudio, NodeError> {
    let sr = client.sample_rate();
    let client_name = client.name().to_string();
    let (mut engine, sender) = Engine::new(p.voices, sr, p.counters.clone());
    let monitor = client.monitor();
    let sched = Arc::new(SeenSched::default());

    let handler = {
        let monitor = monitor.clone();
        let sched = sched.clone();
        let clock = p.clock.clone();
        let counters = p.counters.clone();
        let mut xruns_seen = 0u64;
        move |_nframes: u32, buf: &mut [f32]| {
            let entered = super::monotonic_ns();
            if !sched.seen.load(Ordering::Relaxed) {
                let s = crate::rt::current_sched();
                sched.policy.store(s.policy, Ordering::Relaxed);
                sched.priority.store(s.priority, Ordering::Relaxed);
                sched.seen.store(true, Ordering::Release);
            }
            let xruns = monitor.xruns();
            if xruns != xruns_seen {
                counters
                    .xruns
                    .fetch_add(xruns.wrapping_sub(xruns_seen) as u32, Ordering::Relaxed);
                xruns_seen = xruns;
            }
            let now = local_now_ns();
            let lat = frames_to_ns(monitor.playback_latency().max, sr);
            let start = clock
                .to_cluster(now)
                .add_nanos(lat.min(i64::MAX as u64) as i64);
            engine.render(start, buf);
            super::record_block_load(&counters, entered, buf.len(), sr);
        }
    };
    let active = client
        .activate_output("out", handler)
        .map_err(|e| NodeError::Jack(format!("cannot start client {client_name}: {e}")))?;
    let out_name = active.port_name().to_string();

    let present = active
        .ports("^system:playback_[12]$", super::ffi::jack::PORT_IS_INPUT)
        .unwrap_or_default();
    let mut connected = Vec::new();
    for dest in PLAYBACK_PORTS {
        if present.iter().any(|p| p == dest) {
            match active.connect(&out_name, dest) {
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
    // they are in place. Read them now (the monitor keeps the value fresh afterwards).
    let max = active.playback_latency().max;
    tracing::info!("{description}, {sr} Hz, output latency {max} frames");
    let realtime = crate::rt::RtReport {
        thread: "JACK process thread".into(),
        sched: thread_sched,
        refused: None,
        memory: crate::rt::lock_memory(),
    };

    let task = tokio::spawn(async move {
        let mut told = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(SHUTDOWN_POLL) => {
                    if !told && monitor.shut_down() {
                        tracing::error!("the JACK server shut the client {client_name} down");
                        told = true;
                    }
                }
            }
        }
        // Deactivates and closes the client (blocking calls into libjack).
        match tokio::task::spawn_blocking(move || drop(active)).await {
            Ok(()) => Ok(()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_errors_name_the_way_out() {
        let e = open_error(JackError::NotInstalled {
            library: "libjack.so.0".into(),
            detail: "cannot open shared object file".into(),
        })
        .to_string();
        assert!(e.starts_with("JACK is not installed (libjack.so.0"), "{e}");
        assert!(e.contains("install jackd2") && e.contains("wav:DIR"), "{e}");
        let e = open_error(JackError::NoServer {
            server: "x".into(),
            status: super::super::ffi::jack::Status(0x11),
        });
        assert!(matches!(e, NodeError::NoJackServer { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with("no JACK server running (start jackd or use --audio wav:DIR or null)"),
            "{e}"
        );
    }
}
