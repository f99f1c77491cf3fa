//! A UDP/IPv4 multicast socket whose packets carry kernel software timestamps.
//!
//! PTP's accuracy depends on when a packet really left and arrived, so the stamps come from the
//! kernel (`SO_TIMESTAMPING`), not from user space, where scheduling noise costs tens of
//! microseconds. Receive stamps ride on each datagram as an `SCM_TIMESTAMPING` control message;
//! transmit stamps come back later on the socket's error queue (`MSG_ERRQUEUE`), each tagged with
//! the number of the datagram it belongs to (`SOF_TIMESTAMPING_OPT_ID`, counting from 0 at the
//! moment timestamping was switched on), without a copy of the payload
//! (`SOF_TIMESTAMPING_OPT_TSONLY`).
//!
//! Stamps are `CLOCK_REALTIME` nanoseconds, the local clock of
//! [`ClusterClock`](crate::clock::ClusterClock); the caller maps them to cluster time.
//!
//! Several processes on one host (the grandmaster and nodes of a demo) must hear each other, so
//! every socket binds the group address itself with `SO_REUSEADDR` (a socket bound to the group
//! gets only that group's datagrams), and multicast loopback is on.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::mem::{MaybeUninit, size_of};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The IPv4 multicast group of PTP (all messages except peer delay).
pub const PTP_PRIMARY_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 1, 129);

/// A received datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Bytes written into the caller's buffer.
    pub len: usize,
    /// Kernel receive stamp, `CLOCK_REALTIME` ns; `None` if the kernel attached none.
    pub local_ns: Option<u64>,
}

/// A transmit stamp from the error queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxStamp {
    /// Number of the datagram on this socket (0 for the first one sent after opening).
    pub id: u32,
    /// When the kernel sent it, `CLOCK_REALTIME` ns.
    pub local_ns: u64,
}

/// A multicast UDP socket with kernel software timestamps. See the module docs.
#[derive(Debug)]
pub struct TimestampedSocket {
    fd: AsyncFd<Socket>,
    dest: SocketAddrV4,
    next_id: u32,
}

/// Control-message buffer, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 512]);

impl TimestampedSocket {
    /// Opens a socket on `group:port`, joined on the interface with address `iface`, sending
    /// there with TTL 1 and loopback on. `tx_stamps` asks for transmit stamps too (event
    /// messages); receive stamps are always on.
    ///
    /// # Panics
    /// Outside a tokio runtime with IO enabled (the socket registers with its reactor).
    pub fn open(group: Ipv4Addr, port: u16, iface: Ipv4Addr, tx_stamps: bool) -> io::Result<Self> {
        let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        sock.set_reuse_address(true)?;
        sock.bind(&SockAddr::from(SocketAddrV4::new(group, port)))?;
        sock.join_multicast_v4(&group, &iface)?;
        sock.set_multicast_if_v4(&iface)?;
        sock.set_multicast_loop_v4(true)?;
        sock.set_multicast_ttl_v4(1)?;
        let mut flags = libc::SOF_TIMESTAMPING_RX_SOFTWARE | libc::SOF_TIMESTAMPING_SOFTWARE;
        if tx_stamps {
            flags |= libc::SOF_TIMESTAMPING_TX_SOFTWARE
                | libc::SOF_TIMESTAMPING_OPT_ID
                | libc::SOF_TIMESTAMPING_OPT_TSONLY;
        }
        set_timestamping(&sock, flags)?;
        sock.set_nonblocking(true)?;
        // SAFETY: socket2's `Socket` owns its fd, keeps it open until dropped and always returns
        // the same one; the `AsyncFd` owns the socket, so the fd outlives the registration.
        let fd =
            unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE | Interest::ERROR)? };
        Ok(TimestampedSocket {
            fd,
            dest: SocketAddrV4::new(group, port),
            next_id: 0,
        })
    }

    /// Sends `data` to the group without waiting. Returns the datagram's number, which its
    /// transmit stamp will carry. A full send buffer is an error (`WouldBlock`): PTP would
    /// rather lose a packet than send it late.
    pub fn send(&mut self, data: &[u8]) -> io::Result<u32> {
        self.fd
            .get_ref()
            .send_to(data, &SockAddr::from(self.dest))?;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        Ok(id)
    }

    /// Receives one datagram into `buf` with its kernel receive stamp.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        self.fd
            .async_io(Interest::READABLE, |s| recv_with_stamp(s.as_raw_fd(), buf))
            .await
    }

    /// Waits for the next transmit stamp on the error queue.
    pub async fn recv_tx_stamp(&self) -> io::Result<TxStamp> {
        loop {
            let mut guard = self.fd.ready(Interest::ERROR).await?;
            match read_error_queue(self.fd.get_ref().as_raw_fd()) {
                Ok(Some(stamp)) => return Ok(stamp),
                // Something other than a timestamp (an ICMP error): skip it.
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => return Err(e),
            }
        }
    }
}

fn set_timestamping(sock: &Socket, flags: libc::c_uint) -> io::Result<()> {
    let value = flags as libc::c_int;
    // SAFETY: the fd is open; `value` is a c_int that outlives the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPING,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The first (software) stamp of an `SCM_TIMESTAMPING` payload, in ns.
///
/// # Safety
/// `cmsg` must point to a valid control message of type `SCM_TIMESTAMPING` inside a live buffer.
unsafe fn software_stamp(cmsg: *const libc::cmsghdr) -> Option<u64> {
    // SAFETY: the caller guarantees `cmsg` is valid; the kernel's `scm_timestamping` holds three
    // timespecs, the first being the software stamp. read_unaligned copes with any alignment.
    let ts: libc::timespec = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
    if ts.tv_sec == 0 && ts.tv_nsec == 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

fn recv_with_stamp(fd: libc::c_int, buf: &mut [u8]) -> io::Result<Received> {
    let mut control = MaybeUninit::<CmsgBuf>::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value that we fill in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<CmsgBuf>() as _;
    // SAFETY: `msg` points to `iov` (over `buf`) and `control`, all alive and writable for the
    // call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut local_ns = None;
    // SAFETY: the kernel filled `msg.msg_control` with `msg_controllen` bytes of well-formed
    // control messages; the CMSG_* walkers stay within them.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPING
            {
                local_ns = software_stamp(cmsg);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        len: n as usize,
        local_ns,
    })
}

/// Reads one message of the error queue: `Some` if it is a transmit stamp, `None` if it is
/// something else, `WouldBlock` if the queue is empty.
fn read_error_queue(fd: libc::c_int) -> io::Result<Option<TxStamp>> {
    let mut control = MaybeUninit::<CmsgBuf>::zeroed();
    let mut scratch = [0u8; 64];
    let mut iov = libc::iovec {
        iov_base: scratch.as_mut_ptr().cast(),
        iov_len: scratch.len(),
    };
    // SAFETY: as in `recv_with_stamp`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<CmsgBuf>() as _;
    // SAFETY: as in `recv_with_stamp`.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = None;
    let mut id = None;
    // SAFETY: as in `recv_with_stamp`; IP_RECVERR payloads are `sock_extended_err`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let level = (*cmsg).cmsg_level;
            let ty = (*cmsg).cmsg_type;
            if level == libc::SOL_SOCKET && ty == libc::SCM_TIMESTAMPING {
                stamp = software_stamp(cmsg);
            } else if level == libc::SOL_IP && ty == libc::IP_RECVERR {
                let ee: libc::sock_extended_err =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                if ee.ee_errno == libc::ENOMSG as u32
                    && ee.ee_origin == libc::SO_EE_ORIGIN_TIMESTAMPING
                {
                    id = Some(ee.ee_data);
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(match (id, stamp) {
        (Some(id), Some(local_ns)) => Some(TxStamp { id, local_ns }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::local_now_ns;

    /// On loopback (127.0.0.1 as the multicast interface, nothing leaves the host), a datagram
    /// sent to the group comes back to a second socket on the same port with a receive stamp,
    /// and the sender gets a transmit stamp for it, both close to now and in order.
    ///
    /// The kernel switches receive stamping on machine-wide lazily (a deferred static-key
    /// update when the first socket asks for it), so the first datagrams after opening may
    /// arrive unstamped: the test sends until one is stamped, within a bounded number of tries.
    #[tokio::test]
    async fn loopback_multicast_carries_kernel_stamps() {
        // A group of our own and a per-process port keep this test from meeting a real PTP
        // daemon's traffic on the host, and parallel runs from meeting each other.
        let group = Ipv4Addr::new(239, 255, 77, 129);
        let port = 40000 + (std::process::id() % 20000) as u16;
        let lo = Ipv4Addr::LOCALHOST;
        let mut tx = TimestampedSocket::open(group, port, lo, true).expect("open sender");
        let rx = TimestampedSocket::open(group, port, lo, false).expect("open receiver");
        let mut buf = [0u8; 64];
        const LIMIT: std::time::Duration = std::time::Duration::from_secs(2);
        for attempt in 0u32..1000 {
            let payload = attempt.to_be_bytes();
            let before = local_now_ns();
            let id = tx.send(&payload).expect("send");
            assert_eq!(id, attempt, "datagram numbers count from 0");
            let stamp = tokio::time::timeout(LIMIT, tx.recv_tx_stamp())
                .await
                .expect("no transmit stamp within 2 s")
                .expect("tx stamp");
            assert_eq!(stamp.id, id);
            let got = tokio::time::timeout(LIMIT, rx.recv(&mut buf))
                .await
                .expect("datagram not received within 2 s")
                .expect("recv");
            assert_eq!(&buf[..got.len], &payload);
            // The sender hears its own datagram too (loopback on): read it, or its receive
            // queue fills and the kernel, charging stamps to the same buffer, drops them.
            let own = tokio::time::timeout(LIMIT, tx.recv(&mut buf))
                .await
                .expect("own datagram not looped back within 2 s")
                .expect("recv own");
            assert_eq!(&buf[..own.len], &payload);
            let after = local_now_ns();
            assert!(before <= stamp.local_ns && stamp.local_ns <= after);
            if let Some(rx_ns) = got.local_ns {
                assert!(stamp.local_ns <= rx_ns && rx_ns <= after);
                return;
            }
        }
        panic!("no receive stamp in 1000 datagrams");
    }
}
