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
mod vdac;

use embassy_executor::Spawner;
use embassy_net::Runner;
use static_cell::StaticCell;
use voicemesh_fw_app::rng::XorShift;
use voicemesh_fw_app::{NodeConfig, info, mdns, net};
use voicemesh_mcu::{DacSpec, McuConfig};

use crate::lan9118::Lan9118;

/// Virtual DAC channels (one 8-channel virtual DAC) and voice slots.
const CV_CHANNELS: u8 = 8;
const VOICES: u8 = 2;

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
async fn boot(spawner: Spawner) -> ! {
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
    let seed = net::seed(mac);
    let (stack, runner) = net::new_stack(dev, config, seed);
    spawner.spawn(net_task(runner).expect("net task"));
    let advert = mdns::Advert {
        cv_channels: CV_CHANNELS,
        voices: VOICES,
        proto: voicemesh_mcu::PROTOCOL_VERSION,
    };
    let mut dacs = heapless::Vec::new();
    let _ = dacs.push(DacSpec::VIRTUAL_5V);
    // A new session id every boot: the seed mixes in the host's clock (semihosting).
    let session_id = (XorShift::new(seed ^ semihosting::host_time()).next() >> 32) as u32;
    let mcu = McuConfig {
        id: config.id.clone(),
        name: config.id.clone(),
        voices: u16::from(VOICES),
        dacs,
        session_id,
    };
    let mut bank = vdac::VirtualBank::<1>::new();
    net::run(spawner, stack, config, advert, seed, mcu, &mut bank).await
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    info!("fw: panic: {}", info);
    semihosting::exit(101);
}
