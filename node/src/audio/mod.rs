//! Audio backends: JACK and ALSA (both libraries loaded at run time through [`ffi`], so
//! building needs nothing but Rust), a WAV recorder and a null sink (the last two paced by the
//! cluster clock), and an offline renderer for tests.
//!
//! Every backend owns an [`Engine`](crate::engine::Engine) on its audio thread and tells it
//! the cluster time of each block's first frame. JACK: `clock.to_cluster(now)` at the start of
//! the callback plus the output port's playback latency. ALSA: a dedicated thread renders a
//! block and writes it with a blocking `snd_pcm_writei` (the sound card's clock paces it);
//! the block starts at `clock.to_cluster(now)` plus the PCM's delay (frames queued ahead of
//! the one sounding). Paced (WAV, null): frame `n` is at `first_frame_cluster_ns + n·1e9/sr`
//! exactly, and block `k` is rendered when the cluster clock reaches its end, like a sound
//! card that consumes it then. [`offline::render_offline`] renders a list of timestamped
//! events into a WAV file as fast as the CPU allows, without a clock.
//!
//! Every backend measures its callback load the same way ([`record_block_load`]): the time
//! from the callback's entry to the end of rendering, against the block's duration, recorded
//! in the engine counters (atomics, no allocation) for the status mean and max.

pub mod alsa;
pub mod ffi;
pub mod jack;
pub mod offline;
pub mod paced;

use crate::clock::ClusterClock;
use crate::engine::{EngineCounters, EventSender};
use crate::error::NodeError;
use crate::rt::RtReport;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Default directory of `--audio auto` when no JACK server runs.
pub const DEFAULT_WAV_DIR: &str = "./voicemesh-audio";

/// Which audio backend a node uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AudioSpec {
    /// JACK if a server is running, else (no server, or JACK not installed)
    /// `Wav(./voicemesh-audio)`.
    Auto,
    /// JACK; fails if no server runs.
    Jack,
    /// ALSA (libasound loaded at run time), on the named PCM device (`None`: ALSA's
    /// `default`).
    Alsa(Option<String>),
    /// Real-time render into `DIR/<id>.wav` with a JSON sidecar.
    Wav(PathBuf),
    /// Real-time render, output discarded.
    Null,
}

/// Why an `--audio` value was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown audio backend {0:?}: expected \"auto\", \"jack\", \"alsa\", \"alsa:DEVICE\", \
     \"null\" or \"wav:DIR\""
)]
pub struct ParseAudioSpecError(pub String);

impl FromStr for AudioSpec {
    type Err = ParseAudioSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AudioSpec::Auto),
            "jack" => Ok(AudioSpec::Jack),
            "null" => Ok(AudioSpec::Null),
            "alsa" => Ok(AudioSpec::Alsa(None)),
            _ if s.starts_with("alsa:") => match &s["alsa:".len()..] {
                "" => Err(ParseAudioSpecError(format!(
                    "{s} (alsa: needs a device, e.g. alsa:hw:0,0, or plain alsa for the default)"
                ))),
                dev => Ok(AudioSpec::Alsa(Some(dev.to_string()))),
            },
            _ => match s.strip_prefix("wav:") {
                Some(dir) if !dir.is_empty() => Ok(AudioSpec::Wav(PathBuf::from(dir))),
                Some(_) => Err(ParseAudioSpecError(format!(
                    "{s} (wav: needs a directory, e.g. wav:./out)"
                ))),
                None => Err(ParseAudioSpecError(s.to_string())),
            },
        }
    }
}

impl std::fmt::Display for AudioSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AudioSpec::Auto => write!(f, "auto"),
            AudioSpec::Jack => write!(f, "jack"),
            AudioSpec::Alsa(None) => write!(f, "alsa"),
            AudioSpec::Alsa(Some(d)) => write!(f, "alsa:{d}"),
            AudioSpec::Wav(d) => write!(f, "wav:{}", d.display()),
            AudioSpec::Null => write!(f, "null"),
        }
    }
}

/// What the engine's backend needs from the node.
#[derive(Debug, Clone)]
pub struct AudioParams {
    /// Node id (file and client names).
    pub id: String,
    /// Node name (recorded in the WAV sidecar).
    pub name: String,
    /// Voice pool size.
    pub voices: u16,
    /// Sample rate for paced backends (JACK uses the server's).
    pub sample_rate: u32,
    /// The node's cluster clock.
    pub clock: Arc<ClusterClock>,
    /// Counters the engine writes.
    pub counters: Arc<EngineCounters>,
}

/// A running backend.
#[derive(Debug)]
pub struct RunningAudio {
    /// One line saying where the sound goes.
    pub description: String,
    /// The sample rate actually used.
    pub sample_rate: u32,
    /// The control side of the engine's event queue.
    pub sender: EventSender,
    /// Every voice start, as rendered (for the session's `Onset` reports).
    pub onsets: rtrb::Consumer<crate::engine::Onset>,
    /// What real-time treatment the audio thread and the process got (printed at start).
    pub realtime: RtReport,
    /// Resolves when the backend has stopped (after `shutdown`) and its output is complete.
    pub task: JoinHandle<Result<(), NodeError>>,
}

/// Starts a dedicated audio thread named `thread_name` that first asks for real-time
/// treatment (SCHED_FIFO, locked memory), reports what it got, then runs `body` until it
/// returns. Returns that report and a task resolving to `body`'s result. `what` names the
/// thread in errors ("audio thread", "ALSA thread"). Shared by every backend that owns its
/// thread (wav/null, ALSA); JACK's thread belongs to the server.
pub(crate) fn spawn_audio_thread(
    thread_name: String,
    what: &'static str,
    body: impl FnOnce() -> Result<(), NodeError> + Send + 'static,
) -> Result<(RtReport, JoinHandle<Result<(), NodeError>>), NodeError> {
    let (rt_tx, rt_rx) = std::sync::mpsc::sync_channel(1);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let label = format!("{what} {thread_name}");
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            let _ = rt_tx.send(crate::rt::request_realtime(&label));
            let _ = done_tx.send(body());
        })
        .map_err(|e| NodeError::AudioThread(format!("cannot start the {what}: {e}")))?;
    // The thread's first act is to ask for SCHED_FIFO and report; a dead thread drops the
    // sender, so this never waits long.
    let realtime = rt_rx.recv().map_err(|_| {
        NodeError::AudioThread(format!("the {what} ended before it started rendering"))
    })?;
    let task = tokio::spawn(async move {
        done_rx
            .await
            .unwrap_or_else(|_| Err(NodeError::AudioThread(format!("the {what} panicked"))))
    });
    Ok((realtime, task))
}

/// Starts the backend `spec`; it runs until `shutdown`.
pub fn start(
    spec: &AudioSpec,
    p: AudioParams,
    shutdown: CancellationToken,
) -> Result<RunningAudio, NodeError> {
    match spec {
        AudioSpec::Jack => jack::start(jack::open_client(&p.id)?, p, shutdown),
        AudioSpec::Alsa(device) => alsa::start(device.as_deref(), p, shutdown),
        AudioSpec::Wav(dir) => paced::start(Some(dir.clone()), p, shutdown),
        AudioSpec::Null => paced::start(None, p, shutdown),
        AudioSpec::Auto => match jack::open_client(&p.id) {
            Ok(client) => jack::start(client, p, shutdown),
            Err(e @ (NodeError::NoJackServer { .. } | NodeError::JackNotInstalled { .. })) => {
                tracing::info!("{e}; recording to WAV files in {DEFAULT_WAV_DIR}");
                paced::start(Some(PathBuf::from(DEFAULT_WAV_DIR)), p, shutdown)
            }
            Err(e) => Err(e),
        },
    }
}

/// CLOCK_MONOTONIC in ns (vDSO: no allocation, no syscall on x86-64 and arm64).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Records one callback's load: the time since `entered_ns` ([`monotonic_ns`] at the
/// callback's entry) against the duration of `frames` frames at `sample_rate`, in per-mille.
/// Wait-free, allocation-free: called on the audio thread by every backend.
pub fn record_block_load(
    counters: &EngineCounters,
    entered_ns: u64,
    frames: usize,
    sample_rate: u32,
) {
    let spent = monotonic_ns().saturating_sub(entered_ns);
    let budget = (frames as u64 * 1_000_000_000) / u64::from(sample_rate.max(1));
    let permille = (spent * 1000).checked_div(budget).unwrap_or(0);
    counters.record_load(permille.min(u64::from(u32::MAX)) as u32);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_spec_parses() {
        assert_eq!("auto".parse(), Ok(AudioSpec::Auto));
        assert_eq!("jack".parse(), Ok(AudioSpec::Jack));
        assert_eq!("null".parse(), Ok(AudioSpec::Null));
        assert_eq!(
            "wav:/tmp/x".parse(),
            Ok(AudioSpec::Wav(PathBuf::from("/tmp/x")))
        );
        assert_eq!("alsa".parse(), Ok(AudioSpec::Alsa(None)));
        assert_eq!(
            "alsa:hw:1,0".parse(),
            Ok(AudioSpec::Alsa(Some("hw:1,0".into())))
        );
        assert_eq!(
            "alsa:hw:1,0".parse::<AudioSpec>().unwrap().to_string(),
            "alsa:hw:1,0"
        );
        assert_eq!("alsa".parse::<AudioSpec>().unwrap().to_string(), "alsa");
        let e = "alsa:".parse::<AudioSpec>().unwrap_err().to_string();
        assert!(e.contains("alsa: needs a device"), "{e}");
        let e = "pulse".parse::<AudioSpec>().unwrap_err().to_string();
        assert!(
            e.contains("\"pulse\"") && e.contains("wav:DIR") && e.contains("alsa:DEVICE"),
            "{e}"
        );
        let e = "wav:".parse::<AudioSpec>().unwrap_err().to_string();
        assert!(e.contains("needs a directory"), "{e}");
        assert_eq!(
            "wav:out".parse::<AudioSpec>().unwrap().to_string(),
            "wav:out"
        );
    }

    #[test]
    fn block_load_is_per_mille_of_the_budget() {
        let c = EngineCounters::default();
        // 48 frames at 48 kHz = 1 ms budget; "entered" 2 ms ago → at least 2000 ‰.
        record_block_load(&c, monotonic_ns() - 2_000_000, 48, 48_000);
        record_block_load(&c, monotonic_ns(), 48_000, 48_000);
        let (mean, max) = c.take_load();
        assert!(max >= 2000, "max {max}");
        assert!(mean >= 1000 && mean < max, "mean {mean} max {max}");
        assert_eq!(c.take_load(), (0, 0), "reset after a read");
    }
}
