//! Finding nodes: mDNS browsing of [`discovery::NODE_SERVICE`], and the connectors that keep a
//! session up with every node found (or added by address): a QUIC session with a Linux node
//! (`role=node`), a UDP link with an MCU node (`role=mcu`, crate::mcu).
//!
//! mDNS only says where a node is; whether it is alive comes from the session's heartbeats
//! (a killed node stays in mDNS caches until its record's TTL runs out). A node whose `proto`
//! TXT value differs from [`PROTOCOL_VERSION`] is listed with an error and never connected to.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use voicemesh_node::NetScope;
use voicemesh_node::mdns::{self, BrowseEvent};
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

    /// Keeps a link with the MCU node at `addr` up (no-op if one is already kept): UDP
    /// datagrams from a socket in the endpoint's scope (crate::mcu).
    pub fn add_mcu(&self, addr: SocketAddr) {
        let mut running = self.running();
        if running.get(&addr).is_some_and(|t| !t.is_cancelled()) {
            return;
        }
        let bind = match self.endpoint.local_addr() {
            Ok(a) => a.ip(),
            Err(e) => {
                tracing::error!(%addr, "no local address for an MCU link: {e}");
                return;
            }
        };
        let token = self.cancel.child_token();
        running.insert(addr, token.clone());
        self.tracker
            .spawn(crate::mcu::run(self.shared.clone(), addr, bind, token));
    }

    /// Stops keeping a session with `addr`.
    pub fn remove(&self, addr: SocketAddr) {
        if let Some(t) = self.running().remove(&addr) {
            t.cancel();
        }
    }
}

/// Starts browsing for nodes in `scope` (the browser's socket joins the mDNS group on the
/// scope's interface only) until `cancel`.
pub(crate) fn start_browser(
    scope: NetScope,
    cancel: CancellationToken,
) -> Result<mpsc::Receiver<BrowseEvent>, mdns::MdnsError> {
    mdns::browse(scope, discovery::NODE_SERVICE, cancel)
}

/// Hands each compatible node the browser reports to `connectors`, until `cancel` or the end
/// of the events.
pub(crate) async fn browse(
    mut events: mpsc::Receiver<BrowseEvent>,
    connectors: Connectors,
    cancel: CancellationToken,
) {
    let mut by_name: HashMap<String, SocketAddr> = HashMap::new();
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            ev = events.recv() => match ev {
                Some(ev) => ev,
                None => break,
            },
        };
        match ev {
            BrowseEvent::Resolved(s) | BrowseEvent::Updated(s) => {
                let txt = |k: &str| s.txt(k).map(str::to_owned);
                let id = txt("id").unwrap_or_else(|| s.instance.clone());
                let role = txt("role").unwrap_or_default();
                if role != "node" && role != "mcu" {
                    tracing::debug!(%id, %role, "unknown role; ignored");
                    continue;
                }
                let port = txt("port")
                    .and_then(|p| p.parse::<u16>().ok())
                    .unwrap_or(s.port);
                let Some(ip) = s.addrs.iter().min().copied() else {
                    continue;
                };
                let addr = SocketAddr::new(IpAddr::V4(ip), port);
                let proto = txt("proto").unwrap_or_default();
                if proto != PROTOCOL_VERSION.to_string() {
                    let msg = format!(
                        "node {id} at {addr} speaks VoiceMesh protocol {proto:?}, this coordinator speaks {PROTOCOL_VERSION}: not connecting; upgrade the older side"
                    );
                    tracing::error!("{msg}");
                    if let Some(old) = by_name.remove(&s.instance) {
                        connectors.remove(old);
                    }
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
                if let Some(old) = by_name.insert(s.instance.clone(), addr)
                    && old != addr
                {
                    connectors.remove(old);
                }
                tracing::info!(%id, %addr, %role, "node resolved");
                if role == "mcu" {
                    connectors.add_mcu(addr);
                } else {
                    connectors.add(addr);
                }
            }
            BrowseEvent::Removed { instance } => {
                if let Some(addr) = by_name.remove(&instance) {
                    tracing::info!(%instance, %addr, "node withdrew its mDNS record");
                    connectors.remove(addr);
                }
            }
        }
    }
}
