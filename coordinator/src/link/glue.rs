//! The tokio side of the Link peer: sockets per interface, the host clock, and the mapping of
//! Link's timeline onto the cluster timeline.
//!
//! One task owns the [`LinkPeer`]. Each gateway (one per IPv4 interface address) has three
//! sockets, as Link's own peers do: a multicast receiver bound to `0.0.0.0:20808` and joined to
//! 224.76.78.75 on that interface (`IP_MULTICAST_ALL` off, so it hears only that interface), a
//! discovery socket bound to `addr:0` that sends ALIVE/BYEBYE to the group and receives
//! RESPONSEs, and a measurement socket bound to `addr:0` (its address goes out as `mep4`).
//! Multicast loopback is on only for 127.0.0.1. A reader task per socket stamps each datagram
//! with the host clock at once and hands it to the peer's task.
//!
//! Interfaces are rescanned every 5 s. In the loopback scope only 127.0.0.1 is used; in the LAN
//! scope every interface that is up and running, loopback included.
//!
//! Host time is `CLOCK_MONOTONIC_RAW` in µs, the clock Ableton's Linux peers use, so phases can
//! be compared at the same host instant. Cluster time is a model over `CLOCK_REALTIME`
//! ([`ClusterClock`]); [`HostMap`] samples both clocks to carry a Link timeline to cluster time
//! and is re-sampled every second (the two clocks may drift apart by NTP slewing).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use voicemesh_node::NetScope;
use voicemesh_node::clock::{ClusterClock, local_now_ns};
use voicemesh_protocol::{ClusterTime, Timeline};

use super::peer::{DISCOVERY_PORT, GatewayId, LinkPeer, MULTICAST_GROUP, SocketKind};
use super::wire::StartStop;
use crate::tempo::{LinkStatus, TempoHandle, bpm_of};

/// Interface rescan period.
pub const RESCAN: Duration = Duration::from_secs(5);
/// Host/cluster clock mapping refresh period.
const REMAP: Duration = Duration::from_secs(1);
/// A remapped timeline is re-sent to the nodes when it moved by more than this.
const REMAP_THRESHOLD_NS: i128 = 20_000;

/// Link host time now: `CLOCK_MONOTONIC_RAW` in µs.
pub fn host_now_us() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_MONOTONIC_RAW exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts) };
    ts.tv_sec * 1_000_000 + ts.tv_nsec / 1_000
}

/// Link host time (µs) ↔ cluster time (ns): `cluster = host × 1000 + offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMap {
    /// `cluster_ns − host_us × 1000`.
    pub offset_ns: i128,
}

impl HostMap {
    /// Samples both clocks (the host clock on both sides of the cluster-clock reading).
    pub fn sample(clock: &ClusterClock) -> Self {
        let mut best: Option<(i64, HostMap)> = None;
        for _ in 0..3 {
            let a = host_now_us();
            let c = clock.to_cluster(local_now_ns());
            let b = host_now_us();
            let mid_ns = (i128::from(a) + i128::from(b)) * 500;
            let m = HostMap {
                offset_ns: i128::from(c.as_nanos()) - mid_ns,
            };
            if best.is_none_or(|(w, _)| b - a < w) {
                best = Some((b - a, m));
            }
        }
        best.map(|(_, m)| m).unwrap_or(HostMap { offset_ns: 0 })
    }

    /// Cluster time at host time `host_us`.
    pub fn to_cluster(&self, host_us: i64) -> ClusterTime {
        let ns = i128::from(host_us) * 1000 + self.offset_ns;
        ClusterTime(ns.clamp(0, i128::from(u64::MAX)) as u64)
    }

    /// Host time (µs, rounded) at cluster time `t`.
    pub fn to_host(&self, t: ClusterTime) -> i64 {
        let ns = i128::from(t.as_nanos()) - self.offset_ns;
        ns.div_euclid(1000) as i64
    }
}

/// The cluster timeline equal to `peer`'s Link session timeline under `map`.
pub fn cluster_timeline(peer: &LinkPeer, map: &HostMap) -> Timeline {
    let tl = peer.timeline();
    Timeline {
        ns_per_beat: (tl.micros_per_beat.max(1) as u64) * 1000,
        beat0_micro: tl.beat_origin,
        t0: map.to_cluster(peer.host(tl.time_origin)),
    }
}

struct Rx {
    gateway: GatewayId,
    measurement: bool,
    src: SocketAddrV4,
    data: Vec<u8>,
    at: i64,
}

struct Gateway {
    id: GatewayId,
    addr: Ipv4Addr,
    /// Send ends (duplicated descriptors of the discovery and measurement sockets): a plain
    /// non-blocking `send_to` on UDP does not wait for tokio to have seen the socket writable.
    discovery: std::net::UdpSocket,
    measurement: std::net::UdpSocket,
    stop: CancellationToken,
}

fn udp(addr: SocketAddrV4, multicast_if: Ipv4Addr, reuse: bool) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    if reuse {
        s.set_reuse_address(true)?;
    }
    s.set_multicast_all_v4(false)?;
    s.set_multicast_if_v4(&multicast_if)?;
    s.set_multicast_loop_v4(multicast_if == Ipv4Addr::LOCALHOST)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::V4(addr).into())?;
    Ok(s)
}

fn tokio_socket(s: Socket) -> std::io::Result<Arc<UdpSocket>> {
    Ok(Arc::new(UdpSocket::from_std(s.into())?))
}

impl Gateway {
    fn open(
        id: GatewayId,
        addr: Ipv4Addr,
        tx: &mpsc::Sender<Rx>,
        tracker: &TaskTracker,
        parent: &CancellationToken,
    ) -> std::io::Result<(Self, SocketAddrV4)> {
        let mcast = udp(
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DISCOVERY_PORT),
            addr,
            true,
        )?;
        mcast.join_multicast_v4(&MULTICAST_GROUP, &addr)?;
        let discovery = udp(SocketAddrV4::new(addr, 0), addr, false)?;
        let measurement = udp(SocketAddrV4::new(addr, 0), addr, false)?;
        let (discovery_tx, measurement_tx) = (discovery.try_clone()?, measurement.try_clone()?);
        let mep = match measurement.local_addr()?.as_socket() {
            Some(SocketAddr::V4(a)) => a,
            _ => return Err(std::io::Error::other("no IPv4 measurement address")),
        };
        let stop = parent.child_token();
        for (sock, is_measurement) in [(mcast, false), (discovery, false), (measurement, true)] {
            let sock = tokio_socket(sock)?;
            tracker.spawn(read_loop(
                sock,
                id,
                is_measurement,
                tx.clone(),
                stop.clone(),
            ));
        }
        Ok((
            Gateway {
                id,
                addr,
                discovery: discovery_tx.into(),
                measurement: measurement_tx.into(),
                stop,
            },
            mep,
        ))
    }
}

async fn read_loop(
    sock: Arc<UdpSocket>,
    gateway: GatewayId,
    measurement: bool,
    tx: mpsc::Sender<Rx>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 2048];
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.recv_from(&mut buf) => r,
        };
        let at = host_now_us();
        match r {
            Ok((n, SocketAddr::V4(src))) => {
                let rx = Rx {
                    gateway,
                    measurement,
                    src,
                    data: buf[..n].to_vec(),
                    at,
                };
                if tx.try_send(rx).is_err() {
                    tracing::debug!("Link receive queue full; datagram dropped");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!("Link socket receive error: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// The addresses gateways go on: 127.0.0.1 in the loopback scope; in the LAN scope every
/// IPv4 address of an interface that is up and running (loopback included).
fn wanted_addrs(scope: NetScope) -> Vec<Ipv4Addr> {
    match scope {
        NetScope::Loopback => vec![Ipv4Addr::LOCALHOST],
        NetScope::Lan(_) => voicemesh_node::net::ipv4_addrs_where(|f| {
            f & libc::IFF_UP != 0 && f & libc::IFF_RUNNING != 0
        })
        .unwrap_or_else(|e| {
            tracing::warn!("Link: cannot list interfaces: {e}");
            Vec::new()
        }),
    }
}

/// Runs Link while `enabled` says so, until `cancel`.
pub(crate) async fn run(
    tempo: TempoHandle,
    clock: Arc<ClusterClock>,
    scope: NetScope,
    mut enabled: watch::Receiver<bool>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        if *enabled.borrow_and_update() {
            run_enabled(&tempo, &clock, scope, &mut enabled, &tracker, &cancel).await;
        }
        tempo.set_link_status(LinkStatus::default());
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = enabled.changed() => if r.is_err() { return },
        }
    }
}

struct Published {
    timeline: Timeline,
    start_stop: StartStop,
    peers: u32,
    gateways: u32,
}

async fn run_enabled(
    tempo: &TempoHandle,
    clock: &ClusterClock,
    scope: NetScope,
    enabled: &mut watch::Receiver<bool>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    let mut map = HostMap::sample(clock);
    let now = host_now_us();
    let snap = tempo.snapshot();
    let beat_now = snap.timeline.micro_beats_at(map.to_cluster(now));
    let mut peer = LinkPeer::new(now, rand::random(), bpm_of(&snap.timeline), beat_now);
    let stop = cancel.child_token();
    let (tx, mut rx) = mpsc::channel::<Rx>(1024);
    let mut gateways: Vec<Gateway> = Vec::new();
    let mut next_id: GatewayId = 0;
    let mut rescan = tokio::time::interval(RESCAN);
    let mut remap = tokio::time::interval(REMAP);
    let mut published: Option<Published> = None;
    let mut edits = tempo.app_edits();
    let mut last_stats = (peer.stats(), peer.session_id(), peer.peer_count());
    tracing::info!(node = ?peer.node_id(), "Ableton Link enabled");
    loop {
        let wait = peer
            .poll_timeout()
            .map(|t| Duration::from_micros((t - host_now_us()).max(0) as u64))
            .unwrap_or(Duration::from_secs(1));
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = enabled.changed() => if r.is_err() || !*enabled.borrow_and_update() { break },
            _ = rescan.tick() => {
                let want = wanted_addrs(scope);
                let now = host_now_us();
                for g in gateways.iter().filter(|g| !want.contains(&g.addr)) {
                    let _ = g.discovery.send_to(
                        &peer.byebye(),
                        SocketAddr::from((MULTICAST_GROUP, DISCOVERY_PORT)),
                    );
                    g.stop.cancel();
                    peer.remove_gateway(now, g.id);
                }
                gateways.retain(|g| want.contains(&g.addr));
                for addr in want {
                    if gateways.iter().any(|g| g.addr == addr) {
                        continue;
                    }
                    match Gateway::open(next_id, addr, &tx, tracker, &stop) {
                        Ok((g, mep)) => {
                            tracing::info!(%addr, %mep, "Link gateway up");
                            peer.add_gateway(now, next_id, mep);
                            gateways.push(g);
                            next_id += 1;
                        }
                        Err(e) => tracing::warn!(%addr, "Link gateway not opened: {e}"),
                    }
                }
            }
            _ = remap.tick() => map = HostMap::sample(clock),
            Some(r) = rx.recv() => {
                if r.measurement {
                    // A PONG is judged at its arrival; a PING is answered with the time now.
                    let now = if r.data.get(8) == Some(&2) { r.at } else { host_now_us() };
                    peer.handle_measurement(now, r.gateway, r.src, &r.data);
                } else {
                    peer.handle_discovery(host_now_us(), r.gateway, r.src, &r.data);
                }
            }
            _ = tempo.app_changed() => {}
            _ = tokio::time::sleep(wait) => peer.handle_timeout(host_now_us()),
        }
        // Local edits (HTTP, OSC) go into the Link session.
        let e = tempo.app_edits();
        if e != edits {
            edits = e;
            let s = tempo.snapshot();
            let now = host_now_us();
            peer.set_tempo(now, s.tempo_bpm);
            if s.playing != peer.start_stop().playing {
                peer.set_playing(now, s.playing, now);
            }
        }
        if let Some(t) = peer.poll_timeout()
            && t <= host_now_us()
        {
            peer.handle_timeout(host_now_us());
        }
        flush(&mut peer, &gateways);
        let n_gateways = u32::try_from(gateways.len()).unwrap_or(u32::MAX);
        publish(tempo, &peer, &map, n_gateways, &mut published);
        let now_stats = (peer.stats(), peer.session_id(), peer.peer_count());
        if now_stats != last_stats {
            tracing::debug!(stats = ?now_stats.0, session = ?now_stats.1, peers = now_stats.2, "Link state");
            last_stats = now_stats;
        }
    }
    peer.shutdown();
    flush(&mut peer, &gateways);
    stop.cancel();
    tracing::info!("Ableton Link disabled; BYEBYE sent");
}

/// The session's transport, or `current` while the session has never set one.
fn effective_playing(peer: &LinkPeer, current: bool) -> bool {
    let s = peer.start_stop();
    if s == StartStop::default() {
        current
    } else {
        s.playing
    }
}

fn flush(peer: &mut LinkPeer, gateways: &[Gateway]) {
    while let Some(t) = peer.poll_transmit() {
        let Some(g) = gateways.iter().find(|g| g.id == t.gateway) else {
            continue;
        };
        let sock = match t.socket {
            SocketKind::Discovery => &g.discovery,
            SocketKind::Measurement => &g.measurement,
        };
        if let Err(e) = sock.send_to(&t.payload, SocketAddr::V4(t.dst)) {
            tracing::debug!(dst = %t.dst, "Link send failed: {e}");
        }
    }
}

/// Carries the Link session to the cluster timeline when it changed (or drifted on remap).
fn publish(
    tempo: &TempoHandle,
    peer: &LinkPeer,
    map: &HostMap,
    gateways: u32,
    published: &mut Option<Published>,
) {
    let tl = cluster_timeline(peer, map);
    let st = peer.start_stop();
    let peers = u32::try_from(peer.peer_count()).unwrap_or(u32::MAX);
    let same = published.as_ref().is_some_and(|p| {
        p.start_stop == st
            && p.peers == peers
            && p.gateways == gateways
            && p.timeline.ns_per_beat == tl.ns_per_beat
            && p.timeline.beat0_micro == tl.beat0_micro
            && (i128::from(p.timeline.t0.as_nanos()) - i128::from(tl.t0.as_nanos())).abs()
                <= REMAP_THRESHOLD_NS
    });
    if same {
        return;
    }
    let playing = effective_playing(peer, tempo.snapshot().playing);
    tempo.apply_session(tl, playing);
    tempo.set_link_status(LinkStatus {
        enabled: true,
        peers,
        gateways,
    });
    *published = Some(Published {
        timeline: tl,
        start_stop: st,
        peers,
        gateways,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_timeline_gives_links_beats_at_the_same_instant() {
        let mut p = LinkPeer::new(5_000_000_000, 3, 97.0, 12_345_678);
        p.set_tempo(5_100_000_000, 133.0);
        let map = HostMap {
            offset_ns: 1_795_000_000_000_000_000,
        };
        let tl = cluster_timeline(&p, &map);
        for h in [
            4_000_000_000i64,
            5_100_000_000,
            5_123_456_789,
            9_000_000_001,
        ] {
            let link = p.beats_at_host(h);
            let ours = tl.micro_beats_at(map.to_cluster(h));
            assert!((link - ours).abs() <= 1, "at {h}: {link} vs {ours}");
            assert_eq!(map.to_host(map.to_cluster(h)), h);
        }
    }

    #[test]
    fn host_map_matches_the_clocks() {
        let clock = ClusterClock::new();
        let m = HostMap::sample(&clock);
        let c = clock.now();
        let h = host_now_us();
        // The two readings are microseconds apart.
        assert!(
            (i128::from(m.to_cluster(h).as_nanos()) - i128::from(c.as_nanos())).abs() < 5_000_000
        );
    }
}
