//! DAC drivers on `embedded-hal-async` I2C: AD5593R and MCP4728, plus a virtual DAC for the
//! simulator and QEMU.
//!
//! Each driver's `init` brings the chip into the state the CV engine assumes (reference,
//! output range, direct update) and is retried up to [`INIT_ATTEMPTS`] times, because a DAC
//! that powers up after the MCU (or is hot-plugged) NAKs its first transactions. A failure
//! after that is reported to the core (`McuNode::dac_done`), which marks the DAC failed,
//! reports its channels at 0 V and asks for a new init every refresh period.
//! Bytes on the bus are pinned by tests with `embedded-hal-mock` (tests/dac.rs).

pub mod ad5593r;
pub mod mcp4728;

pub use ad5593r::Ad5593r;
pub use mcp4728::Mcp4728;

use embedded_hal_async::delay::DelayNs;

/// Attempts of a DAC init before it is reported failed.
pub const INIT_ATTEMPTS: u32 = 3;
/// Pause between init attempts, in microseconds.
pub const INIT_RETRY_US: u32 = 1_000;

/// A DAC the glue drives with the core's [`crate::DacOp`]s.
#[allow(
    async_fn_in_trait,
    reason = "used with static dispatch on one executor"
)]
pub trait Dac {
    /// The bus error.
    type Error: core::fmt::Debug;
    /// Brings the chip into its working state, with retries.
    async fn init(&mut self, delay: &mut impl DelayNs) -> Result<(), Self::Error>;
    /// Sets `channel` to `code` (12 bits); the output changes when the write completes.
    async fn write(&mut self, channel: u8, code: u16) -> Result<(), Self::Error>;
}

/// One init attempt of a chip.
trait InitOnce {
    type Error;
    async fn init_once(&mut self, delay: &mut impl DelayNs) -> Result<(), Self::Error>;
}

/// Runs `chip`'s init up to [`INIT_ATTEMPTS`] times, pausing [`INIT_RETRY_US`] between
/// attempts.
async fn init_with_retries<C: InitOnce>(
    chip: &mut C,
    delay: &mut impl DelayNs,
) -> Result<(), C::Error> {
    let mut attempt = 1;
    loop {
        match chip.init_once(delay).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= INIT_ATTEMPTS => return Err(e),
            Err(_) => {
                attempt += 1;
                delay.delay_us(INIT_RETRY_US).await;
            }
        }
    }
}

/// A DAC in memory: the simulator's and QEMU's outputs. It can be told to fail, to test the
/// fault path.
#[derive(Clone, Debug, Default)]
pub struct VirtualDac {
    codes: [u16; 8],
    /// When set, every operation fails.
    pub failing: bool,
    /// Writes performed.
    pub writes: u32,
}

/// The error of a [`VirtualDac`] told to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtualDacFault;

impl VirtualDac {
    /// The codes of its 8 channels.
    pub fn codes(&self) -> &[u16; 8] {
        &self.codes
    }

    /// [`Dac::init`] without a future (it never waits).
    pub fn init_now(&mut self) -> Result<(), VirtualDacFault> {
        if self.failing {
            return Err(VirtualDacFault);
        }
        self.codes = [0; 8];
        Ok(())
    }

    /// [`Dac::write`] without a future (it never waits).
    pub fn write_now(&mut self, channel: u8, code: u16) -> Result<(), VirtualDacFault> {
        if self.failing {
            return Err(VirtualDacFault);
        }
        if let Some(c) = self.codes.get_mut(usize::from(channel)) {
            *c = code & 0x0fff;
        }
        self.writes += 1;
        Ok(())
    }
}

impl Dac for VirtualDac {
    type Error = VirtualDacFault;

    async fn init(&mut self, _delay: &mut impl DelayNs) -> Result<(), VirtualDacFault> {
        self.init_now()
    }

    async fn write(&mut self, channel: u8, code: u16) -> Result<(), VirtualDacFault> {
        self.write_now(channel, code)
    }
}
