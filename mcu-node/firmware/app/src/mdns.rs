//! The mDNS responder (edge-mdns): answers for `<id>._voicemesh._udp.local` with SRV, TXT
//! (`id`, `role=mcu`, `cv`, `proto`, `port`) and the A record of `<id>.local`, and announces
//! them when it starts.

use core::fmt::Write as _;
use core::net::{Ipv4Addr, Ipv6Addr};

use edge_mdns::HostAnswersMdnsHandler;
use edge_mdns::buf::VecBufAccess;
use edge_mdns::domain::base::Ttl;
use edge_mdns::host::{Host, Service, ServiceAnswers};
use edge_mdns::io::{IPV4_DEFAULT_SOCKET, Mdns};
use edge_nal::UdpSplit;
use edge_nal_embassy::{Udp, UdpBuffers};
use embassy_net::Stack;
use embassy_sync::blocking_mutex::raw::NoopRawMutex;
use embassy_sync::signal::Signal;
use heapless::String;

use crate::rng::XorShift;
use crate::{NodeConfig, info};

/// What the responder advertises besides the config.
#[derive(Debug, Clone, Copy)]
pub struct Advert {
    /// Number of CV channels the node drives.
    pub cv_channels: u8,
    /// Voice slots it plays.
    pub voices: u8,
    /// Wire protocol version.
    pub proto: u8,
}

/// Socket buffers for the responder's one UDP socket.
pub type MdnsBuffers = UdpBuffers<1, 1500, 1500, 2>;

/// Runs the responder on `stack`'s current IPv4 address until an I/O error; the caller
/// restarts it (for instance after a DHCP address change).
pub async fn run(
    stack: Stack<'_>,
    buffers: &MdnsBuffers,
    config: &NodeConfig,
    advert: Advert,
    seed: u64,
) {
    let Some(v4) = stack.config_v4() else {
        info!("mdns: no IPv4 address");
        return;
    };
    let ip = v4.address.address();
    let udp = Udp::new(stack, buffers);
    let mut socket =
        match edge_mdns::io::bind(&udp, IPV4_DEFAULT_SOCKET, Some(Ipv4Addr::UNSPECIFIED), None)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                info!("mdns: bind failed: {:?}", e);
                return;
            }
        };
    let (recv, send) = socket.split();
    let mut cv: String<4> = String::new();
    let mut voices: String<4> = String::new();
    let _ = write!(voices, "{}", advert.voices);
    let mut proto: String<4> = String::new();
    let mut port: String<6> = String::new();
    let _ = write!(cv, "{}", advert.cv_channels);
    let _ = write!(proto, "{}", advert.proto);
    let _ = write!(port, "{}", config.port);
    let txt = [
        ("id", config.id.as_str()),
        ("role", voicemesh_mcu::ROLE),
        ("cv", cv.as_str()),
        ("voices", voices.as_str()),
        ("proto", proto.as_str()),
        ("port", port.as_str()),
    ];
    let host = Host {
        hostname: config.id.as_str(),
        ipv4: ip,
        ipv6: Ipv6Addr::UNSPECIFIED,
        ttl: Ttl::from_secs(120),
    };
    let service = Service {
        name: config.id.as_str(),
        priority: 0,
        weight: 0,
        service: "_voicemesh",
        protocol: "_udp",
        port: config.port,
        service_subtypes: &[],
        txt_kvs: &txt,
    };
    let (rx_buf, tx_buf) = (
        VecBufAccess::<NoopRawMutex, 1500>::new(),
        VecBufAccess::<NoopRawMutex, 1500>::new(),
    );
    let signal = Signal::<NoopRawMutex, ()>::new();
    let mdns = Mdns::new(
        Some(Ipv4Addr::UNSPECIFIED),
        None,
        recv,
        send,
        &rx_buf,
        &tx_buf,
        XorShift::new(seed),
        &signal,
    );
    info!(
        "mdns: advertising {}._voicemesh._udp.local at {}:{}",
        config.id, ip, config.port
    );
    if let Err(e) = mdns
        .run(HostAnswersMdnsHandler::new(ServiceAnswers::new(
            &host, &service,
        )))
        .await
    {
        info!("mdns: stopped: {:?}", e);
    }
}
