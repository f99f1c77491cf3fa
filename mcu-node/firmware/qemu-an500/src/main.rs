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

use core::sync::atomic::{AtomicBool, Ordering};

use embassy_executor::Spawner;
use embassy_net::Runner;
use static_cell::StaticCell;
use voicemesh_fw_app::rng::XorShift;
use voicemesh_fw_app::{NodeConfig, info, mdns, net};
use voicemesh_mcu::servo::ClockServo;
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
    static EXECUTOR: StaticCell<embassy_executor::raw::Executor> = StaticCell::new();
    let executor = EXECUTOR.init(embassy_executor::raw::Executor::new(core::ptr::null_mut()));
    let spawner = executor.spawner();
    spawner.spawn(boot(spawner).expect("boot task"));
    loop {
        // SAFETY: polled from this one thread only.
        unsafe { executor.poll() };
        // Sleep with WFI, not embassy's WFE: QEMU implements WFE as a yield, so the vCPU
        // thread would spin at 100 % of a host core, and on a loaded host the scheduler then
        // makes it (and the timer interrupt it waits for) wait for a time slice — measured:
        // timers firing several ms late. A halted vCPU sleeps and is woken promptly. With
        // interrupts masked, a wake-up that comes between the check and the WFI still ends
        // the WFI (it pends), and the handler runs when they are unmasked.
        cortex_m::interrupt::free(|_| {
            if !WORK.swap(false, Ordering::Acquire) {
                cortex_m::asm::wfi();
            }
        });
    }
}

/// Set by the executor's pender (a task was woken); cleared before each poll.
static WORK: AtomicBool = AtomicBool::new(false);

#[unsafe(export_name = "__pender")]
fn pender(_context: *mut ()) {
    WORK.store(true, Ordering::Release);
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
    // QEMU's vCPU and I/O threads share the host's cores: now and then a datagram is seen
    // milliseconds late (measured up to ~5 ms on a loaded 2-core host, 30 ms at boot), so
    // the default 1 ms step threshold would step the clock on such a sample and restart the
    // lock count. Step only on 10 ms; call the clock locked within 1 ms.
    let servo = ClockServo::with_thresholds(10_000_000, 1_000_000);
    net::run(spawner, stack, config, advert, seed, mcu, servo, &mut bank).await
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    info!("fw: panic: {}", info);
    semihosting::exit(101);
}
