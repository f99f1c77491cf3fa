//! A clean-room Ableton Link peer, written from `shared/protocols/ableton-link.md` (our own
//! notes on the protocol; no Link code was read).
//!
//! [`wire`] parses and builds the datagrams; [`peer::LinkPeer`] is the sans-IO core (discovery,
//! peer table, PING/PONG measurement, session founding and joining, timeline and start/stop
//! rules) that takes host time in µs as a value. The tokio glue that owns the sockets and maps
//! Link's timeline onto the cluster timeline lives beside them. docs/link.md tells what is
//! supported and how it maps to cluster time.

pub mod glue;
pub mod peer;
pub mod wire;

pub use peer::{GatewayId, LinkPeer, LinkStats, SocketKind, Transmit};
pub use wire::{NodeId, SessionId, StartStop, WireTimeline};

#[cfg(test)]
mod sim;
