//! The Teensy's DACs on two I2C buses (docs/teensy.md, Wiring): an AD5593R on LPI2C1 and an
//! MCP4728 on LPI2C3, driven by `voicemesh-mcu`'s drivers.
//!
//! imxrt-hal 0.6 offers blocking LPI2C only; [`Blocking`] lends it to the async drivers. A
//! write then holds the executor for the transaction (about 95 µs for an AD5593R channel at
//! 400 kHz), which the latency budget in docs/mcu.md accounts for.

use embassy_time::Delay;
use embedded_hal::i2c::{ErrorType, I2c as BlockingI2c, Operation};
use teensy4_bsp::board::Lpi2c;
use voicemesh_fw_app::session::DacBank;
use voicemesh_mcu::dac::{Ad5593r, Dac, Mcp4728};
use voicemesh_mcu::{DacSpec, LocalTime};

/// I2C address of the AD5593R (A0 low).
pub const AD5593R_ADDR: u8 = 0x10;
/// I2C address of the MCP4728 (factory default).
pub const MCP4728_ADDR: u8 = 0x60;
/// The DACs in the core's order: node channels 0–7, then 8–11.
pub const SPECS: [DacSpec; 2] = [DacSpec::AD5593R_5V, DacSpec::MCP4728_4V096];

/// A blocking I2C bus behind the async `embedded-hal-async` trait.
pub struct Blocking(pub Lpi2c);

impl ErrorType for Blocking {
    type Error = <Lpi2c as ErrorType>::Error;
}

impl embedded_hal_async::i2c::I2c for Blocking {
    async fn transaction(
        &mut self,
        address: u8,
        operations: &mut [Operation<'_>],
    ) -> Result<(), Self::Error> {
        BlockingI2c::transaction(&mut self.0, address, operations)
    }
}

/// Both DACs.
pub struct Bank {
    ad5593r: Ad5593r<Blocking>,
    mcp4728: Mcp4728<Blocking>,
}

impl Bank {
    /// The DACs on their buses (LPI2C1: AD5593R, LPI2C3: MCP4728).
    pub fn new(lpi2c1: Lpi2c, lpi2c3: Lpi2c) -> Self {
        Bank {
            ad5593r: Ad5593r::new(Blocking(lpi2c1), AD5593R_ADDR),
            mcp4728: Mcp4728::new(Blocking(lpi2c3), MCP4728_ADDR),
        }
    }
}

impl DacBank for Bank {
    async fn init(&mut self, dac: u8) -> bool {
        match dac {
            0 => self.ad5593r.init(&mut Delay).await.is_ok(),
            1 => self.mcp4728.init(&mut Delay).await.is_ok(),
            _ => false,
        }
    }

    async fn write(&mut self, dac: u8, channel: u8, code: u16, _at: LocalTime) -> bool {
        match dac {
            0 => self.ad5593r.write(channel, code).await.is_ok(),
            1 => self.mcp4728.write(channel, code).await.is_ok(),
            _ => false,
        }
    }
}
