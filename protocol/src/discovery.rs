//! Names shared by everything that speaks VoiceMesh on a LAN: mDNS service types, TXT keys,
//! the QUIC ALPN and the default ports.

/// Service type nodes advertise over mDNS.
pub const NODE_SERVICE: &str = "_voicemesh._udp.local.";
/// Service type the coordinator advertises over mDNS.
pub const COORDINATOR_SERVICE: &str = "_voicemesh-coord._udp.local.";
/// TXT keys of [`NODE_SERVICE`], in the order they are published.
pub const TXT_KEYS: [&str; 7] = ["id", "role", "voices", "cv", "proto", "engines", "port"];
/// ALPN protocol name of the QUIC control session.
pub const ALPN: &[u8] = b"voicemesh/1";
/// Default HTTP port of the coordinator's dashboard and API.
pub const DEFAULT_HTTP_PORT: u16 = 7400;
/// Default UDP port of the coordinator's OSC server.
pub const DEFAULT_OSC_PORT: u16 = 9000;
/// Default PTP event port (non-privileged; 319 when interoperating with other PTP equipment).
pub const DEFAULT_PTP_EVENT_PORT: u16 = 3319;
/// Default PTP general port (non-privileged; 320 when interoperating).
pub const DEFAULT_PTP_GENERAL_PORT: u16 = 3320;
/// Default UDP port an MCU node (firmware or `voicemesh mcu-sim`) listens on.
pub const DEFAULT_MCU_PORT: u16 = 7410;
/// Default heartbeat interval of a control session.
pub const DEFAULT_HEARTBEAT_MS: u16 = 100;
