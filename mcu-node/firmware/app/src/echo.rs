//! The stand-in service until the MCU session is wired in: every datagram on the node's port
//! comes back prefixed with the node id.

use core::fmt::Write as _;

use embassy_net::Stack;
use embassy_net::udp::{PacketMetadata, UdpSocket};

use crate::{NodeConfig, info};

/// Serves the echo on `config.port` forever.
pub async fn run(stack: Stack<'_>, config: &NodeConfig) -> ! {
    let mut rx_meta = [PacketMetadata::EMPTY; 4];
    let mut tx_meta = [PacketMetadata::EMPTY; 4];
    let mut rx_buf = [0u8; 1536];
    let mut tx_buf = [0u8; 1536];
    let mut socket = UdpSocket::new(stack, &mut rx_meta, &mut rx_buf, &mut tx_meta, &mut tx_buf);
    if let Err(e) = socket.bind(config.port) {
        panic!("bind udp {}: {:?}", config.port, e);
    }
    info!("fw: ready on udp port {}", config.port);
    let mut buf = [0u8; 1024];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let mut reply: heapless::String<1100> = heapless::String::new();
        let _ = write!(reply, "{} ", config.id);
        let _ = reply.push_str(core::str::from_utf8(&buf[..n]).unwrap_or("?"));
        let _ = socket.send_to(reply.as_bytes(), from.endpoint).await;
    }
}
