//! SMSC LAN9118 Ethernet controller as an embassy-net driver, programmed through its PIO FIFOs.
//!
//! Written from the LAN9118 datasheet's register map (system CSRs at byte offsets from the base,
//! the MAC reached indirectly through `MAC_CSR_CMD`/`MAC_CSR_DATA`), not from another driver.
//! QEMU's `mps2-an500` maps the chip at `0xA000_0000`.
//!
//! Receive: every frame leaves one status word in the RX status FIFO (`RX_FIFO_INF[23:16]`
//! counts them) — length in bits 29:16 including the 4-byte FCS, error summary in bit 15 —
//! followed by its data, a whole number of 32-bit words, in the RX data FIFO. Transmit: two
//! command words (A: first/last segment flags and buffer size; B: tag and frame length), then
//! the frame in 32-bit words. The TX status FIFO may overrun (`TX_CFG.TXSAO`), so it is never
//! read. No interrupt line is used: the time driver's tick calls [`poll_wake`], which wakes the
//! network task when a frame is waiting.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, Ordering};
use core::task::Context;

use embassy_net_driver::{Capabilities, HardwareAddress, LinkState};
use embassy_sync::waitqueue::AtomicWaker;

/// Base address of the LAN9118 on QEMU's AN500 board.
pub const BASE: usize = 0xA000_0000;

const RX_DATA_FIFO: usize = 0x00;
const TX_DATA_FIFO: usize = 0x20;
const RX_STATUS_FIFO: usize = 0x40;
const ID_REV: usize = 0x50;
const INT_EN: usize = 0x5C;
const BYTE_TEST: usize = 0x64;
const RX_CFG: usize = 0x6C;
const TX_CFG: usize = 0x70;
const HW_CFG: usize = 0x74;
const RX_FIFO_INF: usize = 0x7C;
const TX_FIFO_INF: usize = 0x80;
const PMT_CTRL: usize = 0x84;
const MAC_CSR_CMD: usize = 0xA4;
const MAC_CSR_DATA: usize = 0xA8;

/// `BYTE_TEST` always reads this value when the bus works and the chip is there.
const BYTE_TEST_VALUE: u32 = 0x8765_4321;
const HW_CFG_SRST: u32 = 1 << 0;
const PMT_CTRL_READY: u32 = 1 << 0;
const TX_CFG_TX_ON: u32 = 1 << 1;
const TX_CFG_TXSAO: u32 = 1 << 2;
const CSR_BUSY: u32 = 1 << 31;
const CSR_READ: u32 = 1 << 30;

// MAC CSR indices and MAC_CR bits.
const MAC_CR: u32 = 1;
const MAC_ADDRH: u32 = 2;
const MAC_ADDRL: u32 = 3;
const MAC_CR_RXEN: u32 = 1 << 2;
const MAC_CR_TXEN: u32 = 1 << 3;
/// Pass all multicast frames (mDNS listens on 224.0.0.251).
const MAC_CR_MCPAS: u32 = 1 << 19;

const RX_STS_ERROR: u32 = 1 << 15;
const TX_CMD_A_FIRST: u32 = 1 << 13;
const TX_CMD_A_LAST: u32 = 1 << 12;

/// Largest Ethernet frame handled (without FCS).
pub const MTU: usize = 1514;

static RX_WAKER: AtomicWaker = AtomicWaker::new();

/// Errors of [`Lan9118::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitError {
    /// `BYTE_TEST` did not read 0x87654321: no chip at the address.
    NoChip(u32),
    /// The chip did not leave reset / become ready.
    Timeout,
}

/// Frames handed to the stack.
pub static RX_FRAMES: AtomicU32 = AtomicU32::new(0);
/// Frames dropped: error status or too long.
pub static RX_DROPPED: AtomicU32 = AtomicU32::new(0);
/// Frames written to the TX FIFO.
pub static TX_FRAMES: AtomicU32 = AtomicU32::new(0);

/// The driver; one per chip.
pub struct Lan9118 {
    base: usize,
    mac: [u8; 6],
    rx_buf: [u8; MTU + 4],
    tx: Tx,
}

fn reg(base: usize, off: usize) -> *mut u32 {
    (base + off) as *mut u32
}

impl Lan9118 {
    /// Resets the chip, reads its MAC address (or sets `fallback_mac` when none is loaded), and
    /// enables the transmitter and receiver.
    ///
    /// # Safety
    /// `base` must be the address of a LAN9118 that nothing else drives.
    pub unsafe fn new(base: usize, fallback_mac: [u8; 6]) -> Result<Self, InitError> {
        let mut dev = Lan9118 {
            base,
            mac: [0; 6],
            rx_buf: [0; MTU + 4],
            tx: Tx {
                base,
                buf: [0; MTU],
                tag: 0,
            },
        };
        let test = dev.read(BYTE_TEST);
        if test != BYTE_TEST_VALUE {
            return Err(InitError::NoChip(test));
        }
        dev.write(HW_CFG, HW_CFG_SRST);
        dev.wait(HW_CFG, HW_CFG_SRST, 0)?;
        dev.wait(PMT_CTRL, PMT_CTRL_READY, PMT_CTRL_READY)?;
        dev.write(INT_EN, 0);
        dev.write(RX_CFG, 0); // 4-byte end alignment, no data offset
        let lo = dev.mac_read(MAC_ADDRL)?;
        let hi = dev.mac_read(MAC_ADDRH)?;
        let mut mac = [
            lo as u8,
            (lo >> 8) as u8,
            (lo >> 16) as u8,
            (lo >> 24) as u8,
            hi as u8,
            (hi >> 8) as u8,
        ];
        if mac == [0; 6] || mac == [0xFF; 6] {
            mac = fallback_mac;
            let lo = u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]);
            let hi = u32::from(u16::from_le_bytes([mac[4], mac[5]]));
            dev.mac_write(MAC_ADDRL, lo)?;
            dev.mac_write(MAC_ADDRH, hi)?;
        }
        dev.mac = mac;
        dev.write(TX_CFG, TX_CFG_TX_ON | TX_CFG_TXSAO);
        dev.mac_write(MAC_CR, MAC_CR_RXEN | MAC_CR_TXEN | MAC_CR_MCPAS)?;
        Ok(dev)
    }

    /// The chip's ID_REV register (0x0118_xxxx for a LAN9118).
    pub fn id_rev(&self) -> u32 {
        self.read(ID_REV)
    }

    /// The MAC address in use.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn read(&self, off: usize) -> u32 {
        // SAFETY: `new`'s caller vouched for the address; registers are 32-bit aligned.
        unsafe { read_volatile(reg(self.base, off)) }
    }

    fn write(&self, off: usize, value: u32) {
        // SAFETY: as in `read`.
        unsafe { write_volatile(reg(self.base, off), value) }
    }

    fn wait(&self, off: usize, mask: u32, want: u32) -> Result<(), InitError> {
        for _ in 0..1_000_000 {
            if self.read(off) & mask == want {
                return Ok(());
            }
        }
        Err(InitError::Timeout)
    }

    fn mac_read(&self, index: u32) -> Result<u32, InitError> {
        self.wait(MAC_CSR_CMD, CSR_BUSY, 0)?;
        self.write(MAC_CSR_CMD, CSR_BUSY | CSR_READ | index);
        self.wait(MAC_CSR_CMD, CSR_BUSY, 0)?;
        Ok(self.read(MAC_CSR_DATA))
    }

    fn mac_write(&self, index: u32, value: u32) -> Result<(), InitError> {
        self.wait(MAC_CSR_CMD, CSR_BUSY, 0)?;
        self.write(MAC_CSR_DATA, value);
        self.write(MAC_CSR_CMD, CSR_BUSY | index);
        self.wait(MAC_CSR_CMD, CSR_BUSY, 0)
    }

    fn rx_pending(&self) -> bool {
        (self.read(RX_FIFO_INF) >> 16) & 0xFF != 0
    }

    /// Pops one frame into `rx_buf`; returns its length without FCS, or `None` when the frame
    /// was dropped (error status or too long).
    fn pop_frame(&mut self) -> Option<usize> {
        let status = self.read(RX_STATUS_FIFO);
        let len = ((status >> 16) & 0x3FFF) as usize;
        let words = len.div_ceil(4);
        let keep = status & RX_STS_ERROR == 0 && len >= 4 && len <= self.rx_buf.len();
        for i in 0..words {
            let w = self.read(RX_DATA_FIFO).to_le_bytes();
            if keep {
                let at = i * 4;
                let n = (len - at).min(4);
                self.rx_buf[at..at + n].copy_from_slice(&w[..n]);
            }
        }
        if keep {
            RX_FRAMES.fetch_add(1, Ordering::Relaxed);
            Some(len - 4)
        } else {
            RX_DROPPED.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Called from the periodic tick interrupt: wakes the network task when a frame is waiting.
pub fn poll_wake(base: usize) {
    // SAFETY: RX_FIFO_INF is a read-only status register without read side effects.
    let inf = unsafe { read_volatile(reg(base, RX_FIFO_INF)) };
    if (inf >> 16) & 0xFF != 0 {
        RX_WAKER.wake();
    }
}

/// A received frame, already copied out of the FIFO.
pub struct RxToken<'a> {
    buf: &'a mut [u8],
}

impl embassy_net_driver::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, f: F) -> R {
        f(self.buf)
    }
}

/// The transmit side: the frame buffer and the TX FIFO.
pub struct Tx {
    base: usize,
    buf: [u8; MTU],
    tag: u16,
}

/// Room for one frame to send.
pub struct TxToken<'a>(&'a mut Tx);

impl embassy_net_driver::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let tx = self.0;
        let len = len.min(MTU);
        let r = f(&mut tx.buf[..len]);
        let fifo = reg(tx.base, TX_DATA_FIFO);
        // Wait for room: command words + data, in bytes (TX_FIFO_INF[15:0] = TDFREE).
        let need = (8 + len.div_ceil(4) * 4) as u32;
        // SAFETY: registers of the chip `Lan9118::new` was given.
        while unsafe { read_volatile(reg(tx.base, TX_FIFO_INF)) } & 0xFFFF < need {}
        tx.tag = tx.tag.wrapping_add(1);
        let words = [
            TX_CMD_A_FIRST | TX_CMD_A_LAST | len as u32,
            (u32::from(tx.tag) << 16) | len as u32,
        ];
        // SAFETY: as above.
        unsafe {
            for w in words {
                write_volatile(fifo, w);
            }
            for chunk in tx.buf[..len].chunks(4) {
                let mut w = [0u8; 4];
                w[..chunk.len()].copy_from_slice(chunk);
                write_volatile(fifo, u32::from_le_bytes(w));
            }
        }
        TX_FRAMES.fetch_add(1, Ordering::Relaxed);
        r
    }
}

impl embassy_net_driver::Driver for Lan9118 {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, cx: &mut Context) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        RX_WAKER.register(cx.waker());
        while self.rx_pending() {
            if let Some(len) = self.pop_frame() {
                return Some((
                    RxToken {
                        buf: &mut self.rx_buf[..len],
                    },
                    TxToken(&mut self.tx),
                ));
            }
        }
        None
    }

    fn transmit(&mut self, _cx: &mut Context) -> Option<Self::TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn link_state(&mut self, _cx: &mut Context) -> LinkState {
        LinkState::Up
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(1);
        caps
    }

    fn hardware_address(&self) -> HardwareAddress {
        HardwareAddress::Ethernet(self.mac)
    }
}
