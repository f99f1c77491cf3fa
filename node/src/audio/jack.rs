//! The JACK backend: one client `voicemesh-<id>`, one output port `out`, connected to
//! `system:playback_1` and `_2` when they exist.
//!
//! libjack is loaded at run time through [`super::ffi::jack`], so building the node needs no
//! JACK development files; a machine without jackd2 gets [`NodeError::JackNotInstalled`] from
//! `--audio jack` (and `--audio auto` falls back to WAV files). A server is never started:
//! the client joins the one named by `$JACK_DEFAULT_SERVER`, else `default`, and
//! [`NodeError::NoJackServer`] says so when none runs.
//!
//! JACK runs the handler on its own real-time thread. The block's timing comes from the
//! [`AudioClock`] DLL over JACK's frame counter: every cycle feeds it the cycle's first frame
//! and its start on JACK's microsecond clock (`jack_get_cycle_times`; jackd2's clock is
//! `CLOCK_MONOTONIC`), so the card's drift is followed and the callback's jitter averaged out;
//! the block is heard `playback latency` frames later, the latency of `out` that the client's
//! [`Monitor`](super::ffi::jack::Monitor) re-reads whenever JACK reorders the graph or
//! recomputes latencies. When the server reports 0 for `out` itself (jackd2 may not propagate
//! latency to a client's port), the largest playback latency of the ports `out` feeds (e.g.
//! `system:playback_1`) is used. Without cycle times (an old libjack, or a server whose
//! clock is not `CLOCK_MONOTONIC`) the DLL is fed the handler's own entry time and frame
//! count instead. Onsets report the model's emission instant of their frame. The handler also
//! moves the monitor's xrun count into the engine counters and records its load; it only
//! reads and writes atomics and renders: no allocation, no lock, no blocking.
//!
//! The process thread is JACK's: its scheduling is whatever the server gives its clients
//! (`jackd -R -P N`). The first handler call records it ([`crate::rt::current_sched`], no
//! allocation) so the node can say what it got; the node locks its own memory.

use super::ffi::jack::{Client, JackError};
use super::{AudioParams, RunningAudio};
use crate::clock::audio::{AudioClock, mono_now_ns};
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

/// Largest distance between JACK's microsecond clock and `CLOCK_MONOTONIC` for the cycle
/// times to be used as observations.
const SAME_CLOCK_NS: u64 = 100_000_000;

/// JACK's 32-bit frame counter made monotonic 64-bit.
#[derive(Debug, Default)]
struct FrameUnwrap {
    last: Option<u32>,
    high: u64,
}

impl FrameUnwrap {
    fn unwrap(&mut self, f: u32) -> u64 {
        if let Some(last) = self.last
            && f < last
            && last - f > u32::MAX / 2
        {
            self.high += 1 << 32;
        }
        self.last = Some(f);
        self.high | u64::from(f)
    }
}

/// Feeds the DLL one cycle and returns the frame the block starts on: JACK's cycle times when
/// they are on `CLOCK_MONOTONIC`, else the handler's entry time and its own frame count.
fn observe_cycle(
    dll: &mut AudioClock,
    unwrap: &mut FrameUnwrap,
    own_frames: &mut u64,
    ct: super::ffi::jack::CycleTimes,
    entered_mono: u64,
    nframes: u32,
) -> u64 {
    let usecs_ns = ct.current_usecs.saturating_mul(1000);
    let frame = if ct.current_usecs != 0 && usecs_ns.abs_diff(entered_mono) < SAME_CLOCK_NS {
        let f = unwrap.unwrap(ct.current_frames);
        dll.observe(f, usecs_ns);
        f
    } else {
        let f = *own_frames;
        dll.observe(f, entered_mono);
        f
    };
    *own_frames += u64::from(nframes);
    frame
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
    let onsets = engine.report_onsets();
    let monitor = client.monitor();
    let sched = Arc::new(SeenSched::default());

    let handler = {
        let monitor = monitor.clone();
        let sched = sched.clone();
        let clock = p.clock.clone();
        let counters = p.counters.clone();
        let mut xruns_seen = 0u64;
        let mut dll = AudioClock::new(sr);
        let mut unwrap = FrameUnwrap::default();
        let mut own_frames = 0u64;
        move |nframes: u32, buf: &mut [f32]| {
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
            let frame = observe_cycle(
                &mut dll,
                &mut unwrap,
                &mut own_frames,
                monitor.cycle_times(),
                mono_now_ns(),
                nframes,
            );
            let heard = frame + u64::from(monitor.playback_latency().max);
            engine.render_block(dll.block_time(heard, &clock), buf);
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
        onsets,
        realtime,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_counter_unwraps() {
        let mut u = FrameUnwrap::default();
        assert_eq!(u.unwrap(u32::MAX - 10), u64::from(u32::MAX - 10));
        assert_eq!(u.unwrap(5), (1u64 << 32) + 5);
        assert_eq!(
            u.unwrap(4),
            (1u64 << 32) + 4,
            "a small step back is not a wrap"
        );
    }

    #[test]
    fn cycle_times_feed_the_dll_only_on_the_monotonic_clock() {
        use super::super::ffi::jack::CycleTimes;
        let mut dll = AudioClock::new(48_000);
        let mut u = FrameUnwrap::default();
        let mut own = 0u64;
        let mono = 1_000_000_000_000u64;
        let ct = |frames, usecs| CycleTimes {
            current_frames: frames,
            current_usecs: usecs,
            ..CycleTimes::default()
        };
        let f = observe_cycle(&mut dll, &mut u, &mut own, ct(4800, mono / 1000), mono, 256);
        assert_eq!(f, 4800);
        assert_eq!(dll.mono_of(4800), mono);
        // JACK's clock far from CLOCK_MONOTONIC: the handler's own count and time are used.
        let mut dll = AudioClock::new(48_000);
        let f = observe_cycle(&mut dll, &mut u, &mut own, ct(9600, 5), mono, 256);
        assert_eq!(f, 256, "own frame count after one 256-frame cycle");
        assert_eq!(dll.mono_of(256), mono);
    }

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
