//! The node's mDNS/DNS-SD advertisement (`_voicemesh._udp.local.`).
//!
//! In loopback scope the responder is restricted to IPv4 loopback (`disable_interface(All)`
//! then `enable_interface(LoopbackV4)`) and advertises 127.0.0.1, so nothing reaches a real
//! interface; in LAN scope it advertises the LAN address. [`Advertisement::stop`] unregisters
//! (a goodbye packet) and stops the responder.

use crate::error::NodeError;
use crate::net::NetScope;
use mdns_sd::{IfKind, ServiceDaemon, ServiceInfo};
use std::time::Duration;
use voicemesh_protocol::discovery::NODE_SERVICE;

/// What the TXT record says about a node.
#[derive(Debug, Clone)]
pub struct NodeTxt {
    /// Node id (also the instance name).
    pub id: String,
    /// Voice pool size.
    pub voices: u16,
    /// CV channels (0 on a Linux node).
    pub cv: u16,
    /// Engine names.
    pub engines: Vec<String>,
    /// QUIC control port.
    pub port: u16,
}

impl NodeTxt {
    /// The TXT key/value pairs, in [`voicemesh_protocol::discovery::TXT_KEYS`] order.
    pub fn properties(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("role", "node".to_string()),
            ("voices", self.voices.to_string()),
            ("cv", self.cv.to_string()),
            ("proto", voicemesh_protocol::PROTOCOL_VERSION.to_string()),
            ("engines", self.engines.join(",")),
            ("port", self.port.to_string()),
        ]
    }
}

/// A registered advertisement.
pub struct Advertisement {
    daemon: ServiceDaemon,
    fullname: String,
}

/// A DNS label made of the id's letters, digits and dashes.
fn host_label(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    if s.is_empty() { "node".into() } else { s }
}

/// Advertises the node in `scope`.
pub fn advertise(scope: NetScope, txt: &NodeTxt) -> Result<Advertisement, NodeError> {
    let err = |what: &str, e: mdns_sd::Error| NodeError::Mdns(format!("{what}: {e}"));
    let daemon = ServiceDaemon::new().map_err(|e| err("cannot start the mDNS responder", e))?;
    if scope == NetScope::Loopback {
        daemon
            .disable_interface(IfKind::All)
            .map_err(|e| err("disable interfaces", e))?;
        daemon
            .enable_interface(IfKind::LoopbackV4)
            .map_err(|e| err("enable IPv4 loopback", e))?;
    } else {
        daemon
            .disable_interface(IfKind::All)
            .map_err(|e| err("disable interfaces", e))?;
        daemon
            .enable_interface(IfKind::Addr(scope.advertised_ip()))
            .map_err(|e| err("enable the LAN interface", e))?;
    }
    let host = format!("vm-{}.local.", host_label(&txt.id));
    let info = ServiceInfo::new(
        NODE_SERVICE,
        &txt.id,
        &host,
        scope.advertised_ip(),
        txt.port,
        &txt.properties()[..],
    )
    .map_err(|e| err(&format!("bad service record for node id {:?}", txt.id), e))?;
    let fullname = info.get_fullname().to_string();
    daemon
        .register(info)
        .map_err(|e| err("cannot register the service", e))?;
    tracing::info!("advertising {fullname} on {}", scope.advertised_ip());
    Ok(Advertisement { daemon, fullname })
}

impl std::fmt::Debug for Advertisement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Advertisement")
            .field("fullname", &self.fullname)
            .finish_non_exhaustive()
    }
}

impl Advertisement {
    /// The full DNS-SD instance name.
    pub fn fullname(&self) -> &str {
        &self.fullname
    }

    /// Unregisters (sends goodbyes) and stops the responder. Blocks up to about 2 s.
    pub fn stop(self) {
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
    }
}
