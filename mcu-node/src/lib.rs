//! The MCU node core: the part of a Teensy 4.1 CV node that does not touch hardware.
//!
//! It is `#![no_std]` so the same code runs in the firmware and, with the `std` feature, in the
//! `voicemesh mcu-sim` simulator. The foundation only fixes its place in the tree and the
//! protocol version it speaks; the CV engine, DAC drivers, session and clock servo arrive with
//! the MCU issue.
#![no_std]
#![deny(missing_docs)]

pub use voicemesh_protocol::PROTOCOL_VERSION;

/// The role an MCU node announces over mDNS (`role=mcu`).
pub const ROLE: &str = "mcu";
