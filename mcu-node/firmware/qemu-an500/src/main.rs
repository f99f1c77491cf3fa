//! VoiceMesh MCU node firmware for QEMU's `mps2-an500` (Cortex-M7): the shared application on
//! a LAN9118 Ethernet driver, a SysTick time driver and semihosting for logs and config.
//!
//! Run: `qemu-system-arm -M mps2-an500 -nographic -semihosting-config enable=on,target=native
//! -nic tap,ifname=TAP,script=no,downscript=no,model=lan9118 -kernel FIRMWARE
//! -append "id=NAME ip=A.B.C.D/LEN"` (without `ip=` the node asks DHCP).
#![no_std]
#![no_main]

mod lan9118;
mod semihosting;
mod systick;

use core::fmt::Write as _;

use embassy_executor::Spawner;
use embassy_net::udp::{PacketMetadata, UdpSocket};
use embassy_net::{Runner, Stack, StackResources};
use embassy_time::{Duration, Timer};
use static_cell::StaticCell;
use voicemesh_fw_app::{NodeConfig, info, mdns};

use crate::lan9118::Lan9118;

/// Locally administered MAC used when QEMU left the chip without one.
const FALLBACK_MAC: [u8; 6] = [0x02, 0x56, 0x4D, 0x00, 0x00, 0x01];

#[cortex_m_rt::entry]
fn main() -> ! {
    let p = cortex_m::Peripherals::take().expect("peripherals taken once");
    voicemesh_fw_app::log::set_sink(semihosting::log_line);
    systick::init(p.SYST);
    static EXECUTOR: StaticCell<embassy_executor::Executor> = StaticCell::new();
    let executor = EXECUTOR.init(embassy_executor::Executor::new());
    executor.run(|spawner| spawner.spawn(boot(spawner).expect("boot task")))
}

#[embassy_executor::task]
async fn net_task(mut runner: Runner<'static, Lan9118>) -> ! {
    runner.run().await
}

#[embassy_executor::task]
async fn mdns_task(stack: Stack<'static>, config: &'static NodeConfig, seed: u64) -> ! {
    static BUFFERS: StaticCell<mdns::MdnsBuffers> = StaticCell::new();
    let buffers = BUFFERS.init(mdns::MdnsBuffers::new());
    let advert = mdns::Advert {
        cv_channels: 8,
        proto: voicemesh_mcu::PROTOCOL_VERSION,
    };
    loop {
        stack.wait_config_up().await;
        mdns::run(stack, buffers, config, advert, seed).await;
        Timer::after(Duration::from_secs(1)).await;
    }
}

#[embassy_executor::task]
async fn boot(spawner: Spawner) {
    // SAFETY: the AN500 maps its only LAN9118 here and nothing else drives it.
    let dev = match unsafe { Lan9118::new(lan9118::BASE, FALLBACK_MAC) } {
        Ok(d) => d,
        Err(e) => {
            info!("fw: ethernet init failed: {:?}", e);
            semihosting::exit(2);
        }
    };
    let mac = dev.mac();
    info!(
        "fw: lan9118 id_rev={:08x} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        dev.id_rev(),
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5]
    );
    static CONFIG: StaticCell<NodeConfig> = StaticCell::new();
    let mut config = NodeConfig::defaults(mac);
    let mut cmdline = [0u8; 256];
    let line = semihosting::cmdline(&mut cmdline).unwrap_or("");
    if let Err(bad) = config.apply(line) {
        info!("fw: bad config item {:?} in {:?}", bad.0, line);
        semihosting::exit(2);
    }
    let config: &'static NodeConfig = CONFIG.init(config);
    let seed = u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0x5A, 0xA5])
        ^ embassy_time::Instant::now().as_ticks();

    static RESOURCES: StaticCell<StackResources<4>> = StaticCell::new();
    let (stack, runner) = embassy_net::new(
        dev,
        config.net_config(),
        RESOURCES.init(StackResources::new()),
        seed,
    );
    spawner.spawn(net_task(runner).expect("net task"));
    stack.wait_config_up().await;
    let addr = stack.config_v4().map(|c| c.address);
    info!("fw: network up: id={} addr={:?}", config.id, addr);
    spawner.spawn(mdns_task(stack, config, seed).expect("mdns task"));

    // Stub service until the session lands: echo every datagram back, prefixed with the id.
    let mut rx_meta = [PacketMetadata::EMPTY; 4];
    let mut tx_meta = [PacketMetadata::EMPTY; 4];
    let mut rx_buf = [0u8; 1536];
    let mut tx_buf = [0u8; 1536];
    let mut socket = UdpSocket::new(stack, &mut rx_meta, &mut rx_buf, &mut tx_meta, &mut tx_buf);
    if let Err(e) = socket.bind(config.port) {
        info!("fw: bind {} failed: {:?}", config.port, e);
        semihosting::exit(2);
    }
    info!("fw: ready on udp port {}", config.port);
    let mut buf = [0u8; 1024];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let mut reply: heapless::String<1100> = heapless::String::new();
        let _ = write!(reply, "{} ", config.id);
        let text = core::str::from_utf8(&buf[..n]).unwrap_or("?");
        let _ = reply.push_str(text);
        let _ = socket.send_to(reply.as_bytes(), from.endpoint).await;
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    info!("fw: panic: {}", info);
    semihosting::exit(101);
}
