//! The node's UDP service: the `voicemesh-mcu` core (session, clock servo, CV engine) driven
//! by embassy-net and embassy-time, its DAC operations performed by the board's DACs.
//!
//! Local time is embassy's monotonic clock in nanoseconds (1 µs resolution). The loop waits
//! for a datagram or the core's next deadline, hands either to the core, then performs every
//! DAC operation the core asks for (pitch before gate: the core orders them) and sends what it
//! has for the coordinator — the address the core recognised as the coordinator's.

use embassy_futures::select::{Either, select};
use embassy_net::udp::{PacketMetadata, UdpSocket};
use embassy_net::{IpEndpoint, Stack};
use embassy_time::{Instant, Timer};
use voicemesh_mcu::servo::ClockServo;
use voicemesh_mcu::{DacOp, LocalTime, McuConfig, McuNode};
use voicemesh_protocol::datagram::MAX_DATAGRAM_LEN;

use crate::{NodeConfig, info};

/// Datagrams the session socket holds before the loop reads them.
const RX_SLOTS: usize = 48;
/// Bytes the session socket holds (the coordinator's datagrams are mostly under 200 bytes).
const RX_BYTES: usize = 16 * 1024;

/// The board's DACs, addressed as the core numbers them (`McuConfig::dacs` order).
#[allow(async_fn_in_trait, reason = "static dispatch on one executor")]
pub trait DacBank {
    /// Initialises DAC `dac` (with the driver's retries); `false` = failed.
    async fn init(&mut self, dac: u8) -> bool;
    /// Writes `code` to `channel` of DAC `dac`; `false` = failed. `at` is the local time of
    /// the write, for logs.
    async fn write(&mut self, dac: u8, channel: u8, code: u16, at: LocalTime) -> bool;
}

/// The local clock the core runs on.
pub fn now() -> LocalTime {
    LocalTime(Instant::now().as_micros().saturating_mul(1_000))
}

/// Runs the node on `config.port` forever, its cluster time kept by `servo`.
pub async fn run<B: DacBank>(
    stack: Stack<'_>,
    config: &NodeConfig,
    mcu: McuConfig,
    servo: ClockServo,
    bank: &mut B,
) -> ! {
    // The coordinator sends its full state in bursts (a CvAssign per channel, every voice,
    // every controller): room for RX_SLOTS datagrams, or the tail of a burst is dropped and
    // only the next refresh (100 ms later) brings it.
    let mut rx_meta = [PacketMetadata::EMPTY; RX_SLOTS];
    let mut tx_meta = [PacketMetadata::EMPTY; 8];
    let mut rx_buf = [0u8; RX_BYTES];
    let mut tx_buf = [0u8; 4 * MAX_DATAGRAM_LEN];
    let mut socket = UdpSocket::new(stack, &mut rx_meta, &mut rx_buf, &mut tx_meta, &mut tx_buf);
    if let Err(e) = socket.bind(config.port) {
        panic!("bind udp {}: {:?}", config.port, e);
    }
    let mut node = McuNode::new(mcu, now());
    node.set_servo(servo);
    let mut coordinator: Option<IpEndpoint> = None;
    let mut joined = false;
    let mut inbuf = [0u8; MAX_DATAGRAM_LEN];
    let mut outbuf = [0u8; MAX_DATAGRAM_LEN];
    info!("fw: ready on udp port {}", config.port);
    loop {
        let deadline = Instant::from_micros(node.poll_timeout().0 / 1_000);
        match select(socket.recv_from(&mut inbuf), Timer::at(deadline)).await {
            Either::First(Ok((n, meta))) => {
                let r = node.handle_datagram(now(), &inbuf[..n]);
                if r.from_coordinator && coordinator != Some(meta.endpoint) {
                    info!("fw: coordinator at {}", meta.endpoint);
                    coordinator = Some(meta.endpoint);
                }
            }
            // Truncated (larger than any datagram of ours): the core never sees it.
            Either::First(Err(_)) => {}
            Either::Second(()) => node.handle_timeout(now()),
        }
        if node.joined() != joined {
            joined = node.joined();
            info!("fw: session {}", if joined { "joined" } else { "lost" });
        }
        while let Some(op) = node.poll_dac(now()) {
            let ok = match op {
                DacOp::Init { dac } => bank.init(dac).await,
                DacOp::Write(w) => bank.write(w.dac, w.dac_channel, w.code, now()).await,
            };
            node.dac_done(now(), op, ok);
        }
        if let Some(to) = coordinator {
            while let Some(n) = node.poll_transmit(now(), &mut outbuf) {
                if socket.send_to(&outbuf[..n], to).await.is_err() {
                    break;
                }
            }
        }
    }
}
