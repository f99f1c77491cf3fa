//! The coordinator's own mDNS advertisement (DESIGN.md §5): `_voicemesh-coord._udp`, and the
//! standard service types controllers browse for — `_osc._udp` (OSC over UDP), `_oscjson._tcp`
//! (OSCQuery), `_http._tcp` (the dashboard) and, when an RTP-MIDI session listener runs,
//! `_apple-midi._udp`.
//!
//! The records are served by the project's own responder ([`voicemesh_node::mdns::advertise`]),
//! which sends nothing outside the interface the [`NetScope`] names: in loopback scope the
//! services are published on 127.0.0.1 only, and only `--lan` puts them on the LAN. A service is
//! published only if it can be reached at the address the A record names: its socket is bound to
//! that address or to the unspecified address (a service bound to 127.0.0.1 in LAN scope is not
//! advertised, and a line in the log says so).
//!
//! To publish another service, add an [`AdvertisedService`] to the list [`services`] returns
//! (see [`Ports`]); everything else — instance and host names, scope, goodbye on shutdown —
//! follows from there.

use std::net::{IpAddr, SocketAddr};

use tokio_util::sync::CancellationToken;
use voicemesh_node::NetScope;
use voicemesh_node::mdns::{self, Advertisement, MdnsError, ServiceInstance};
use voicemesh_protocol::PROTOCOL_VERSION;
use voicemesh_protocol::discovery::COORDINATOR_SERVICE;

/// DNS-SD type of OSC over UDP.
pub const OSC_UDP_SERVICE: &str = "_osc._udp.local.";
/// DNS-SD type of an OSCQuery HTTP server.
pub const OSCQUERY_SERVICE: &str = "_oscjson._tcp.local.";
/// DNS-SD type of a web page.
pub const HTTP_SERVICE: &str = "_http._tcp.local.";
/// DNS-SD type of an AppleMIDI (RTP-MIDI) session; the SRV port is the control port.
pub const APPLE_MIDI_SERVICE: &str = "_apple-midi._udp.local.";

/// One service to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdvertisedService {
    /// DNS-SD service type, e.g. [`OSC_UDP_SERVICE`].
    pub service_type: &'static str,
    /// Where the service's socket is bound (its port goes into the SRV record).
    pub bound: SocketAddr,
    /// TXT key/value pairs.
    pub txt: Vec<(String, String)>,
}

/// The sockets of the coordinator's services, as bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ports {
    /// HTTP API and dashboard.
    pub http: Option<SocketAddr>,
    /// OSC over UDP.
    pub osc_udp: Option<SocketAddr>,
    /// OSC over TCP (SLIP).
    pub osc_tcp: Option<SocketAddr>,
    /// OSCQuery HTTP server.
    pub oscquery: Option<SocketAddr>,
    /// RTP-MIDI control port (the data port is the next one), when RTP-MIDI is on.
    pub apple_midi: Option<SocketAddr>,
}

/// The services the coordinator publishes for `ports`. `_voicemesh-coord._udp` carries the
/// other ports in its TXT record (`id`, `proto`, `http`, `osc`, `osc_tcp`, `oscquery`,
/// `apple_midi`, each only when present) and the OSC UDP port as its SRV port.
pub fn services(id: &str, ports: &Ports) -> Vec<AdvertisedService> {
    let mut out = Vec::new();
    let mut coord_txt = vec![
        ("id".to_owned(), id.to_owned()),
        ("proto".to_owned(), PROTOCOL_VERSION.to_string()),
    ];
    for (key, addr) in [
        ("http", ports.http),
        ("osc", ports.osc_udp),
        ("osc_tcp", ports.osc_tcp),
        ("oscquery", ports.oscquery),
        ("apple_midi", ports.apple_midi),
    ] {
        if let Some(a) = addr {
            coord_txt.push((key.to_owned(), a.port().to_string()));
        }
    }
    let coord_port = ports.osc_udp.or(ports.http);
    if let Some(bound) = coord_port {
        out.push(AdvertisedService {
            service_type: COORDINATOR_SERVICE,
            bound,
            txt: coord_txt,
        });
    }
    if let Some(bound) = ports.osc_udp {
        out.push(AdvertisedService {
            service_type: OSC_UDP_SERVICE,
            bound,
            txt: Vec::new(),
        });
    }
    if let Some(bound) = ports.oscquery {
        out.push(AdvertisedService {
            service_type: OSCQUERY_SERVICE,
            bound,
            txt: Vec::new(),
        });
    }
    if let Some(bound) = ports.http {
        // The dashboard needs the access token; the path is where it lives.
        out.push(AdvertisedService {
            service_type: HTTP_SERVICE,
            bound,
            txt: vec![("path".to_owned(), "/".to_owned())],
        });
    }
    if let Some(bound) = ports.apple_midi {
        out.push(AdvertisedService {
            service_type: APPLE_MIDI_SERVICE,
            bound,
            txt: Vec::new(),
        });
    }
    out
}

/// Whether a socket bound to `bound` is reachable at the address `scope` advertises.
pub fn reachable(scope: NetScope, bound: SocketAddr) -> bool {
    match bound.ip() {
        IpAddr::V4(ip) => ip.is_unspecified() || ip == scope.multicast_if(),
        IpAddr::V6(ip) => ip.is_unspecified(),
    }
}

/// The DNS-SD instances for `services` in `scope`: one instance name for all of them
/// (`VoiceMesh <id>`), on host `vmc-<id>.local.`. Services not [`reachable`] are left out.
pub fn instances(
    id: &str,
    scope: NetScope,
    services: &[AdvertisedService],
) -> Vec<ServiceInstance> {
    let host: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(58)
        .collect();
    let instance: String = format!("VoiceMesh {id}").chars().take(63).collect();
    services
        .iter()
        .filter(|s| {
            let ok = reachable(scope, s.bound);
            if !ok {
                tracing::info!(
                    "not advertising {} on {}: bound to {}",
                    s.service_type,
                    scope.multicast_if(),
                    s.bound
                );
            }
            ok
        })
        .map(|s| ServiceInstance {
            service_type: s.service_type.to_owned(),
            instance: instance.clone(),
            host: format!("vmc-{host}"),
            port: s.bound.port(),
            txt: s.txt.clone(),
        })
        .collect()
}

/// Publishes `services` until `cancel` (then sends the goodbye).
pub fn start(
    id: &str,
    scope: NetScope,
    services: &[AdvertisedService],
    cancel: CancellationToken,
) -> Result<Advertisement, MdnsError> {
    mdns::advertise(scope, instances(id, scope, services), cancel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn at(ip: [u8; 4], port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from((ip, port)))
    }

    #[test]
    fn every_port_becomes_a_service_and_a_txt_key() {
        let ports = Ports {
            http: at([127, 0, 0, 1], 7400),
            osc_udp: at([127, 0, 0, 1], 9000),
            osc_tcp: at([127, 0, 0, 1], 9000),
            oscquery: at([127, 0, 0, 1], 9001),
            apple_midi: at([127, 0, 0, 1], 5004),
        };
        let s = services("c1", &ports);
        let types: Vec<_> = s.iter().map(|s| (s.service_type, s.bound.port())).collect();
        assert_eq!(
            types,
            [
                (COORDINATOR_SERVICE, 9000),
                (OSC_UDP_SERVICE, 9000),
                (OSCQUERY_SERVICE, 9001),
                (HTTP_SERVICE, 7400),
                (APPLE_MIDI_SERVICE, 5004)
            ]
        );
        let txt: Vec<_> = s[0].txt.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            txt,
            [
                "id=c1".to_string(),
                format!("proto={PROTOCOL_VERSION}"),
                "http=7400".into(),
                "osc=9000".into(),
                "osc_tcp=9000".into(),
                "oscquery=9001".into(),
                "apple_midi=5004".into()
            ]
        );
        // Without RTP-MIDI there is no _apple-midi._udp.
        let none = services(
            "c1",
            &Ports {
                apple_midi: None,
                ..ports
            },
        );
        assert!(none.iter().all(|s| s.service_type != APPLE_MIDI_SERVICE));
    }

    #[test]
    fn only_services_reachable_in_the_scope_are_published() {
        let ports = Ports {
            http: at([127, 0, 0, 1], 7400),
            osc_udp: at([0, 0, 0, 0], 9000),
            oscquery: at([192, 168, 1, 5], 9001),
            ..Ports::default()
        };
        let s = services("my.coord", &ports);
        let lan = NetScope::Lan(Ipv4Addr::new(192, 168, 1, 5));
        let got: Vec<_> = instances("my.coord", lan, &s)
            .into_iter()
            .map(|i| i.service_type)
            .collect();
        assert_eq!(
            got,
            [COORDINATOR_SERVICE, OSC_UDP_SERVICE, OSCQUERY_SERVICE],
            "the loopback-bound dashboard is not published on the LAN"
        );
        let lo = instances("my.coord", NetScope::Loopback, &s);
        let got: Vec<_> = lo.iter().map(|i| i.service_type.as_str()).collect();
        assert_eq!(
            got,
            [COORDINATOR_SERVICE, OSC_UDP_SERVICE, HTTP_SERVICE],
            "a LAN-bound socket is not published in loopback scope"
        );
        assert_eq!(lo[0].host, "vmc-my-coord");
        assert_eq!(lo[0].instance, "VoiceMesh my.coord");
    }
}
