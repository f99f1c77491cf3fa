//! The OSC glue: the UDP and TCP servers, the timetag scheduler's task and feedback to
//! subscribers.
//!
//! Every packet, from either transport, takes one path ([`handle_packet`]): count it, ask the
//! rate limiter, parse it outside the lock, then hand each command to the scheduler, which runs
//! it now or keeps it for its timetag. Running a command ([`run`]) turns it into allocator, CV
//! router or tempo calls and queues the resulting messages on the node sessions.
//!
//! Subscribers (`/voicemesh/subscribe`) get every `/voicemesh/state/*` message once when they
//! subscribe and then whenever a value changes (looked at every [`FEEDBACK_PERIOD`]); a UDP
//! subscription lasts [`SUBSCRIPTION_TTL`] unless renewed, a TCP one as long as its connection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rosc::{OscMessage, OscPacket, OscType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use voicemesh_protocol::{ClusterTime, CvSet, Message, VoiceParam};

use super::limit::RateLimiter;
use super::schedule::Scheduler;
use super::slip::{Deframer, frame};
use super::{DropReason, OscCommand, STATE_PREFIX, When, engine_params, parse_packet};
use crate::allocator::Action;
use crate::state::{Inner, Shared};
use crate::tempo::{TempoHandle, bpm_of};

/// How long a UDP subscription lasts without a renewing `/voicemesh/subscribe`.
pub const SUBSCRIPTION_TTL: Duration = Duration::from_secs(60);
/// Most subscribers at once (the oldest is replaced).
pub const MAX_SUBSCRIBERS: usize = 32;
/// How often the state is compared with what subscribers were last sent.
pub const FEEDBACK_PERIOD: Duration = Duration::from_millis(50);
/// Most OSC TCP connections at once; more are closed on accept.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// Receive buffer asked for on the OSC UDP socket.
const UDP_RECV_BUFFER: usize = 4 << 20;
/// Packets queued for one TCP connection's writer.
const TCP_OUT_QUEUE: usize = 256;

/// Where a packet came from, and where replies to it go.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    /// A UDP datagram from this address.
    Udp(SocketAddr),
    /// A frame on a TCP connection; `tx` takes unframed packets for its writer.
    Tcp {
        peer: SocketAddr,
        tx: mpsc::Sender<Vec<u8>>,
    },
}

impl Source {
    fn peer(&self) -> SocketAddr {
        match self {
            Source::Udp(a) | Source::Tcp { peer: a, .. } => *a,
        }
    }
}

#[derive(Debug)]
enum Dest {
    Udp(SocketAddr),
    Tcp(mpsc::Sender<Vec<u8>>),
}

#[derive(Debug)]
struct Subscriber {
    /// The address the subscription came from (one subscription per origin).
    origin: SocketAddr,
    dest: Dest,
    expires: Option<Instant>,
    /// Has not yet been sent the full state.
    fresh: bool,
}

/// The OSC part of the coordinator's shared state (inside its one lock).
#[derive(Debug)]
pub(crate) struct OscState {
    pub(crate) scheduler: Scheduler,
    subscribers: Vec<Subscriber>,
    /// Global engine parameters set over OSC: sent with every VoiceOn.
    pub(crate) params: BTreeMap<u16, f32>,
    /// The state last sent to subscribers.
    sent: BTreeMap<String, Vec<OscType>>,
    pub(crate) tcp_connections: u64,
}

impl OscState {
    pub(crate) fn new(lookahead_ns: u64) -> Self {
        OscState {
            scheduler: Scheduler::new(lookahead_ns),
            subscribers: Vec::new(),
            params: BTreeMap::new(),
            sent: BTreeMap::new(),
            tcp_connections: 0,
        }
    }

    pub(crate) fn subscribers(&self) -> usize {
        self.subscribers.len()
    }

    /// The global parameters for the voices the `actions` start (appended after their VoiceOn,
    /// at the same `at`, so they apply from the first sample).
    pub(crate) fn voice_on_params(&self, actions: &[Action]) -> Vec<Action> {
        if self.params.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (node, msg) in actions {
            if let Message::VoiceOn(on) = msg {
                for (&param, &value) in &self.params {
                    out.push((
                        node.clone(),
                        Message::VoiceParam(VoiceParam {
                            voice: on.voice,
                            param,
                            value,
                            at: on.at,
                        }),
                    ));
                }
            }
        }
        out
    }
}

/// What the OSC tasks share besides [`Shared`].
#[derive(Debug)]
pub(crate) struct OscServer {
    pub shared: Arc<Shared>,
    pub udp: Arc<UdpSocket>,
    /// Woken when the scheduler got an earlier deadline.
    schedule_wakeup: Notify,
    /// Woken when a subscriber was added.
    feedback_wakeup: Notify,
}

/// Starts the UDP server, the TCP server (if `tcp` is given), the scheduler and feedback.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    udp: UdpSocket,
    tcp: Option<TcpListener>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    // A deeper receive queue absorbs bursts while the task is busy (the kernel caps it at
    // net.core.rmem_max).
    if let Err(e) = socket2::SockRef::from(&udp).set_recv_buffer_size(UDP_RECV_BUFFER) {
        tracing::debug!("OSC socket: SO_RCVBUF: {e}");
    }
    let srv = Arc::new(OscServer {
        shared,
        udp: Arc::new(udp),
        schedule_wakeup: Notify::new(),
        feedback_wakeup: Notify::new(),
    });
    tracker.spawn(udp_task(srv.clone(), cancel.clone()));
    if let Some(l) = tcp {
        tracker.spawn(tcp_accept_task(
            srv.clone(),
            l,
            tracker.clone(),
            cancel.clone(),
        ));
    }
    tracker.spawn(schedule_task(srv.clone(), cancel.clone()));
    tracker.spawn(feedback_task(srv, cancel));
}

/// Counts kept by a receiving task between two visits to the shared lock, so a flood that is
/// rate limited costs no lock per packet.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    received: u64,
    rate_limited: u64,
}

impl Pending {
    /// Flush after this many uncounted packets even while the flood goes on.
    const FLUSH_EVERY: u64 = 1024;

    fn flush(&mut self, g: &mut Inner) {
        g.counters.osc_received += self.received;
        if self.rate_limited > 0 {
            *g.counters
                .osc_dropped
                .entry(DropReason::RateLimited)
                .or_insert(0) += self.rate_limited;
        }
        *self = Pending::default();
    }

    /// Counts a received packet and asks `limiter` whether it may be handled.
    fn admit(&mut self, limiter: &mut RateLimiter, epoch: Instant, from: SocketAddr) -> bool {
        self.received += 1;
        let now_ns = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if limiter.allow(now_ns, from) {
            return true;
        }
        self.rate_limited += 1;
        false
    }
}

/// Reads datagrams until the socket is empty, then waits for it to be readable: counts are
/// flushed to the shared state whenever it runs dry (and every [`Pending::FLUSH_EVERY`]).
async fn udp_task(srv: Arc<OscServer>, cancel: CancellationToken) {
    let mut buf = vec![0u8; 65_536];
    let mut limiter = RateLimiter::new();
    let mut pending = Pending::default();
    let epoch = Instant::now();
    loop {
        match srv.udp.try_recv_from(&mut buf) {
            Ok((n, from)) => {
                if pending.admit(&mut limiter, epoch, from) {
                    handle_packet(
                        &srv,
                        &buf[..n],
                        &Source::Udp(from),
                        Instant::now(),
                        &mut pending,
                    );
                } else if pending.received >= Pending::FLUSH_EVERY {
                    pending.flush(&mut srv.shared.lock());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if pending.received > 0 {
                    pending.flush(&mut srv.shared.lock());
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = srv.udp.readable() => if let Err(e) = r {
                        tracing::warn!("OSC socket failed: {e}");
                        sleep(Duration::from_millis(100)).await;
                    },
                }
            }
            // ICMP errors and the like: keep serving.
            Err(e) => tracing::debug!("OSC receive error: {e}"),
        }
    }
}

async fn tcp_accept_task(
    srv: Arc<OscServer>,
    listener: TcpListener,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("OSC TCP accept error: {e}");
                    sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        use std::sync::atomic::Ordering::SeqCst;
        if open.load(SeqCst) >= MAX_TCP_CONNECTIONS {
            tracing::warn!(%peer, "OSC TCP connection refused: {MAX_TCP_CONNECTIONS} open");
            continue;
        }
        open.fetch_add(1, SeqCst);
        srv.shared.lock().osc.tcp_connections += 1;
        let (srv, open, cancel) = (srv.clone(), open.clone(), cancel.clone());
        tracker.spawn(async move {
            tcp_connection(&srv, stream, peer, cancel).await;
            open.fetch_sub(1, SeqCst);
        });
    }
}

async fn tcp_connection(
    srv: &OscServer,
    mut stream: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_OUT_QUEUE);
    let source = Source::Tcp { peer, tx };
    let mut deframer = Deframer::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut frames = Vec::new();
    // One connection is one source: its own bucket.
    let mut limiter = RateLimiter::new();
    let mut pending = Pending::default();
    let epoch = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = stream.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let rx_at = Instant::now();
                    deframer.feed(&buf[..n], &mut frames);
                    for f in frames.drain(..) {
                        match f {
                            Ok(p) if pending.admit(&mut limiter, epoch, peer) => {
                                handle_packet(srv, &p, &source, rx_at, &mut pending);
                            }
                            Ok(_) => {}
                            Err(r) => {
                                pending.received += 1;
                                let mut g = srv.shared.lock();
                                pending.flush(&mut g);
                                count_drop(&mut g, r);
                            }
                        }
                    }
                    if pending.received > 0 {
                        pending.flush(&mut srv.shared.lock());
                    }
                    if deframer.is_broken() {
                        break;
                    }
                }
            },
            Some(p) = rx.recv() => {
                let framing = deframer.framing().unwrap_or(super::slip::Framing::Slip);
                if stream.write_all(&frame(framing, &p)).await.is_err() {
                    break;
                }
            }
        }
    }
    // A TCP subscription ends with its connection.
    srv.shared
        .lock()
        .osc
        .subscribers
        .retain(|s| s.origin != peer);
}

fn count_drop(g: &mut Inner, r: DropReason) {
    *g.counters.osc_dropped.entry(r).or_insert(0) += 1;
}

/// Handles one OSC packet from `from`, received at `rx_at`, that the rate limiter let through
/// (and `pending` has counted).
pub(crate) fn handle_packet(
    srv: &OscServer,
    bytes: &[u8],
    from: &Source,
    rx_at: Instant,
    pending: &mut Pending,
) {
    let shared = &srv.shared;
    let parsed = parse_packet(bytes);
    let now = shared.now();
    let mut g = shared.lock();
    pending.flush(&mut g);
    for r in parsed.drops {
        count_drop(&mut g, r);
    }
    let before = g.osc.scheduler.poll_timeout();
    let mut wake = false;
    let mut deferred = Vec::new();
    for (when, cmd) in parsed.cmds {
        // Subscriptions answer the sender; they are not scheduled.
        let when = match cmd {
            OscCommand::Subscribe { .. } | OscCommand::Unsubscribe => When::Now,
            _ => when,
        };
        match g.osc.scheduler.handle(now, when, cmd) {
            Ok(Some((t, cmd))) => {
                wake |= run(srv, &mut g, t, cmd, Some(from), Some(rx_at), &mut deferred);
            }
            Ok(None) => {}
            Err(r) => count_drop(&mut g, r),
        }
    }
    let rescheduled = g.osc.scheduler.poll_timeout() != before;
    drop(g);
    apply_tempo(srv, deferred);
    if wake {
        shared.renew_wakeup.notify_one();
    }
    if rescheduled {
        srv.schedule_wakeup.notify_one();
    }
}

/// Runs one command as if it arrived at `now` (its events sound at `now + lookahead`). Returns
/// whether a note was started (the renewal timer must look again).
fn run(
    srv: &OscServer,
    g: &mut Inner,
    now: ClusterTime,
    cmd: OscCommand,
    from: Option<&Source>,
    rx_at: Option<Instant>,
    deferred: &mut Vec<OscCommand>,
) -> bool {
    let at = now.add_nanos(srv.shared.lookahead.as_nanos() as i64);
    let mut wake = false;
    let actions: Vec<Action> = match cmd.clone() {
        OscCommand::Note {
            note,
            velocity,
            channel,
        } => {
            g.counters.osc_notes += 1;
            wake = velocity > 0;
            g.alloc.note_on(now, note, velocity, channel)
        }
        OscCommand::Panic => {
            let dropped = g.osc.scheduler.clear();
            if dropped > 0 {
                tracing::info!("OSC panic: {dropped} scheduled commands forgotten");
            }
            g.alloc.panic(now)
        }
        OscCommand::Midi(ev) => g.midi_actions(now, ev),
        OscCommand::Param { param, value } => {
            g.osc.params.insert(param, value);
            g.alloc
                .held_voices()
                .map(|h| voice_param(h.node, h.voice, param, value, at))
                .collect()
        }
        OscCommand::VoiceParam {
            note,
            channel,
            param,
            value,
        } => g
            .alloc
            .voices_of(note, channel)
            .into_iter()
            .map(|(node, voice)| voice_param(node, voice, param, value, at))
            .collect(),
        OscCommand::Cv {
            node,
            channel,
            microvolts,
        } => {
            if !g.connected(&node) {
                count_drop(g, DropReason::UnknownNode);
                return false;
            }
            vec![(
                node,
                Message::CvSet(CvSet {
                    channel,
                    microvolts,
                    at,
                }),
            )]
        }
        OscCommand::Tempo { .. } | OscCommand::Transport { .. } => {
            // Applied through the tempo API once the lock is released.
            deferred.push(cmd);
            Vec::new()
        }
        OscCommand::Subscribe { port } => {
            if let Some(from) = from {
                subscribe(g, from, port);
                srv.feedback_wakeup.notify_one();
            }
            Vec::new()
        }
        OscCommand::Unsubscribe => {
            if let Some(from) = from {
                g.osc.subscribers.retain(|s| s.origin != from.peer());
            }
            Vec::new()
        }
    };
    g.dispatch(actions, rx_at);
    wake
}

fn voice_param(
    node: &str,
    voice: voicemesh_protocol::VoiceId,
    param: u16,
    value: f32,
    at: ClusterTime,
) -> Action {
    (
        node.to_owned(),
        Message::VoiceParam(VoiceParam {
            voice,
            param,
            value,
            at,
        }),
    )
}

fn subscribe(g: &mut Inner, from: &Source, port: Option<u16>) {
    let (dest, expires) = match from {
        Source::Udp(a) => (
            Dest::Udp(SocketAddr::new(a.ip(), port.unwrap_or(a.port()))),
            Some(Instant::now() + SUBSCRIPTION_TTL),
        ),
        Source::Tcp { tx, .. } => (Dest::Tcp(tx.clone()), None),
    };
    let origin = from.peer();
    let subs = &mut g.osc.subscribers;
    subs.retain(|s| s.origin != origin);
    if subs.len() >= MAX_SUBSCRIBERS {
        subs.remove(0);
    }
    subs.push(Subscriber {
        origin,
        dest,
        expires,
        fresh: true,
    });
}

async fn schedule_task(srv: Arc<OscServer>, cancel: CancellationToken) {
    loop {
        let wait = {
            let shared = &srv.shared;
            let mut g = shared.lock();
            let mut wake = false;
            let mut deferred = Vec::new();
            while let Some((t, cmd)) = g.osc.scheduler.poll_due(shared.now()) {
                wake |= run(&srv, &mut g, t, cmd, None, None, &mut deferred);
            }
            let now = shared.now();
            let wait = g
                .osc
                .scheduler
                .poll_timeout()
                .map(|t| Duration::from_nanos(t.nanos_since(now).max(0) as u64));
            drop(g);
            if wake {
                shared.renew_wakeup.notify_one();
            }
            apply_tempo(&srv, deferred);
            wait
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = srv.schedule_wakeup.notified() => {}
            _ = sleep(wait.unwrap_or(Duration::from_secs(1))) => {}
        }
    }
}

/// The state subscribers are sent, as (address, arguments).
fn state(g: &Inner) -> BTreeMap<String, Vec<OscType>> {
    let mut s = BTreeMap::new();
    let online = g.nodes.values().filter(|n| n.online).count();
    s.insert(
        format!("{STATE_PREFIX}voices"),
        vec![
            OscType::Int(g.alloc.total_active() as i32),
            OscType::Int(g.alloc.capacity() as i32),
        ],
    );
    s.insert(
        format!("{STATE_PREFIX}nodes"),
        vec![OscType::Int(online as i32)],
    );
    s.insert(
        format!("{STATE_PREFIX}tempo"),
        vec![OscType::Float(bpm_of(&g.tempo.timeline) as f32)],
    );
    s.insert(
        format!("{STATE_PREFIX}transport"),
        vec![OscType::Int(i32::from(g.tempo.playing))],
    );
    for p in engine_params() {
        if let Some(&v) = g.osc.params.get(&p.id) {
            s.insert(
                format!("{STATE_PREFIX}param/{}", p.name),
                vec![OscType::Float(v)],
            );
        }
    }
    s
}

fn encode(addr: &str, args: &[OscType]) -> Option<Vec<u8>> {
    rosc::encoder::encode(&OscPacket::Message(OscMessage {
        addr: addr.to_owned(),
        args: args.to_vec(),
    }))
    .ok()
}

async fn feedback_task(srv: Arc<OscServer>, cancel: CancellationToken) {
    loop {
        let mut udp_out: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        {
            let mut g = srv.shared.lock();
            let now = Instant::now();
            g.osc
                .subscribers
                .retain(|s| s.expires.is_none_or(|e| e > now));
            if !g.osc.subscribers.is_empty() {
                let cur = state(&g);
                let changed: Vec<Vec<u8>> = cur
                    .iter()
                    .filter(|(k, v)| g.osc.sent.get(*k) != Some(v))
                    .filter_map(|(k, v)| encode(k, v))
                    .collect();
                let all: Vec<Vec<u8>> = cur.iter().filter_map(|(k, v)| encode(k, v)).collect();
                let mut closed = Vec::new();
                for (i, s) in g.osc.subscribers.iter_mut().enumerate() {
                    let msgs = if s.fresh { &all } else { &changed };
                    s.fresh = false;
                    for m in msgs {
                        match &s.dest {
                            Dest::Udp(a) => udp_out.push((*a, m.clone())),
                            Dest::Tcp(tx) => {
                                if let Err(mpsc::error::TrySendError::Closed(_)) =
                                    tx.try_send(m.clone())
                                {
                                    closed.push(i);
                                    break;
                                }
                            }
                        }
                    }
                }
                for i in closed.into_iter().rev() {
                    g.osc.subscribers.remove(i);
                }
                g.osc.sent = cur;
            }
        }
        for (to, m) in udp_out {
            if let Err(e) = srv.udp.send_to(&m, to).await {
                tracing::debug!(%to, "OSC feedback send failed: {e}");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = srv.feedback_wakeup.notified() => {}
            _ = sleep(FEEDBACK_PERIOD) => {}
        }
    }
}

/// Applies tempo and transport commands through the tempo API (it takes the lock itself, so
/// this runs after the caller released it). A scheduled change takes effect when it runs, at
/// its timetag minus the lookahead.
fn apply_tempo(srv: &OscServer, cmds: Vec<OscCommand>) {
    if cmds.is_empty() {
        return;
    }
    let tempo = TempoHandle::new(srv.shared.clone());
    for c in cmds {
        match c {
            OscCommand::Tempo { bpm } => {
                // The table's range is the tempo API's: a refusal here would be a bug.
                if let Err(e) = tempo.set_tempo_bpm(bpm) {
                    tracing::warn!("OSC tempo refused: {e}");
                }
            }
            OscCommand::Transport { playing } => {
                tempo.set_playing(playing);
            }
            _ => {}
        }
    }
}
