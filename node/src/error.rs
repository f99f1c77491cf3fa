//! Why a node could not start or stopped with an error.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Failure of [`crate::start`] or of a node's task, naming what was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The configuration cannot work.
    #[error("invalid node configuration: {0}")]
    Config(String),
    /// The QUIC control port could not be bound.
    #[error(
        "cannot bind the QUIC control port {addr} (port in use? use --quic-port 0 for any): {source}"
    )]
    QuicBind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS certificate or configuration could not be built.
    #[error("cannot set up TLS for the QUIC control port: {0}")]
    Tls(String),
    /// `--audio jack` but no JACK server answered.
    #[error("no JACK server running (start jackd or use --audio wav:DIR or null): {detail}")]
    NoJackServer {
        /// What libjack said.
        detail: String,
    },
    /// `--audio jack`, but libjack cannot be loaded (jackd2 is not installed).
    #[error(
        "JACK is not installed ({detail}): install jackd2 (Debian: apt install jackd2), or use \
         --audio alsa, wav:DIR or null"
    )]
    JackNotInstalled {
        /// What loading libjack said.
        detail: String,
    },
    /// The JACK server answered but a client, port or activation failed.
    #[error("JACK: {0}")]
    Jack(String),
    /// `--audio alsa[:DEVICE]`: the ALSA device could not be found or opened.
    #[error(
        "cannot open ALSA output device {device:?}: {detail} (no sound card? use --audio jack \
         with a JACK server, --audio wav:DIR to record, or --audio null)"
    )]
    Alsa {
        /// The ALSA PCM name asked for (`default` when none was given).
        device: String,
        /// What ALSA said.
        detail: String,
    },
    /// The WAV output directory cannot be created or written.
    #[error("cannot write WAV output in {dir}: {source}")]
    WavDir {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Writing the WAV file or its JSON sidecar failed while running or at shutdown.
    #[error("writing {path}: {detail}")]
    WavWrite {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The audio thread could not be started or died.
    #[error("audio thread: {0}")]
    AudioThread(String),
    /// The mDNS advertisement could not be set up.
    #[error("mDNS advertisement: {0}")]
    Mdns(String),
    /// The PTP slave stopped with an error.
    #[error("PTP slave: {0}")]
    Ptp(#[from] crate::clock::ptp::PtpError),
    /// A task of the node panicked or was cancelled abnormally.
    #[error("node task {task} ended abnormally: {detail}")]
    Task {
        /// Which task.
        task: &'static str,
        /// The join error.
        detail: String,
    },
}
