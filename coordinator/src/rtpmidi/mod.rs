//! RTP-MIDI (AppleMIDI, RFC 6295) input: the coordinator as a network MIDI session that Macs,
//! rtpMIDI on Windows, rtpmidid and node-rtpmidi can invite, or that invites them.
//!
//! Three rings: [`wire`] parses and writes the packets, [`midi`] decodes MIDI lists and single
//! messages, [`session::SessionCore`] runs the sessions sans IO (invitations, CK clock sync, RS
//! feedback, sequence gaps, timestamp mapping). This module is the tokio glue: a control and a
//! data UDP socket (`N`, `N + 1`), one task that feeds the core and hands its MIDI to the
//! allocator, and an mDNS browser for `_apple-midi._udp` so sessions can be invited by name.
//!
//! MIDI from a session is played at the sender's time: the core maps each command's RTP
//! timestamp (packet timestamp + delta times) to cluster time through the session's CK clock
//! estimate, and that time is what the allocator gets as `now` (it adds the lookahead). Every
//! key and pedal a session holds is tracked; when the session ends (BY, silence, the remote's
//! port closed, removed through the API) they are all released.
//!
//! The sockets ask for `IP_RECVERR`, so an ICMP "port unreachable" answering our RS or CK to a
//! killed peer ends its session at once instead of after the silence timeout.

pub(crate) mod api;
pub mod midi;
pub mod session;
pub mod wire;

#[cfg(test)]
mod sim;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use voicemesh_node::NetScope;
use voicemesh_protocol::ClusterTime;

use crate::allocator::MidiEvent;
use crate::state::Shared;
use midi::{ClockFollower, HeldNotes, MidiMessage};
use session::{CoreConfig, Event, PeerId, PeerSnapshot, Port, SessionCore};

/// Default control port (the data port is the next one).
pub const DEFAULT_PORT: u16 = 5004;
/// The mDNS service type of AppleMIDI sessions.
pub const SERVICE: &str = "_apple-midi._udp.local.";

/// How the RTP-MIDI endpoint runs.
#[derive(Clone, Debug)]
pub struct RtpMidiConfig {
    /// Control port address; the data port is its port + 1.
    pub control: SocketAddr,
    /// Session name shown to peers.
    pub name: String,
    /// Sessions to invite and keep: `ip:port`, `ip` (port 5004) or an mDNS instance name.
    pub invite: Vec<String>,
    /// A connected session silent this long is dropped.
    pub silence_timeout: Duration,
}

impl RtpMidiConfig {
    /// Defaults on `ip`, port 5004.
    pub fn new(ip: IpAddr) -> Self {
        RtpMidiConfig {
            control: SocketAddr::new(ip, DEFAULT_PORT),
            name: "VoiceMesh".into(),
            invite: Vec::new(),
            silence_timeout: Duration::from_secs(60),
        }
    }
}

/// What an invitation names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A control port address.
    Addr(SocketAddr),
    /// An `_apple-midi._udp` instance name, resolved over mDNS.
    Name(String),
}

impl Target {
    /// `ip:port`, `ip` (port 5004) or an instance name. Empty or over-long names are refused.
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Target::Addr(a));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Target::Addr(SocketAddr::new(ip, DEFAULT_PORT)));
        }
        if s.is_empty() || s.len() > 63 {
            return Err(format!(
                "{s:?} is neither ip:port nor an mDNS session name (1–63 bytes)"
            ));
        }
        Ok(Target::Name(s.to_string()))
    }
}

/// The persisted part (`rtpmidi` in `config.json`, `/api/config/rtpmidi`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtpMidiSettings {
    /// Sessions to invite and keep: `ip:port`, `ip` or an mDNS session name (at most 16).
    #[serde(default)]
    pub invite: Vec<String>,
}

impl RtpMidiSettings {
    /// Every entry must parse as a [`Target`]; at most 16.
    pub fn validate(&self) -> Result<(), crate::config::FieldError> {
        if self.invite.len() > 16 {
            return Err(crate::config::FieldError {
                field: "invite".into(),
                message: "at most 16 sessions".into(),
            });
        }
        for (i, t) in self.invite.iter().enumerate() {
            Target::parse(t).map_err(|message| crate::config::FieldError {
                field: format!("invite[{i}]"),
                message,
            })?;
        }
        Ok(())
    }
}

/// A session seen over mDNS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovered {
    /// Instance name.
    pub name: String,
    /// Control port address.
    pub address: String,
}

/// The RTP-MIDI part of `/api/cluster`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RtpMidiSnapshot {
    /// Session name.
    pub name: String,
    /// Control port (data port = +1).
    pub control_port: u16,
    /// Our SSRC.
    pub ssrc: u32,
    /// Every session (connected, half-open, inviting, waiting to invite again).
    pub sessions: Vec<PeerSnapshot>,
    /// Names to invite once mDNS finds them.
    pub invite_names: Vec<String>,
    /// `_apple-midi._udp` sessions mDNS found.
    pub discovered: Vec<Discovered>,
    /// Datagrams received on both ports.
    pub datagrams: u64,
    /// Datagrams that did not parse, by reason.
    pub malformed: BTreeMap<String, u64>,
    /// Datagrams from no known session.
    pub unknown_sender: u64,
    /// Invitations refused (too many sessions).
    pub refused: u64,
    /// Notes released because their session ended.
    pub released_notes: u64,
    /// SysEx messages received (complete), dropped (cancelled or too long).
    pub sysex: u64,
    /// Tempo implied by incoming MIDI clock, BPM.
    pub clock_bpm: Option<f64>,
    /// Whether the last transport message was Start/Continue (true) or Stop (false).
    pub transport_playing: bool,
}

#[derive(Debug, Default)]
struct Glue {
    held: HashMap<PeerId, HeldNotes>,
    clock: ClockFollower,
    released_notes: u64,
    sysex: u64,
    /// mDNS instance → control address.
    found: BTreeMap<String, SocketAddr>,
    /// Names to invite when found.
    wanted: Vec<String>,
    /// The invitations of the persisted configuration now in force.
    configured: Vec<Target>,
    /// The MIDI-clock tempo last applied to the cluster timeline.
    applied_bpm: Option<f64>,
}

/// The running endpoint, shared with the HTTP API.
#[derive(Debug)]
pub struct Handle {
    core: Mutex<SessionCore>,
    glue: Mutex<Glue>,
    wake: Notify,
    name: String,
    control: SocketAddr,
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Handle {
    /// The bound control port address.
    pub fn control_addr(&self) -> SocketAddr {
        self.control
    }

    /// Invites a session and keeps it (re-invited whenever it ends). Returns the session id
    /// for an address, `None` for a name (invited once mDNS finds it).
    pub fn invite(&self, target: Target) -> Option<PeerId> {
        let now = self.shared.now().as_nanos();
        let id = match target {
            Target::Addr(a) => Some(lock(&self.core).invite(now, a, true)),
            Target::Name(n) => {
                let mut g = lock(&self.glue);
                let found = g.found.get(&n).copied();
                if !g.wanted.contains(&n) {
                    g.wanted.push(n);
                }
                drop(g);
                found.map(|a| lock(&self.core).invite(now, a, true))
            }
        };
        self.wake.notify_one();
        id
    }

    /// Ends session `id` (BY) and stops keeping it; its notes are released.
    pub fn remove(&self, id: PeerId) -> bool {
        let now = self.shared.now().as_nanos();
        let removed = lock(&self.core).remove(now, id);
        self.wake.notify_one();
        removed
    }

    /// Makes the configured invitations `list` (already validated): new ones are invited, ones
    /// no longer listed are ended and forgotten.
    pub fn set_configured(&self, list: &[String]) {
        let next: Vec<Target> = list.iter().filter_map(|t| Target::parse(t).ok()).collect();
        let old = std::mem::replace(&mut lock(&self.glue).configured, next.clone());
        for gone in old.iter().filter(|t| !next.contains(t)) {
            let addr = match gone {
                Target::Addr(a) => Some(*a),
                Target::Name(n) => {
                    self.forget_name(n);
                    lock(&self.glue).found.get(n).copied()
                }
            };
            let id = addr.and_then(|a| {
                lock(&self.core)
                    .peers()
                    .into_iter()
                    .find(|p| p.role == session::Role::Initiator && p.control == a.to_string())
                    .map(|p| p.id)
            });
            if let Some(id) = id {
                self.remove(id);
            }
        }
        for new in next.into_iter().filter(|t| !old.contains(t)) {
            self.invite(new);
        }
    }

    /// Stops inviting `name`.
    pub fn forget_name(&self, name: &str) -> bool {
        let mut g = lock(&self.glue);
        let before = g.wanted.len();
        g.wanted.retain(|n| n != name);
        before != g.wanted.len()
    }

    /// Sends MIDI bytes (one or more complete messages) to every connected session. Returns
    /// how many sessions got it, or why the bytes are not MIDI.
    pub fn send_midi(&self, bytes: &[u8]) -> Result<usize, String> {
        let list = midi_list(bytes)?;
        let now = self.shared.now().as_nanos();
        let n = lock(&self.core).send_midi(now, &list);
        self.wake.notify_one();
        Ok(n)
    }

    /// The `/api/cluster` section.
    pub fn snapshot(&self) -> RtpMidiSnapshot {
        let core = lock(&self.core);
        let (sessions, stats, ssrc) = (core.peers(), core.stats().clone(), core.ssrc());
        drop(core);
        let g = lock(&self.glue);
        RtpMidiSnapshot {
            name: self.name.clone(),
            control_port: self.control.port(),
            ssrc,
            sessions,
            invite_names: g.wanted.clone(),
            discovered: g
                .found
                .iter()
                .map(|(n, a)| Discovered {
                    name: n.clone(),
                    address: a.to_string(),
                })
                .collect(),
            datagrams: stats.datagrams,
            malformed: stats.malformed,
            unknown_sender: stats.unknown_sender,
            refused: stats.refused,
            released_notes: g.released_notes,
            sysex: g.sysex,
            clock_bpm: g.clock.bpm(),
            transport_playing: g.clock.playing,
        }
    }
}

/// Checks that `bytes` are complete MIDI messages and writes them as a command list (delta
/// times 0).
fn midi_list(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut list = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let status = bytes[pos];
        let len = match midi::data_len(status) {
            _ if status < 0x80 => {
                return Err(format!("byte {pos} ({status:#04x}) is not a status byte"));
            }
            Some(n) => n + 1,
            None if status == 0xF0 => match bytes[pos..].iter().position(|&b| b == 0xF7) {
                Some(end) => end + 1,
                None => return Err("SysEx without its closing F7".into()),
            },
            None => return Err(format!("byte {pos} ({status:#04x}) starts no message")),
        };
        let Some(msg) = bytes.get(pos..pos + len) else {
            return Err(format!("the message at byte {pos} is cut short"));
        };
        if midi::decode_message(msg).is_none() {
            return Err(format!("the message at byte {pos} is malformed"));
        }
        wire::push_command(&mut list, 0, msg);
        pos += len;
    }
    if list.is_empty() || list.len() > wire::MAX_LIST {
        return Err(format!("1 to {} bytes of MIDI, please", wire::MAX_LIST));
    }
    Ok(list)
}

/// The two bound sockets, before anything runs.
#[derive(Debug)]
pub(crate) struct Bound {
    control: UdpSocket,
    data: UdpSocket,
    control_addr: SocketAddr,
}

fn bind_std(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = std::net::UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    if addr.is_ipv4() {
        // ICMP errors (port unreachable) into the error queue: a killed peer is noticed.
        let on: libc::c_int = 1;
        // SAFETY: a valid fd and a c_int option value of the right size.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_RECVERR,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(s)
}

/// Binds the control port and the data port right above it. With control port 0 a free pair
/// is searched for.
pub(crate) fn bind(cfg: &RtpMidiConfig) -> std::io::Result<Bound> {
    let pair = |ctrl: SocketAddr| -> std::io::Result<(std::net::UdpSocket, std::net::UdpSocket)> {
        let c = bind_std(ctrl)?;
        let ctrl = c.local_addr()?;
        let data = SocketAddr::new(
            ctrl.ip(),
            ctrl.port().checked_add(1).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "no port above")
            })?,
        );
        Ok((c, bind_std(data)?))
    };
    let (c, d) = if cfg.control.port() == 0 {
        let mut last = None;
        let mut got = None;
        for _ in 0..32 {
            match pair(cfg.control) {
                Ok(p) => {
                    got = Some(p);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        match got {
            Some(p) => p,
            None => return Err(last.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into())),
        }
    } else {
        pair(cfg.control)?
    };
    let control_addr = c.local_addr()?;
    Ok(Bound {
        control: UdpSocket::from_std(c)?,
        data: UdpSocket::from_std(d)?,
        control_addr,
    })
}

/// Starts the endpoint on sockets from [`bind`]; the task ends when `cancel` fires (after
/// saying BY to every session).
pub(crate) fn start(
    cfg: &RtpMidiConfig,
    settings: &RtpMidiSettings,
    bound: Bound,
    shared: Arc<Shared>,
    scope: NetScope,
    tracker: &tokio_util::task::TaskTracker,
    cancel: CancellationToken,
) -> Arc<Handle> {
    let seed = shared.now().as_nanos() ^ u64::from(std::process::id()) << 32;
    let core = SessionCore::new(CoreConfig {
        name: cfg.name.clone(),
        seed,
        silence_timeout_ns: cfg.silence_timeout.as_nanos() as u64,
        ..CoreConfig::default()
    });
    let handle = Arc::new(Handle {
        core: Mutex::new(core),
        glue: Mutex::new(Glue::default()),
        wake: Notify::new(),
        name: cfg.name.clone(),
        control: bound.control_addr,
        shared,
    });
    for t in &cfg.invite {
        match Target::parse(t) {
            Ok(t) => {
                handle.invite(t);
            }
            Err(e) => tracing::warn!("RTP-MIDI invitation ignored: {e}"),
        }
    }
    handle.set_configured(&settings.invite);
    match voicemesh_node::mdns::browse(scope, SERVICE, cancel.clone()) {
        Ok(rx) => {
            tracker.spawn(browse_task(handle.clone(), rx));
        }
        Err(e) => tracing::warn!("RTP-MIDI: no mDNS browsing ({e}); invite by address"),
    }
    tracker.spawn(run(handle.clone(), bound, cancel));
    handle
}

async fn browse_task(
    h: Arc<Handle>,
    mut rx: tokio::sync::mpsc::Receiver<voicemesh_node::mdns::BrowseEvent>,
) {
    use voicemesh_node::mdns::BrowseEvent;
    while let Some(ev) = rx.recv().await {
        match ev {
            BrowseEvent::Resolved(s) | BrowseEvent::Updated(s) => {
                let Some(ip) = s.addrs.first() else { continue };
                let addr = SocketAddr::new(IpAddr::V4(*ip), s.port);
                let wanted = {
                    let mut g = lock(&h.glue);
                    g.found.insert(s.instance.clone(), addr);
                    g.wanted.contains(&s.instance)
                };
                if wanted {
                    let now = h.shared.now().as_nanos();
                    lock(&h.core).invite(now, addr, true);
                    h.wake.notify_one();
                }
            }
            BrowseEvent::Removed { instance } => {
                lock(&h.glue).found.remove(&instance);
            }
        }
    }
}

/// Addresses the kernel reported unreachable (ICMP errors queued by `IP_RECVERR`).
fn drain_errors(sock: &UdpSocket) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    let fd = sock.as_raw_fd();
    for _ in 0..64 {
        // SAFETY: all-zero is a valid sockaddr_in / msghdr; the buffers outlive the call.
        let mut name: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut control = [0u8; 256];
        let mut data = [0u8; 64];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut name as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        // SAFETY: msg points at live buffers of the sizes given.
        let r = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if r < 0 {
            break;
        }
        if i32::from(name.sin_family) == libc::AF_INET {
            let ip = std::net::Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr));
            out.push(SocketAddr::new(IpAddr::V4(ip), u16::from_be(name.sin_port)));
        }
    }
    out
}

async fn run(h: Arc<Handle>, bound: Bound, cancel: CancellationToken) {
    let mut cbuf = vec![0u8; 2048];
    let mut dbuf = vec![0u8; 2048];
    let Bound { control, data, .. } = bound;
    loop {
        let now = h.shared.now().as_nanos();
        let wait = lock(&h.core)
            .poll_timeout()
            .map(|t| Duration::from_nanos(t.saturating_sub(now)))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        let got = tokio::select! {
            _ = cancel.cancelled() => break,
            r = control.recv_from(&mut cbuf) => Some((Port::Control, r)),
            r = data.recv_from(&mut dbuf) => Some((Port::Data, r)),
            _ = h.wake.notified() => None,
            _ = sleep(wait) => None,
        };
        let rx_at = Instant::now();
        let now = h.shared.now().as_nanos();
        {
            let mut core = lock(&h.core);
            match got {
                Some((port, Ok((n, from)))) => {
                    let buf = if port == Port::Control { &cbuf } else { &dbuf };
                    core.handle_datagram(now, port, from, &buf[..n]);
                }
                Some((port, Err(e))) => {
                    let sock = if port == Port::Control {
                        &control
                    } else {
                        &data
                    };
                    let dead = drain_errors(sock);
                    tracing::debug!("RTP-MIDI receive error: {e}; unreachable: {dead:?}");
                    for a in dead {
                        core.handle_unreachable(now, a);
                    }
                }
                None => {}
            }
            core.handle_timeout(now);
        }
        flush(&h, &control, &data, rx_at).await;
    }
    let now = h.shared.now().as_nanos();
    lock(&h.core).close_all(now);
    flush(&h, &control, &data, Instant::now()).await;
}

/// Sends what the core wants sent and plays what it received.
async fn flush(h: &Handle, control: &UdpSocket, data: &UdpSocket, rx_at: Instant) {
    let (transmits, events) = {
        let mut core = lock(&h.core);
        let t: Vec<_> = std::iter::from_fn(|| core.poll_transmit()).collect();
        let e: Vec<_> = std::iter::from_fn(|| core.poll_event()).collect();
        (t, e)
    };
    if !events.is_empty() {
        play(h, events, rx_at);
    }
    for t in transmits {
        let sock = if t.from == Port::Control {
            control
        } else {
            data
        };
        if let Err(e) = sock.send_to(&t.bytes, t.to).await {
            tracing::debug!("RTP-MIDI send to {} failed: {e}", t.to);
        }
    }
}

/// Hands MIDI to the allocator at its mapped time; releases what ended sessions held. MIDI
/// clock sets the cluster tempo (when its estimate moves by 0.5 BPM or more, after a full
/// quarter note of clocks) and Start/Continue/Stop the transport.
fn play(h: &Handle, events: Vec<Event>, rx_at: Instant) {
    let now = h.shared.now();
    let mut glue = lock(&h.glue);
    let mut inner = h.shared.lock();
    let mut wake = false;
    let (mut transport, mut tempo) = (None, None);
    for ev in events {
        match ev {
            Event::Connected { peer } => {
                tracing::info!(peer, "RTP-MIDI session connected");
                glue.held.entry(peer).or_default();
            }
            Event::Disconnected { peer, reason } => {
                tracing::info!(peer, ?reason, "RTP-MIDI session ended");
                if let Some(mut held) = glue.held.remove(&peer) {
                    let release = held.release_all();
                    glue.released_notes += release
                        .iter()
                        .filter(|e| matches!(e, MidiEvent::NoteOff { .. }))
                        .count() as u64;
                    for e in release {
                        let actions = inner.midi_actions(now, e);
                        inner.dispatch(actions, None);
                    }
                }
            }
            Event::Midi { peer, at_ns, msg } => match msg {
                MidiMessage::Channel(e) => {
                    glue.held.entry(peer).or_default().track(&e);
                    wake |= matches!(e, MidiEvent::NoteOn { velocity, .. } if velocity > 0);
                    let actions = inner.midi_actions(ClusterTime(at_ns), e);
                    inner.dispatch_midi(actions, Some(rx_at));
                }
                MidiMessage::SysEx(_) | MidiMessage::SysExDropped => glue.sysex += 1,
                other => {
                    glue.clock.handle(at_ns, &other);
                    match other {
                        MidiMessage::Start | MidiMessage::Continue => transport = Some(true),
                        MidiMessage::Stop => transport = Some(false),
                        MidiMessage::Clock => {
                            if let Some(b) = glue.clock.bpm().filter(|_| glue.clock.clocks > 24)
                                && glue.applied_bpm.is_none_or(|a| (a - b).abs() >= 0.5)
                            {
                                glue.applied_bpm = Some(b);
                                tempo = Some(b);
                            }
                        }
                        _ => {}
                    }
                }
            },
        }
    }
    drop(inner);
    drop(glue);
    if wake {
        h.shared.renew_wakeup.notify_one();
    }
    if transport.is_some() || tempo.is_some() {
        let t = crate::tempo::TempoHandle::new(h.shared.clone());
        if let Some(p) = transport {
            t.set_playing(p);
        }
        if let Some(b) = tempo
            && let Err(e) = t.set_tempo_bpm((b * 100.0).round() / 100.0)
        {
            tracing::debug!("MIDI clock tempo not applied: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            Target::parse("10.0.0.2:5008"),
            Ok(Target::Addr("10.0.0.2:5008".parse().unwrap()))
        );
        assert_eq!(
            Target::parse("10.0.0.2"),
            Ok(Target::Addr("10.0.0.2:5004".parse().unwrap()))
        );
        assert_eq!(
            Target::parse("Studio Mac"),
            Ok(Target::Name("Studio Mac".into()))
        );
        assert!(Target::parse("").is_err());
    }

    #[test]
    fn midi_bytes_become_a_command_list() {
        assert_eq!(
            midi_list(&[0x90, 60, 100, 0x80, 60, 0]).unwrap(),
            [0x90, 60, 100, 0x00, 0x80, 60, 0]
        );
        assert!(midi_list(&[60, 100]).is_err());
        assert!(midi_list(&[0x90, 60]).is_err());
        assert!(midi_list(&[]).is_err());
        assert!(midi_list(&[0xF0, 1, 2]).is_err());
        assert_eq!(midi_list(&[0xF0, 1, 0xF7]).unwrap(), [0xF0, 1, 0xF7]);
    }
}
