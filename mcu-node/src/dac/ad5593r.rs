//! Analog Devices AD5593R: 8 channels configurable as 12-bit DAC outputs, on I2C.
//!
//! Every write is three bytes `[pointer, MSB, LSB]`. Pointer `0b0000_rrrr` writes
//! configuration register `r`; pointer `0b0001_0ccc` writes DAC channel `c`, whose 12-bit code
//! is `MSB[3:0]` (D11–D8) and `LSB` (D7–D0). Registers used: 0x0F software reset (0x0DAC),
//! 0x0B power-down/reference (bit 9 EN_REF: internal 2.5 V reference), 0x03 general-purpose
//! control (bit 4 DAC_RANGE: 0–2 × Vref), 0x07 LDAC mode (0: a DAC write updates the output
//! at once), 0x05 DAC pin configuration (bit c: pin c is a DAC output).
//! At 400 kHz one write (address + 3 bytes, 36 clocks with ACKs plus start/stop) takes about
//! 95 µs.

use embedded_hal_async::delay::DelayNs;
use embedded_hal_async::i2c::I2c;

use super::{Dac, InitOnce, init_with_retries};

/// 7-bit I2C address with A0 low.
pub const ADDRESS_A0_LOW: u8 = 0x10;
/// 7-bit I2C address with A0 high.
pub const ADDRESS_A0_HIGH: u8 = 0x11;
/// Pointer of a DAC channel write.
pub const DAC_WRITE: u8 = 0x10;
/// General-purpose control register.
pub const REG_GP_CONTROL: u8 = 0x03;
/// DAC pin configuration register.
pub const REG_DAC_PINS: u8 = 0x05;
/// LDAC mode register.
pub const REG_LDAC_MODE: u8 = 0x07;
/// Power-down and reference control register.
pub const REG_POWER_REF: u8 = 0x0B;
/// Software reset register.
pub const REG_RESET: u8 = 0x0F;
/// The value that resets the chip when written to [`REG_RESET`].
pub const RESET_CODE: u16 = 0x0DAC;
/// GP control: DAC range 0–2 × Vref.
pub const GP_DAC_RANGE_2X: u16 = 1 << 4;
/// Power/reference: enable the internal 2.5 V reference.
pub const POWER_EN_REF: u16 = 1 << 9;
/// Time the chip needs after a software reset, in µs.
pub const RESET_US: u32 = 250;

/// An AD5593R with all 8 pins as DAC outputs, 0–5 V (internal 2.5 V reference × 2).
#[derive(Debug)]
pub struct Ad5593r<I> {
    i2c: I,
    address: u8,
}

impl<I: I2c> Ad5593r<I> {
    /// A driver for the chip at `address` (0x10 or 0x11).
    pub fn new(i2c: I, address: u8) -> Self {
        Ad5593r { i2c, address }
    }

    /// Gives the bus back.
    pub fn release(self) -> I {
        self.i2c
    }

    async fn reg(&mut self, reg: u8, value: u16) -> Result<(), I::Error> {
        let [hi, lo] = value.to_be_bytes();
        self.i2c.write(self.address, &[reg, hi, lo]).await
    }
}

impl<I: I2c> InitOnce for Ad5593r<I> {
    type Error = I::Error;

    async fn init_once(&mut self, delay: &mut impl DelayNs) -> Result<(), I::Error> {
        self.reg(REG_RESET, RESET_CODE).await?;
        delay.delay_us(RESET_US).await;
        self.reg(REG_POWER_REF, POWER_EN_REF).await?;
        self.reg(REG_GP_CONTROL, GP_DAC_RANGE_2X).await?;
        self.reg(REG_LDAC_MODE, 0).await?;
        self.reg(REG_DAC_PINS, 0x00ff).await
    }
}

impl<I: I2c> Dac for Ad5593r<I> {
    type Error = I::Error;

    async fn init(&mut self, delay: &mut impl DelayNs) -> Result<(), I::Error> {
        init_with_retries(self, delay).await
    }

    async fn write(&mut self, channel: u8, code: u16) -> Result<(), I::Error> {
        let code = code.min(0x0fff);
        self.i2c
            .write(
                self.address,
                &[DAC_WRITE | (channel & 7), (code >> 8) as u8, code as u8],
            )
            .await
    }
}
