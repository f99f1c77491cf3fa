//! VoiceMesh MCU node firmware for the Teensy 4.1: the shared application on the i.MX RT1062's
//! ENET MAC (imxrt-enet under an embassy-net adapter), a GPT1 embassy-time driver, DHCP, the
//! mDNS responder and the I2C DACs. Wiring and flashing: docs/teensy.md.
#![no_std]
#![no_main]

mod enet;
mod gpt_time;

use embassy_executor::Spawner;
use embassy_net::Runner;
use static_cell::StaticCell;
use teensy4_bsp::board;
use voicemesh_fw_app::{NodeConfig, mdns, net};

use crate::enet::EnetDriver;

/// CV channels the default wiring provides (AD5593R: 8, MCP4728: 4).
const CV_CHANNELS: u8 = 12;
/// Voice slots (pitch, gate, velocity each): three, plus modulation channels.
const VOICES: u8 = 3;

#[teensy4_bsp::rt::entry]
fn main() -> ! {
    let board::Resources {
        gpt1,
        mut ccm,
        mut ccm_analog,
        mut iomuxc_gpr,
        ..
    } = board::t41(board::instances());
    gpt_time::init(gpt1);
    // SAFETY: called once, before anything else uses the ENET, its pads or PLL6.
    let dev = unsafe { enet::bring_up(&mut ccm, &mut ccm_analog, &mut iomuxc_gpr) };
    static EXECUTOR: StaticCell<embassy_executor::Executor> = StaticCell::new();
    let executor = EXECUTOR.init(embassy_executor::Executor::new());
    executor.run(|spawner| spawner.spawn(boot(spawner, dev).expect("boot task")))
}

#[embassy_executor::task]
async fn net_task(mut runner: Runner<'static, EnetDriver>) -> ! {
    runner.run().await
}

#[embassy_executor::task]
async fn boot(spawner: Spawner, dev: EnetDriver) -> ! {
    let mac = dev.mac();
    static CONFIG: StaticCell<NodeConfig> = StaticCell::new();
    // DHCP, id from the MAC address.
    let config: &'static NodeConfig = CONFIG.init(NodeConfig::defaults(mac));
    let seed = net::seed(mac);
    let (stack, runner) = net::new_stack(dev, config, seed);
    spawner.spawn(net_task(runner).expect("net task"));
    let advert = mdns::Advert {
        cv_channels: CV_CHANNELS,
        voices: VOICES,
        proto: voicemesh_mcu::PROTOCOL_VERSION,
    };
    net::run(spawner, stack, config, advert, seed).await
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // No debugger or console on a deployed board: stop; the coordinator's lease drops the
    // gates, and the watchdog-free MCU needs a power cycle (docs/teensy.md).
    loop {
        cortex_m::asm::wfi();
    }
}
