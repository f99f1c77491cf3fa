//! Teensy 4.1 Ethernet: board bring-up (ENET PLL, pads, DP83825 PHY, MAC from fuses) and an
//! embassy-net driver adapter over `imxrt-enet` (which drives the ENET MAC's DMA rings as a
//! smoltcp device and leaves clocks, pins and the PHY to us).
//!
//! Bring-up, from the i.MX RT1060 reference manual's register descriptions (as named in
//! imxrt-ral) and the Teensy 4.1 schematic; **not yet run on hardware**:
//! - PLL6 (`PLL_ENET`) at 50 MHz (`DIV_SELECT` = 1), enabled, not bypassed, locked; the MCU
//!   drives the RMII reference clock out on GPIO_B1_10 (`IOMUXC_GPR.GPR1`: `ENET1_CLK_SEL` = 0,
//!   `ENET1_TX_CLK_DIR` = 1); ENET clock gate `CCGR1.CG5` on.
//! - Pads GPIO_B1_04…B1_11 in their ENET alternate (RX data 0/1, CRS_DV, TX data 0/1, TX_EN,
//!   REF_CLK with SION, RX_ER), B1_14/B1_15 as MDC/MDIO, with the daisy-chain input selects.
//! - PHY: GPIO_B0_15 (power) high, GPIO_B0_14 (reset, active low) pulsed; then over MDIO
//!   (address 0) the DP83825 is set to 50 MHz RMII reference-clock mode and auto-negotiation
//!   is restarted. Link state is polled from the basic status register every 500 ms.
//! - MAC address from the OCOTP `MAC0`/`MAC1` fuses PJRC programs into every Teensy 4.1.
//! - DMA descriptors and buffers are statics, which the teensy4-bsp memory map places in DTCM
//!   (uncached, so no cache maintenance around DMA).
//! - The ENET MAC filters multicast by a hash (`GAUR`/`GALR`); both are set to all ones so
//!   mDNS (01:00:5E:00:00:FB) gets through.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use core::task::Context;

use embassy_net_driver::{Capabilities, Checksum, HardwareAddress, LinkState};
use embassy_sync::waitqueue::AtomicWaker;
use imxrt_enet::smoltcp::phy::{Device, RxToken as _, TxToken as _};
use imxrt_enet::smoltcp::time::Instant;
use imxrt_enet::{Enet, MiimRead, MiimWrite, ReceiveBuffers, TransmitBuffers};
use static_cell::ConstStaticCell;
use teensy4_bsp::ral;

const MTU: usize = 1536;
const RX_COUNT: usize = 8;
const TX_COUNT: usize = 4;
/// The reference clock PLL6 gives the ENET MAC and the PHY.
const ENET_CLOCK_HZ: u32 = 50_000_000;
/// MDIO address of the Teensy 4.1's DP83825.
const PHY_ADDR: u8 = 0;
const PHY_BMCR: u8 = 0x00;
const PHY_BMSR: u8 = 0x01;
const PHY_RCSR: u8 = 0x17;
const BMCR_AUTONEG_ENABLE: u16 = 1 << 12;
const BMCR_AUTONEG_RESTART: u16 = 1 << 9;
const BMSR_LINK: u16 = 1 << 2;
/// RCSR bit 7: the PHY takes a 50 MHz RMII reference clock.
const RCSR_REF_CLK_50MHZ: u16 = 1 << 7;
const LINK_POLL_MS: u32 = 500;

static RX_BUFFERS: ConstStaticCell<ReceiveBuffers<RX_COUNT, MTU>> =
    ConstStaticCell::new(ReceiveBuffers::new());
static TX_BUFFERS: ConstStaticCell<TransmitBuffers<TX_COUNT, MTU>> =
    ConstStaticCell::new(TransmitBuffers::new());

static NET_WAKER: AtomicWaker = AtomicWaker::new();
static LINK_DUE: AtomicBool = AtomicBool::new(true);
/// When the link was last polled, in ms (wraps after 49 days; only differences count).
static LAST_LINK_POLL_MS: AtomicU32 = AtomicU32::new(0);

/// Called by the time driver every millisecond: asks for a PHY link poll every 500 ms.
pub fn tick(now_us: u64) {
    let now_ms = (now_us / 1_000) as u32;
    if now_ms.wrapping_sub(LAST_LINK_POLL_MS.load(Ordering::Relaxed)) >= LINK_POLL_MS {
        LAST_LINK_POLL_MS.store(now_ms, Ordering::Relaxed);
        LINK_DUE.store(true, Ordering::Release);
        NET_WAKER.wake();
    }
}

/// The ENET interrupt vector (imxrt-ral's `rt` table names it).
#[unsafe(no_mangle)]
extern "C" fn ENET() {
    // SAFETY: EIR is write-one-to-clear; only the frame events this handler owns are cleared
    // (the MII event stays for imxrt-enet's MDIO polling).
    let enet = unsafe { ral::enet::ENET1::instance() };
    ral::write_reg!(ral::enet, enet, EIR, RXF: 1, TXF: 1);
    NET_WAKER.wake();
}

/// Reads the MAC address PJRC burned into the OCOTP fuses.
pub fn mac_from_fuses() -> [u8; 6] {
    // SAFETY: read-only access to the fuse shadow registers.
    let ocotp = unsafe { ral::ocotp::OCOTP::instance() };
    let m0 = ral::read_reg!(ral::ocotp, ocotp, MAC0);
    let m1 = ral::read_reg!(ral::ocotp, ocotp, MAC1);
    [
        (m1 >> 8) as u8,
        m1 as u8,
        (m0 >> 24) as u8,
        (m0 >> 16) as u8,
        (m0 >> 8) as u8,
        m0 as u8,
    ]
}

fn busy_wait_us(us: u32) {
    // 600 MHz core: a cycle-count delay is enough for reset pulses.
    cortex_m::asm::delay(us.saturating_mul(600));
}

/// Clocks, pads and PHY power; then the ENET driver with the PHY configured.
///
/// # Safety
/// Call once; the ENET1, PLL6, IOMUXC ENET pads, GPIO2 pins 14/15 and OCOTP are this
/// module's from then on.
pub unsafe fn bring_up(
    ccm: &mut ral::ccm::CCM,
    ccm_analog: &mut ral::ccm_analog::CCM_ANALOG,
    gpr: &mut ral::iomuxc_gpr::IOMUXC_GPR,
) -> EnetDriver {
    // PLL6 at 50 MHz.
    ral::modify_reg!(ral::ccm_analog, ccm_analog, PLL_ENET, POWERDOWN: 0, BYPASS: 1, DIV_SELECT: 1, ENABLE: 1);
    while ral::read_reg!(ral::ccm_analog, ccm_analog, PLL_ENET, LOCK == 0) {}
    ral::modify_reg!(ral::ccm_analog, ccm_analog, PLL_ENET, BYPASS: 0);
    // The MCU drives REF_CLK; ENET clock gate on.
    ral::modify_reg!(ral::iomuxc_gpr, gpr, GPR1, ENET1_CLK_SEL: 0, ENET1_TX_CLK_DIR: 1);
    ral::modify_reg!(ral::ccm, ccm, CCGR1, CG5: 0b11);

    // SAFETY: the ENET pads belong to no Teensy header pin, so teensy4-bsp's `Pins` never
    // hands them out; this is their only user.
    let iomuxc = unsafe { ral::iomuxc::IOMUXC::instance() };
    // Fast slew, drive strength 5, 200 MHz speed; inputs get a 100k pull-down via the keeper.
    const PAD_OUT: u32 = (1 << 0) | (5 << 3) | (3 << 6);
    const PAD_IN: u32 = PAD_OUT | (1 << 12) | (1 << 13);
    macro_rules! pad {
        ($mux:ident, $ctl:ident, $alt:expr, $pad:expr) => {
            ral::write_reg!(ral::iomuxc, iomuxc, $mux, $alt);
            ral::write_reg!(ral::iomuxc, iomuxc, $ctl, $pad);
        };
    }
    pad!(
        SW_MUX_CTL_PAD_GPIO_B1_04,
        SW_PAD_CTL_PAD_GPIO_B1_04,
        3,
        PAD_IN
    ); // RXD0
    pad!(
        SW_MUX_CTL_PAD_GPIO_B1_05,
        SW_PAD_CTL_PAD_GPIO_B1_05,
        3,
        PAD_IN
    ); // RXD1
    pad!(
        SW_MUX_CTL_PAD_GPIO_B1_06,
        SW_PAD_CTL_PAD_GPIO_B1_06,
        3,
        PAD_IN
    ); // CRS_DV
    pad!(
        SW_MUX_CTL_PAD_GPIO_B1_07,
        SW_PAD_CTL_PAD_GPIO_B1_07,
        3,
        PAD_OUT
    ); // TXD0
    pad!(
        SW_MUX_CTL_PAD_GPIO_B1_08,
        SW_PAD_CTL_PAD_GPIO_B1_08,
        3,
        PAD_OUT
    ); // TXD1
    pad!(
        SW_MUX_CTL_PAD_GPIO_B1_09,
        SW_PAD_CTL_PAD_GPIO_B1_09,
        3,
        PAD_OUT
    ); // TX_EN
    pad!(
        SW_MUX_CTL_PAD_GPIO_B1_10,
        SW_PAD_CTL_PAD_GPIO_B1_10,
        6 | (1 << 4),
        PAD_OUT
    ); // REF_CLK, SION
    pad!(
        SW_MUX_CTL_PAD_GPIO_B1_11,
        SW_PAD_CTL_PAD_GPIO_B1_11,
        3,
        PAD_IN
    ); // RX_ER
    pad!(
        SW_MUX_CTL_PAD_GPIO_B1_14,
        SW_PAD_CTL_PAD_GPIO_B1_14,
        0,
        PAD_OUT
    ); // MDC
    pad!(
        SW_MUX_CTL_PAD_GPIO_B1_15,
        SW_PAD_CTL_PAD_GPIO_B1_15,
        0,
        PAD_IN | (3 << 14)
    ); // MDIO, 22k pull-up
    ral::write_reg!(ral::iomuxc, iomuxc, ENET_IPG_CLK_RMII_SELECT_INPUT, DAISY: GPIO_B1_10_ALT6);
    ral::write_reg!(ral::iomuxc, iomuxc, ENET_MDIO_SELECT_INPUT, DAISY: GPIO_B1_15_ALT0);
    ral::write_reg!(ral::iomuxc, iomuxc, ENET0_RXDATA_SELECT_INPUT, DAISY: GPIO_B1_04_ALT3);
    ral::write_reg!(ral::iomuxc, iomuxc, ENET1_RXDATA_SELECT_INPUT, DAISY: GPIO_B1_05_ALT3);
    ral::write_reg!(ral::iomuxc, iomuxc, ENET_RXEN_SELECT_INPUT, DAISY: GPIO_B1_06_ALT3);
    ral::write_reg!(ral::iomuxc, iomuxc, ENET_RXERR_SELECT_INPUT, DAISY: GPIO_B1_11_ALT3);

    // PHY power (B0_15) and reset (B0_14) as GPIO2 outputs (not the fast GPIO7 alias).
    pad!(
        SW_MUX_CTL_PAD_GPIO_B0_14,
        SW_PAD_CTL_PAD_GPIO_B0_14,
        5,
        PAD_OUT
    );
    pad!(
        SW_MUX_CTL_PAD_GPIO_B0_15,
        SW_PAD_CTL_PAD_GPIO_B0_15,
        5,
        PAD_OUT
    );
    let gpr27 = ral::read_reg!(ral::iomuxc_gpr, gpr, GPR27);
    ral::write_reg!(
        ral::iomuxc_gpr,
        gpr,
        GPR27,
        gpr27 & !((1 << 14) | (1 << 15))
    );
    // SAFETY: only bits 14 and 15 of GPIO2 are touched, through set/clear registers.
    let gpio2 = unsafe { ral::gpio::GPIO2::instance() };
    ral::write_reg!(ral::gpio, gpio2, DR_CLEAR, 1 << 14);
    ral::modify_reg!(ral::gpio, gpio2, GDIR, |d| d | (1 << 14) | (1 << 15));
    ral::write_reg!(ral::gpio, gpio2, DR_SET, 1 << 15);
    busy_wait_us(10_000);
    ral::write_reg!(ral::gpio, gpio2, DR_SET, 1 << 14);
    busy_wait_us(10_000);

    let mac = mac_from_fuses();
    // SAFETY: the one ENET1 instance, handed to the driver.
    let enet1 = unsafe { ral::enet::ENET1::instance() };
    let mut enet = Enet::new(
        enet1,
        TX_BUFFERS.take().take(),
        RX_BUFFERS.take().take(),
        ENET_CLOCK_HZ,
        &mac,
    );
    enet.enable_rmii_mode(true);
    enet.set_duplex(imxrt_enet::Duplex::Full);
    let rcsr = MiimRead::read(&mut enet, PHY_ADDR, PHY_RCSR).unwrap_or(0);
    let _ = MiimWrite::write(&mut enet, PHY_ADDR, PHY_RCSR, rcsr | RCSR_REF_CLK_50MHZ);
    let _ = MiimWrite::write(
        &mut enet,
        PHY_ADDR,
        PHY_BMCR,
        BMCR_AUTONEG_ENABLE | BMCR_AUTONEG_RESTART,
    );
    // SAFETY: group hash registers of the instance the driver owns; nothing else writes them.
    let regs = unsafe { ral::enet::ENET1::instance() };
    ral::write_reg!(ral::enet, regs, GAUR, 0xFFFF_FFFF);
    ral::write_reg!(ral::enet, regs, GALR, 0xFFFF_FFFF);
    ral::write_reg!(ral::enet, regs, EIMR, RXF: 1, TXF: 1);
    enet.enable_mac(true);
    // SAFETY: the handler only clears frame events and wakes the driver.
    unsafe { cortex_m::peripheral::NVIC::unmask(teensy4_bsp::Interrupt::ENET) };
    EnetDriver {
        enet,
        mac,
        link: false,
        rx_copy: [0; MTU],
    }
}

/// embassy-net driver over `imxrt_enet::Enet`.
pub struct EnetDriver {
    enet: Enet,
    mac: [u8; 6],
    link: bool,
    /// imxrt-enet lends received frames read-only; embassy-net wants them mutable.
    rx_copy: [u8; MTU],
}

impl EnetDriver {
    /// The MAC address in use.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

/// A received frame (copied out of its DMA buffer).
pub struct RxToken<'a>(&'a mut [u8]);

impl embassy_net_driver::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

/// A free transmit descriptor.
pub struct TxToken<'a>(<Enet as Device>::TxToken<'a>);

impl embassy_net_driver::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.0.consume(len, f)
    }
}

impl embassy_net_driver::Driver for EnetDriver {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, cx: &mut Context) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        NET_WAKER.register(cx.waker());
        let EnetDriver { enet, rx_copy, .. } = self;
        let (rx, tx) = enet.receive(Instant::ZERO)?;
        let len = rx.consume(|frame| {
            let n = frame.len().min(rx_copy.len());
            rx_copy[..n].copy_from_slice(&frame[..n]);
            n
        });
        Some((RxToken(&mut rx_copy[..len]), TxToken(tx)))
    }

    fn transmit(&mut self, cx: &mut Context) -> Option<Self::TxToken<'_>> {
        NET_WAKER.register(cx.waker());
        self.enet.transmit(Instant::ZERO).map(TxToken)
    }

    fn link_state(&mut self, cx: &mut Context) -> LinkState {
        NET_WAKER.register(cx.waker());
        if LINK_DUE.swap(false, Ordering::Acquire) {
            if let Ok(bmsr) = MiimRead::read(&mut self.enet, PHY_ADDR, PHY_BMSR) {
                self.link = bmsr & BMSR_LINK != 0;
            }
        }
        if self.link {
            LinkState::Up
        } else {
            LinkState::Down
        }
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.max_transmission_unit = 1514;
        caps.max_burst_size = Some(TX_COUNT);
        // The MAC inserts and checks IPv4/UDP/TCP/ICMP checksums (imxrt-enet's TACC/RACC).
        caps.checksum.ipv4 = Checksum::None;
        caps.checksum.udp = Checksum::None;
        caps.checksum.tcp = Checksum::None;
        caps.checksum.icmpv4 = Checksum::None;
        caps
    }

    fn hardware_address(&self) -> HardwareAddress {
        HardwareAddress::Ethernet(self.mac)
    }
}
