//! The VoiceMesh Linux node.
#![deny(missing_docs)]

pub mod clock;
pub mod engine;
pub mod net;

pub use net::NetScope;
