//! The VoiceMesh MCU application, shared by the `qemu-an500` and `teensy41` firmwares.
//!
//! Each firmware brings its board: an embassy-net driver, an embassy-time driver, a log sink
//! and its DACs; this crate brings what runs on top of the network stack: the address
//! configuration (static from a `key=value` line, or DHCP), the mDNS responder that advertises
//! `_voicemesh._udp` with `role=mcu`, and the session loop that runs the `voicemesh-mcu` core
//! over UDP on the board's DACs.
#![no_std]
#![deny(missing_docs)]

pub mod config;
pub mod log;
pub mod mdns;
pub mod net;
pub mod rng;
pub mod session;

pub use config::NodeConfig;

/// The UDP port an MCU node listens on unless its config says otherwise.
pub const DEFAULT_PORT: u16 = 7410;
