//! VoiceMesh MCU node firmware for the Teensy 4.1: the shared application on the i.MX RT1062's
//! ENET MAC (imxrt-enet under an embassy-net adapter), a GPT1 embassy-time driver, DHCP, the
//! mDNS responder and the I2C DACs. Wiring and flashing: docs/teensy.md.
#![no_std]
#![no_main]

mod dacs;
mod enet;
mod gpt_time;

use embassy_executor::Spawner;
use embassy_net::Runner;
use static_cell::StaticCell;
use teensy4_bsp::board;
use voicemesh_fw_app::{NodeConfig, mdns, net};
use voicemesh_mcu::McuConfig;
use voicemesh_mcu::servo::ClockServo;

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
        lpi2c1,
        lpi2c3,
        pins,
        mut trng,
        ..
    } = board::t41(board::instances());
    gpt_time::init(gpt1);
    // The session id must differ at every boot: the TRNG gives it (busy-waits for entropy;
    // errors clear themselves, so retry; a TRNG that never delivers leaves a fixed id, which
    // the coordinator still accepts and the first reboot would not change).
    let session_id = (0..10_000_000)
        .find_map(|_| match trng.next_u32() {
            core::task::Poll::Ready(Ok(v)) => Some(v),
            _ => None,
        })
        .unwrap_or(0x5EED_0001);
    let bank = dacs::Bank::new(
        board::lpi2c(lpi2c1, pins.p19, pins.p18, board::Lpi2cClockSpeed::KHz400),
        board::lpi2c(lpi2c3, pins.p16, pins.p17, board::Lpi2cClockSpeed::KHz400),
    );
    // SAFETY: called once, before anything else uses the ENET, its pads or PLL6.
    let dev = unsafe { enet::bring_up(&mut ccm, &mut ccm_analog, &mut iomuxc_gpr) };
    static EXECUTOR: StaticCell<embassy_executor::Executor> = StaticCell::new();
    let executor = EXECUTOR.init(embassy_executor::Executor::new());
    executor.run(|spawner| spawner.spawn(boot(spawner, dev, bank, session_id).expect("boot task")))
}

#[embassy_executor::task]
async fn net_task(mut runner: Runner<'static, EnetDriver>) -> ! {
    runner.run().await
}

#[embassy_executor::task]
async fn boot(spawner: Spawner, dev: EnetDriver, mut bank: dacs::Bank, session_id: u32) -> ! {
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
    let mcu = McuConfig {
        id: config.id.clone(),
        name: config.id.clone(),
        voices: u16::from(VOICES),
        dacs: heapless::Vec::from_slice(&dacs::SPECS).expect("two DACs fit"),
        session_id,
    };
    net::run(
        spawner,
        stack,
        config,
        advert,
        seed,
        mcu,
        ClockServo::new(),
        &mut bank,
    )
    .await
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // No debugger or console on a deployed board: start over. The DACs hold their codes
    // until the new boot's session initialises them (docs/teensy.md).
    cortex_m::peripheral::SCB::sys_reset()
}
