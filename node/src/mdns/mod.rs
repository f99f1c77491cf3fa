//! mDNS/DNS-SD (RFC 6762, RFC 6763): the node's advertisement of `_voicemesh._udp.local.`, and
//! the browser the coordinator finds nodes with.
//!
//! A small implementation of our own instead of a general mDNS crate, because of one
//! requirement: in loopback scope nothing may leave the loopback interface, not even an IGMP
//! membership report. Every socket here joins 224.0.0.251 on exactly one interface, the one
//! [`NetScope::multicast_if`] names (127.0.0.1 in loopback scope), sends from it
//! (IP_MULTICAST_IF) and receives only that membership (IP_MULTICAST_ALL off). See
//! docs/discovery.md.
//!
//! Layers: [`wire`] is the DNS message codec; [`responder::Responder`] and
//! [`browser::Browser`] are sans-IO cores (time is a number of milliseconds passed in); this
//! module adds the tokio glue: [`advertise`] and [`browse`] each run one task with one socket
//! bound to port 5353 with SO_REUSEPORT, so several VoiceMesh processes and other mDNS
//! software (python zeroconf, avahi) share the port on one host.

pub mod browser;
pub mod responder;
pub mod wire;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use voicemesh_protocol::discovery::NODE_SERVICE;

use crate::net::NetScope;
pub use browser::{BrowseEvent, Browser, ResolvedService};
pub use responder::{BadName, Destination, Responder, Transmit};

/// The mDNS UDP port.
pub const MDNS_PORT: u16 = 5353;
/// The mDNS IPv4 multicast group.
pub const MDNS_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
/// Events a [`browse`] channel holds before the browser waits for its reader.
const EVENT_QUEUE: usize = 64;
/// Largest datagram read (RFC 6762 §17: 9000 bytes).
const MAX_DATAGRAM: usize = 9000;

/// Why mDNS could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MdnsError {
    /// The socket could not be set up.
    #[error("mDNS socket on interface {interface}: {what}: {source}")]
    Socket {
        /// The interface address the socket was meant for.
        interface: Ipv4Addr,
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A name that DNS cannot carry.
    #[error(transparent)]
    BadName(#[from] BadName),
    /// Called outside a tokio runtime.
    #[error("mDNS needs a tokio runtime")]
    NoRuntime,
}

/// One DNS-SD service instance to advertise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInstance {
    /// Service type, e.g. `_voicemesh._udp.local.`.
    pub service_type: String,
    /// Instance label, e.g. the node id (any UTF-8 of at most 63 bytes, dots allowed).
    pub instance: String,
    /// Host label; the host name is `<host>.local.`.
    pub host: String,
    /// SRV port.
    pub port: u16,
    /// TXT key/value pairs, in order.
    pub txt: Vec<(String, String)>,
}

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
        self.properties_as(voicemesh_protocol::Role::Node)
    }

    /// [`Self::properties`] of a member of `role` (the MCU simulator advertises `role=mcu`).
    pub fn properties_as(&self, role: voicemesh_protocol::Role) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("role", role.as_str().to_string()),
            ("voices", self.voices.to_string()),
            ("cv", self.cv.to_string()),
            ("proto", voicemesh_protocol::PROTOCOL_VERSION.to_string()),
            ("engines", self.engines.join(",")),
            ("port", self.port.to_string()),
        ]
    }

    /// The node's `_voicemesh._udp.local.` instance: named by its id, on host
    /// `vm-<id>.local.`, SRV port = QUIC port.
    pub fn instance(&self) -> ServiceInstance {
        self.instance_as(voicemesh_protocol::Role::Node)
    }

    /// [`Self::instance`] of a member of `role`; for an MCU the SRV port is its UDP port.
    pub fn instance_as(&self, role: voicemesh_protocol::Role) -> ServiceInstance {
        ServiceInstance {
            service_type: NODE_SERVICE.to_owned(),
            instance: self.id.clone(),
            host: format!("vm-{}", host_label(&self.id)),
            port: self.port,
            txt: self
                .properties_as(role)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        }
    }
}

/// A DNS label made of the id's letters, digits and dashes.
fn host_label(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(60)
        .collect();
    if s.is_empty() { "node".into() } else { s }
}

/// A running advertisement; see [`advertise`].
#[derive(Debug)]
pub struct Advertisement {
    fullnames: Vec<String>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Advertisement {
    /// The full DNS-SD name of the first instance.
    pub fn fullname(&self) -> &str {
        self.fullnames.first().map_or("", String::as_str)
    }

    /// The full DNS-SD names of all instances.
    pub fn fullnames(&self) -> &[String] {
        &self.fullnames
    }

    /// Sends the goodbye (every record with TTL 0) and returns once it has been sent.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::warn!("mDNS responder task ended abnormally: {e}");
        }
    }
}

/// Advertises `instances` at the scope's address until `cancel` is cancelled or
/// [`Advertisement::stop`] is called; both send a goodbye. Announces twice, 1 s apart, then
/// answers queries. Must be called inside a tokio runtime.
pub fn advertise(
    scope: NetScope,
    instances: Vec<ServiceInstance>,
    cancel: CancellationToken,
) -> Result<Advertisement, MdnsError> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| MdnsError::NoRuntime)?;
    let core = Responder::new(&instances, scope.multicast_if())?;
    let sock = {
        let _g = handle.enter();
        mdns_socket(scope)?
    };
    let fullnames = instances
        .iter()
        .map(|i| {
            wire::Name::parse(&i.service_type)
                .and_then(|s| s.child(i.instance.as_bytes()))
                .map(|n| n.to_string())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>();
    for f in &fullnames {
        tracing::info!("advertising {f} on {}", scope.multicast_if());
    }
    let stop = cancel.child_token();
    let task = handle.spawn(run_responder(sock, scope, core, stop.clone()));
    Ok(Advertisement {
        fullnames,
        stop,
        task,
    })
}

/// Browses for `service_type` (e.g. `_voicemesh._udp.local.`) in `scope` until `cancel` is
/// cancelled or the receiver is dropped. Must be called inside a tokio runtime.
pub fn browse(
    scope: NetScope,
    service_type: &str,
    cancel: CancellationToken,
) -> Result<mpsc::Receiver<BrowseEvent>, MdnsError> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| MdnsError::NoRuntime)?;
    let epoch = Instant::now();
    let core = Browser::new(service_type, 0)?;
    let sock = {
        let _g = handle.enter();
        mdns_socket(scope)?
    };
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    handle.spawn(run_browser(sock, scope, core, epoch, tx, cancel));
    Ok(rx)
}

/// A UDP socket on port 5353 that has joined 224.0.0.251 on the scope's interface only and
/// multicasts from it (TTL 255, loopback on). Bound to the group address, or to 0.0.0.0 where
/// that fails; SO_REUSEADDR and SO_REUSEPORT let other mDNS software share the port.
/// IP_MULTICAST_ALL is off, so the socket does not receive groups that other sockets of the
/// host joined on other interfaces. Must be called inside a tokio runtime.
pub fn mdns_socket(scope: NetScope) -> Result<UdpSocket, MdnsError> {
    let iface = scope.multicast_if();
    let err = |what: &'static str| {
        move |source| MdnsError::Socket {
            interface: iface,
            what,
            source,
        }
    };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err("socket"))?;
    s.set_reuse_address(true).map_err(err("SO_REUSEADDR"))?;
    s.set_reuse_port(true).map_err(err("SO_REUSEPORT"))?;
    s.set_multicast_all_v4(false)
        .map_err(err("IP_MULTICAST_ALL"))?;
    if s.bind(&SocketAddrV4::new(MDNS_GROUP, MDNS_PORT).into())
        .is_err()
    {
        s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, MDNS_PORT).into())
            .map_err(err("bind port 5353"))?;
    }
    s.join_multicast_v4(&MDNS_GROUP, &iface)
        .map_err(err("join 224.0.0.251"))?;
    s.set_multicast_if_v4(&iface)
        .map_err(err("IP_MULTICAST_IF"))?;
    s.set_multicast_loop_v4(true)
        .map_err(err("IP_MULTICAST_LOOP"))?;
    s.set_multicast_ttl_v4(255)
        .map_err(err("IP_MULTICAST_TTL"))?;
    s.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
    UdpSocket::from_std(s.into()).map_err(err("register with tokio"))
}

/// Whether a datagram from `from` may be handled: in loopback scope only loopback sources.
fn accept_source(scope: NetScope, from: SocketAddr) -> bool {
    match scope {
        NetScope::Loopback => from.ip().is_loopback(),
        NetScope::Lan(_) => true,
    }
}

fn millis(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

async fn sleep_until_ms(epoch: Instant, ms: Option<u64>) {
    match ms {
        Some(ms) => tokio::time::sleep_until(epoch + Duration::from_millis(ms)).await,
        None => std::future::pending().await,
    }
}

async fn send(sock: &UdpSocket, payload: &[u8], to: SocketAddr) {
    if let Err(e) = sock.send_to(payload, to).await {
        tracing::warn!("mDNS send to {to} failed: {e}");
    }
}

const GROUP_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(MDNS_GROUP), MDNS_PORT);

/// Pauses after a receive error so a persistent one cannot spin the task.
const RECV_ERROR_PAUSE: Duration = Duration::from_millis(100);

async fn run_responder(
    sock: UdpSocket,
    scope: NetScope,
    mut core: Responder,
    stop: CancellationToken,
) {
    let epoch = Instant::now();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    core.start(0);
    loop {
        while let Some(t) = core.poll_transmit() {
            let to = match t.destination {
                Destination::Multicast => GROUP_ADDR,
                Destination::Unicast(a) => a,
            };
            send(&sock, &t.payload, to).await;
        }
        let deadline = core.poll_timeout();
        tokio::select! {
            _ = stop.cancelled() => break,
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, from)) if accept_source(scope, from) => {
                    if let Some(t) = core.handle_query(millis(epoch), &buf[..n], from) {
                        let to = match t.destination {
                            Destination::Multicast => GROUP_ADDR,
                            Destination::Unicast(a) => a,
                        };
                        send(&sock, &t.payload, to).await;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("mDNS receive failed: {e}");
                    tokio::time::sleep(RECV_ERROR_PAUSE).await;
                }
            },
            _ = sleep_until_ms(epoch, deadline) => core.handle_timeout(millis(epoch)),
        }
    }
    core.stop();
    while let Some(t) = core.poll_transmit() {
        send(&sock, &t.payload, GROUP_ADDR).await;
    }
    tracing::debug!(stats = ?core.stats(), "mDNS responder stopped");
}

async fn run_browser(
    sock: UdpSocket,
    scope: NetScope,
    mut core: Browser,
    epoch: Instant,
    tx: mpsc::Sender<BrowseEvent>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        while let Some(q) = core.poll_transmit() {
            send(&sock, &q, GROUP_ADDR).await;
        }
        while let Some(ev) = core.poll_event() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = tx.send(ev) => if r.is_err() { return },
            }
        }
        let deadline = core.poll_timeout();
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tx.closed() => break,
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, from)) if accept_source(scope, from) => {
                    core.handle_packet(millis(epoch), &buf[..n], from);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("mDNS receive failed: {e}");
                    tokio::time::sleep(RECV_ERROR_PAUSE).await;
                }
            },
            _ = sleep_until_ms(epoch, deadline) => core.handle_timeout(millis(epoch)),
        }
    }
    tracing::debug!(stats = ?core.stats(), "mDNS browser stopped");
}
