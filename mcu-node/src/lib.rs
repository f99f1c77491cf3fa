//! The MCU node core: the part of a Teensy 4.1 CV node that does not touch hardware.
//!
//! It is `#![no_std]` and allocation-free so the same code runs in the firmware (teensy41,
//! qemu-an500) and, with the `std` feature, in the `voicemesh mcu-sim` simulator (module `sim`).
//! Layers, inside out:
//! - [`servo::ClockServo`] keeps cluster time over the node's free-running clock;
//! - [`engine::CvEngine`] turns assignments, voices, MIDI controllers and the timeline into DAC
//!   codes at their cluster time, with refresh, sequence numbers and DAC fault handling;
//! - [`node::McuNode`] is the session over UDP datagrams (hello, welcome, heartbeats, time
//!   sync, reports) around the two, the single object the glue drives;
//! - [`dac`] has the AD5593R and MCP4728 drivers on `embedded-hal-async` I2C.
//!
//! See docs/mcu.md for the architecture, the latency budget and what is verified where.
#![no_std]
#![deny(missing_docs)]
#![deny(clippy::disallowed_methods)]

#[cfg(feature = "std")]
extern crate std;

pub mod dac;
pub mod engine;
pub mod node;
pub mod servo;
#[cfg(feature = "std")]
pub mod sim;

pub use node::{DacOp, McuConfig, McuNode, Received};
pub use voicemesh_protocol::PROTOCOL_VERSION;

/// The role an MCU node announces over mDNS (`role=mcu`).
pub const ROLE: &str = "mcu";
/// Most output channels of one node.
pub const MAX_CHANNELS: usize = voicemesh_protocol::MAX_CV_CHANNELS;
/// Most DACs of one node.
pub const MAX_DACS: usize = 8;

/// A point on the node's own monotonic clock, in nanoseconds (the firmware's timer, or
/// `Instant` in the simulator). Cluster time is derived from it by the clock servo.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalTime(pub u64);

impl LocalTime {
    /// `self + ns`, saturating.
    #[must_use]
    pub const fn add_nanos(self, ns: u64) -> Self {
        LocalTime(self.0.saturating_add(ns))
    }
}

/// Which chip a DAC is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DacKind {
    /// Analog Devices AD5593R: 8 channels, 12 bits, I2C.
    Ad5593r,
    /// Microchip MCP4728: 4 channels, 12 bits, I2C.
    Mcp4728,
    /// A simulated DAC (the simulator, QEMU).
    Virtual,
}

/// One DAC of the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DacSpec {
    /// The chip.
    pub kind: DacKind,
    /// Its channels (they get the next node channel numbers).
    pub channels: u8,
    /// Resolution in bits.
    pub bits: u8,
    /// Output voltage at code 2^bits (the nominal full scale), in microvolts.
    pub full_scale_uv: u32,
}

impl DacSpec {
    /// An AD5593R with the internal 2.5 V reference and the 0–2×Vref range: 0–5 V.
    pub const AD5593R_5V: DacSpec = DacSpec {
        kind: DacKind::Ad5593r,
        channels: 8,
        bits: 12,
        full_scale_uv: 5_000_000,
    };
    /// An MCP4728 with the internal 2.048 V reference at gain 2: 0–4.096 V.
    pub const MCP4728_4V096: DacSpec = DacSpec {
        kind: DacKind::Mcp4728,
        channels: 4,
        bits: 12,
        full_scale_uv: 4_096_000,
    };
    /// A virtual 12-bit, 8-channel, 0–5 V DAC.
    pub const VIRTUAL_5V: DacSpec = DacSpec {
        kind: DacKind::Virtual,
        channels: 8,
        bits: 12,
        full_scale_uv: 5_000_000,
    };
}
