//! VoiceMesh wire protocol: the messages coordinator, Linux nodes and MCU nodes exchange, the
//! frame codec that carries them, and the two notions of time they share.
//!
//! The crate is `#![no_std]` and allocation-free so the very same types run on a Teensy 4.1 and
//! on Linux. Every string and list in a message has a fixed capacity ([`heapless`]), so a
//! decoder fed hostile bytes can never be talked into allocating: the worst it can do is fail
//! with a [`DecodeError`]. With the `std` feature the body is encoded with `rmp-serde`; without
//! it with `messagepack-serde`. Both produce the same bytes, which the golden vectors under
//! `tests/` pin down.
//!
//! A frame is `[len: u32 BE][major: u8][minor: u8][MessagePack body]` where `len` counts the
//! version bytes and the body (see `docs/wire-protocol.md`). The version is read before the
//! body, so a peer of another major version is refused with [`DecodeError::VersionMismatch`]
//! even when its messages would not parse.
#![no_std]
#![deny(missing_docs)]

#[cfg(feature = "std")]
extern crate std;

mod msg;
mod time;

pub mod codec;
pub mod cv;
pub mod datagram;
pub mod discovery;
mod reader;
#[cfg(feature = "std")]
pub use codec::encode_frame_vec;
pub use codec::{
    DecodeError, EncodeError, FRAME_HEADER_LEN, Frame, MAX_BODY_LEN, MAX_FRAME_LEN, decode_frame,
    encode_frame, frame_len,
};
pub use msg::*;
pub use reader::FrameReader;
pub use time::{ClusterTime, MAX_BPM, MIN_BPM, Timeline};

/// Major protocol version: peers with another major version cannot talk and are refused.
pub const PROTOCOL_VERSION: u8 = 1;
/// Minor protocol version: additions that older peers of the same major version may ignore.
///
/// History: 1.0 first release; 1.1 added `Status::load_max_permille`; 1.2 added the MCU
/// messages `CvAssign`, `Control`, `TimeSync` and `CvReport`, the node's `Onset` report
/// (node → coordinator, sent only to a 1.2 peer), and the PTP fields of `Status`
/// (`clock_state`, `clock_path_delay_ns`, `clock_rate_ppb`, `clock_jitter_ns`, `clock_steps`).
pub const PROTOCOL_MINOR: u8 = 2;
