//! The node's configuration: its id, UDP port and IPv4 address (static or DHCP).
//!
//! On QEMU it comes from the semihosting command line (`qemu-system-arm … -append "id=… ip=…"`);
//! a Teensy uses its defaults (id from the MAC address, DHCP).

use core::fmt::Write as _;
use core::net::Ipv4Addr;

use embassy_net::{Ipv4Cidr, StaticConfigV4};
use heapless::{String, Vec};

/// What a node needs to know before its network comes up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node id (mDNS instance name and `id` TXT value).
    pub id: String<32>,
    /// UDP port of the node's session socket.
    pub port: u16,
    /// Static address and prefix length; `None` = DHCP.
    pub ip: Option<(Ipv4Addr, u8)>,
    /// Default gateway with a static address.
    pub gateway: Option<Ipv4Addr>,
}

/// A `key=value` item the parser did not accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadItem<'a>(pub &'a str);

impl NodeConfig {
    /// The defaults for a board with MAC address `mac`: id `mcu-` + the last three MAC bytes
    /// in hex, [`crate::DEFAULT_PORT`], DHCP.
    pub fn defaults(mac: [u8; 6]) -> Self {
        let mut id = String::new();
        // 4 + 6 characters always fit in 32.
        let _ = write!(id, "mcu-{:02x}{:02x}{:02x}", mac[3], mac[4], mac[5]);
        NodeConfig {
            id,
            port: crate::DEFAULT_PORT,
            ip: None,
            gateway: None,
        }
    }

    /// Applies whitespace-separated `id=NAME`, `port=N`, `ip=A.B.C.D/LEN`, `gw=A.B.C.D` items
    /// (unknown keys and words without `=` are ignored: the line may carry other things).
    pub fn apply<'a>(&mut self, line: &'a str) -> Result<(), BadItem<'a>> {
        for item in line.split_ascii_whitespace() {
            let Some((key, value)) = item.split_once('=') else {
                continue;
            };
            let bad = || BadItem(item);
            match key {
                "id" => {
                    if value.is_empty() {
                        return Err(bad());
                    }
                    self.id.clear();
                    self.id.push_str(value).map_err(|_| bad())?;
                }
                "port" => self.port = value.parse().map_err(|_| bad())?,
                "ip" => {
                    let (addr, len) = value.split_once('/').ok_or_else(bad)?;
                    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
                    let len: u8 = len.parse().map_err(|_| bad())?;
                    if len > 32 {
                        return Err(bad());
                    }
                    self.ip = Some((addr, len));
                }
                "gw" => self.gateway = Some(value.parse().map_err(|_| bad())?),
                _ => {}
            }
        }
        Ok(())
    }

    /// The embassy-net configuration: static when an address is set, DHCP otherwise.
    pub fn net_config(&self) -> embassy_net::Config {
        match self.ip {
            Some((addr, len)) => embassy_net::Config::ipv4_static(StaticConfigV4 {
                address: Ipv4Cidr::new(addr, len),
                gateway: self.gateway,
                dns_servers: Vec::new(),
            }),
            None => embassy_net::Config::dhcpv4(Default::default()),
        }
    }
}
