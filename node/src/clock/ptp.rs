//! PTP glue (statime): the grandmaster on the coordinator, a slave on every node.
//!
//! (Interface fixed by the foundation; the implementation is being written.)

use super::ClusterClock;
use crate::net::NetScope;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use tokio_util::sync::CancellationToken;

/// Where and how PTP runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PtpConfig {
    /// UDP port of event messages (Sync, Delay_Req); 319 in standard PTP.
    pub event_port: u16,
    /// UDP port of general messages (Announce, Follow_Up, Delay_Resp); 320 in standard PTP.
    pub general_port: u16,
    /// PTP domain number.
    pub domain: u8,
    /// Which interface the multicast traffic uses.
    pub scope: NetScope,
}

impl Default for PtpConfig {
    fn default() -> Self {
        PtpConfig {
            event_port: voicemesh_protocol::discovery::DEFAULT_PTP_EVENT_PORT,
            general_port: voicemesh_protocol::discovery::DEFAULT_PTP_GENERAL_PORT,
            domain: 0,
            scope: NetScope::Loopback,
        }
    }
}

/// What a PTP slave reports, shared with the control session (wait-free reads).
#[derive(Debug, Default)]
pub struct PtpStatus {
    offset_ns: AtomicI64,
    path_delay_ns: AtomicI64,
    locked: AtomicBool,
}

impl PtpStatus {
    /// Latest measured offset of the local cluster clock from the grandmaster, in ns.
    pub fn offset_ns(&self) -> i64 {
        self.offset_ns.load(Ordering::Relaxed)
    }
    /// Latest mean path delay to the grandmaster, in ns.
    pub fn path_delay_ns(&self) -> i64 {
        self.path_delay_ns.load(Ordering::Relaxed)
    }
    /// Whether the slave follows a grandmaster.
    pub fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }
}

/// Why PTP could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PtpError {
    /// A socket could not be opened (port in use, no such interface, no permission).
    #[error("PTP socket on port {port}: {source}")]
    Socket {
        /// The port.
        port: u16,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Runs the grandmaster until `shutdown`. `clock` is the coordinator's clock (never steered).
pub async fn run_grandmaster(
    cfg: PtpConfig,
    clock: Arc<ClusterClock>,
    shutdown: CancellationToken,
) -> Result<(), PtpError> {
    let _ = (cfg, clock);
    shutdown.cancelled().await;
    Ok(())
}

/// Runs a slave until `shutdown`, disciplining `clock` and reporting into `status`.
pub async fn run_slave(
    cfg: PtpConfig,
    clock: Arc<ClusterClock>,
    status: Arc<PtpStatus>,
    shutdown: CancellationToken,
) -> Result<(), PtpError> {
    let _ = (cfg, clock, status);
    shutdown.cancelled().await;
    Ok(())
}
