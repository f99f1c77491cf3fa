//! Where a daemon's traffic may go: loopback only, or a LAN interface.

use std::net::{IpAddr, Ipv4Addr};

/// The network scope of a daemon. See docs/architecture.md, "Network scope".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetScope {
    /// Everything on 127.0.0.1; multicast names 127.0.0.1 as its interface. Nothing leaves the
    /// machine.
    Loopback,
    /// The LAN interface with this IPv4 address.
    Lan(Ipv4Addr),
}

impl NetScope {
    /// The address unicast sockets bind to.
    pub fn bind_ip(&self) -> IpAddr {
        match self {
            NetScope::Loopback => IpAddr::V4(Ipv4Addr::LOCALHOST),
            NetScope::Lan(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }
    }

    /// The interface address multicast sockets send from and join groups on.
    pub fn multicast_if(&self) -> Ipv4Addr {
        match self {
            NetScope::Loopback => Ipv4Addr::LOCALHOST,
            NetScope::Lan(a) => *a,
        }
    }

    /// The address this daemon advertises to others.
    pub fn advertised_ip(&self) -> IpAddr {
        IpAddr::V4(self.multicast_if())
    }

    /// `Lan` on the first IPv4 interface that is up, not loopback and multicast-capable.
    pub fn first_lan() -> Result<NetScope, std::io::Error> {
        lan_ipv4_addrs()?
            .into_iter()
            .next()
            .map(NetScope::Lan)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no LAN interface: no IPv4 interface is up, multicast-capable and not loopback",
                )
            })
    }
}

/// IPv4 addresses of interfaces that are up, multicast-capable and not loopback.
pub fn lan_ipv4_addrs() -> Result<Vec<Ipv4Addr>, std::io::Error> {
    ipv4_addrs_where(|flags| {
        flags & libc::IFF_UP != 0
            && flags & libc::IFF_LOOPBACK == 0
            && flags & libc::IFF_MULTICAST != 0
    })
}

/// IPv4 addresses of the interfaces whose `IFF_*` flags satisfy `wanted`.
pub fn ipv4_addrs_where(
    wanted: impl Fn(libc::c_int) -> bool,
) -> Result<Vec<Ipv4Addr>, std::io::Error> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `ifap`; we free it below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if wanted(ifa.ifa_flags as libc::c_int) && !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null and points to a sockaddr of the family it names.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
            if family == libc::AF_INET {
                // SAFETY: the family is AF_INET, so the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `ifap` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}
