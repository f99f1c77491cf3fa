//! Bringing the node onto the network: the stack, the seed, the mDNS task, then the service.

use embassy_executor::Spawner;
use embassy_net::{Runner, Stack, StackResources};
use embassy_time::{Duration, Instant, Timer};
use static_cell::StaticCell;

use voicemesh_mcu::McuConfig;
use voicemesh_mcu::servo::ClockServo;

use crate::session::{self, DacBank};
use crate::{NodeConfig, info, mdns};

/// A seed for the stack and mDNS from the MAC address and the time since boot (which varies
/// with how long the PHY and the clocks took; nothing secret depends on it).
pub fn seed(mac: [u8; 6]) -> u64 {
    u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0x5A, 0xA5])
        ^ Instant::now().as_ticks()
}

/// The embassy-net stack over `dev` with `config`'s addressing. Call once.
pub fn new_stack<D: embassy_net_driver::Driver>(
    dev: D,
    config: &NodeConfig,
    seed: u64,
) -> (Stack<'static>, Runner<'static, D>) {
    static RESOURCES: StaticCell<StackResources<4>> = StaticCell::new();
    embassy_net::new(
        dev,
        config.net_config(),
        RESOURCES.init(StackResources::new()),
        seed,
    )
}

#[embassy_executor::task]
async fn mdns_task(
    stack: Stack<'static>,
    config: &'static NodeConfig,
    advert: mdns::Advert,
    seed: u64,
) -> ! {
    static BUFFERS: StaticCell<mdns::MdnsBuffers> = StaticCell::new();
    let buffers = BUFFERS.init(mdns::MdnsBuffers::new());
    loop {
        stack.wait_config_up().await;
        mdns::run(stack, buffers, config, advert, seed).await;
        Timer::after(Duration::from_secs(1)).await;
    }
}

/// Waits for an address, starts the mDNS responder and runs the node's session on `bank`
/// with `servo`.
pub async fn run<B: DacBank>(
    spawner: Spawner,
    stack: Stack<'static>,
    config: &'static NodeConfig,
    advert: mdns::Advert,
    seed: u64,
    mcu: McuConfig,
    servo: ClockServo,
    bank: &mut B,
) -> ! {
    stack.wait_config_up().await;
    let addr = stack.config_v4().map(|c| c.address);
    info!("fw: network up: id={} addr={:?}", config.id, addr);
    spawner.spawn(mdns_task(stack, config, advert, seed).expect("mdns task"));
    session::run(stack, config, mcu, servo, bank).await
}
