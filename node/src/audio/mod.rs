//! Audio backends: JACK, a WAV recorder and a null sink, the last two paced by the cluster
//! clock.
//!
//! Every backend owns an [`Engine`](crate::engine::Engine) on its audio thread and tells it
//! the cluster time of each block's first frame. JACK: `clock.to_cluster(now)` at the start of
//! the callback plus the output port's playback latency. Paced (WAV, null): frame `n` is at
//! `first_frame_cluster_ns + n·1e9/sr` exactly, and block `k` is rendered when the cluster
//! clock reaches its first frame, like a sound card that consumes it at that instant.

pub mod jack;
pub mod paced;

use crate::clock::ClusterClock;
use crate::engine::{EngineCounters, EventSender};
use crate::error::NodeError;
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
    /// JACK if a server is running, else `Wav(./voicemesh-audio)`.
    Auto,
    /// JACK; fails if no server runs.
    Jack,
    /// Real-time render into `DIR/<id>.wav` with a JSON sidecar.
    Wav(PathBuf),
    /// Real-time render, output discarded.
    Null,
}

/// Why an `--audio` value was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown audio backend {0:?}: expected \"auto\", \"jack\", \"null\" or \"wav:DIR\"")]
pub struct ParseAudioSpecError(pub String);

impl FromStr for AudioSpec {
    type Err = ParseAudioSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AudioSpec::Auto),
            "jack" => Ok(AudioSpec::Jack),
            "null" => Ok(AudioSpec::Null),
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
    /// Resolves when the backend has stopped (after `shutdown`) and its output is complete.
    pub task: JoinHandle<Result<(), NodeError>>,
}

/// Starts the backend `spec`; it runs until `shutdown`.
pub fn start(
    spec: &AudioSpec,
    p: AudioParams,
    shutdown: CancellationToken,
) -> Result<RunningAudio, NodeError> {
    match spec {
        AudioSpec::Jack => jack::start(jack::open_client(&p.id)?, p, shutdown),
        AudioSpec::Wav(dir) => paced::start(Some(dir.clone()), p, shutdown),
        AudioSpec::Null => paced::start(None, p, shutdown),
        AudioSpec::Auto => match jack::open_client(&p.id) {
            Ok(client) => jack::start(client, p, shutdown),
            Err(NodeError::NoJackServer { detail }) => {
                tracing::info!(
                    "no JACK server ({detail}); recording to WAV files in {DEFAULT_WAV_DIR}"
                );
                paced::start(Some(PathBuf::from(DEFAULT_WAV_DIR)), p, shutdown)
            }
            Err(e) => Err(e),
        },
    }
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
        let e = "alsa".parse::<AudioSpec>().unwrap_err().to_string();
        assert!(e.contains("\"alsa\"") && e.contains("wav:DIR"), "{e}");
        let e = "wav:".parse::<AudioSpec>().unwrap_err().to_string();
        assert!(e.contains("needs a directory"), "{e}");
        assert_eq!(
            "wav:out".parse::<AudioSpec>().unwrap().to_string(),
            "wav:out"
        );
    }
}
