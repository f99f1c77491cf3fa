//! Finding nodes: mDNS browsing of [`discovery::NODE_SERVICE`], and the connectors that keep a
//! session up with every node found (or added by address).
//!
//! mDNS only says where a node is; whether it is alive comes from the session's heartbeats
//! (a killed node stays in mDNS caches until its record's TTL runs out). A node whose `proto`
//! TXT value differs from [`PROTOCOL_VERSION`] is listed with an error and never connected to.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use voicemesh_node::NetScope;
use voicemesh_protocol::{PROTOCOL_VERSION, discovery};

use crate::state::{NodeEntry, Shared};

/// Spawns and stops the per-address session connectors.
#[derive(Debug, Clone)]
pub(crate) struct Connectors {
    pub shared: Arc<Shared>,
    pub endpoint: quinn::Endpoint,
    pub tracker: TaskTracker,
    pub cancel: CancellationToken,
    running: Arc<Mutex<HashMap<SocketAddr, CancellationToken>>>,
}

impl Connectors {
    pub fn new(
        shared: Arc<Shared>,
        endpoint: quinn::Endpoint,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        Connectors {
            shared,
            endpoint,
            tracker,
            cancel,
            running: Arc::default(),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, CancellationToken>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a session with `addr` up (no-op if one is already kept).
    pub fn add(&self, addr: SocketAddr) {
        let mut running = self.running();
        if running.get(&addr).is_some_and(|t| !t.is_cancelled()) {
            return;
        }
        let token = self.cancel.child_token();
        running.insert(addr, token.clone());
        let (shared, ep) = (self.shared.clone(), self.endpoint.clone());
        self.tracker
            .spawn(crate::session::connector(shared, ep, addr, token));
    }

    /// Stops keeping a session with `addr`.
    pub fn remove(&self, addr: SocketAddr) {
        if let Some(t) = self.running().remove(&addr) {
            t.cancel();
        }
    }
}

/// Starts an mDNS daemon limited to the scope's interface.
pub(crate) fn mdns_daemon(scope: NetScope) -> Result<ServiceDaemon, mdns_sd::Error> {
    let mdns = ServiceDaemon::new()?;
    mdns.disable_interface(IfKind::All)?;
    match scope {
        NetScope::Loopback => mdns.enable_interface(IfKind::LoopbackV4)?,
        NetScope::Lan(ip) => mdns.enable_interface(IfKind::Addr(IpAddr::V4(ip)))?,
    }
    Ok(mdns)
}

/// Browses for nodes until `cancel`, handing each compatible one to `connectors`.
pub(crate) async fn browse(mdns: ServiceDaemon, connectors: Connectors, cancel: CancellationToken) {
    let rx = match mdns.browse(discovery::NODE_SERVICE) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!("mDNS browse of {} failed: {e}", discovery::NODE_SERVICE);
            let _ = mdns.shutdown();
            return;
        }
    };
    let mut by_name: HashMap<String, SocketAddr> = HashMap::new();
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            ev = rx.recv_async() => match ev {
                Ok(ev) => ev,
                Err(_) => break,
            },
        };
        match ev {
            ServiceEvent::ServiceResolved(s) => {
                let txt = |k: &str| s.get_property_val_str(k).map(str::to_owned);
                let id = txt("id").unwrap_or_else(|| s.get_fullname().to_owned());
                let role = txt("role").unwrap_or_default();
                if role != "node" {
                    tracing::debug!(%id, %role, "not a Linux node; ignored");
                    continue;
                }
                let port = txt("port")
                    .and_then(|p| p.parse::<u16>().ok())
                    .unwrap_or(s.get_port());
                let Some(ip) = s.get_addresses_v4().into_iter().min() else {
                    continue;
                };
                let addr = SocketAddr::new(IpAddr::V4(ip), port);
                let proto = txt("proto").unwrap_or_default();
                if proto != PROTOCOL_VERSION.to_string() {
                    let msg = format!(
                        "node {id} at {addr} speaks VoiceMesh protocol {proto:?}, this coordinator speaks {PROTOCOL_VERSION}: not connecting; upgrade the older side"
                    );
                    tracing::error!("{msg}");
                    let mut g = connectors.shared.lock();
                    g.nodes.insert(
                        id,
                        NodeEntry {
                            name: s.host.trim_end_matches('.').to_owned(),
                            role,
                            address: addr.to_string(),
                            voices: txt("voices").and_then(|v| v.parse().ok()).unwrap_or(0),
                            online: false,
                            status: None,
                            last_seen: None,
                            error: Some(msg),
                            session: None,
                        },
                    );
                    continue;
                }
                if let Some(old) = by_name.insert(s.get_fullname().to_owned(), addr)
                    && old != addr
                {
                    connectors.remove(old);
                }
                tracing::info!(%id, %addr, "node resolved");
                connectors.add(addr);
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                if let Some(addr) = by_name.remove(&fullname) {
                    tracing::info!(%fullname, %addr, "node withdrew its mDNS record");
                    connectors.remove(addr);
                }
            }
            _ => {}
        }
    }
    let _ = mdns.shutdown();
}
