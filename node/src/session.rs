//! The node's control session: a QUIC server the coordinator connects to.
//!
//! Order on the one bidirectional stream the coordinator opens (its first write, a `Heartbeat`
//! with seq 0, is what makes a QUIC stream visible to the node): the node sends `Hello`; the
//! coordinator answers `Welcome` (an `Error` instead ends the session). From then on the node
//! sends `Heartbeat` and `Status` every heartbeat interval (from `Welcome`) and passes voice
//! events, lease renewals and timelines to the engine's queue. A frame that fails to decode
//! (another major version, a bad body) is answered with an `Error` carrying the decoder's
//! explanation, and the session closes: after a decode error the stream is out of step. A new
//! connection replaces the current session (a restarted coordinator).
//!
//! Voices belong to the session that started them. `Welcome` releases every voice still held
//! (a new session starts from nothing), and a welcomed session that ends on its own (the
//! coordinator's `Bye`, an error, a dead connection) releases its voices at once instead of
//! leaving them to their leases; the leases cover the case where the node notices nothing.

use crate::clock::ClusterClock;
use crate::clock::ptp::PtpStatus;
use crate::engine::{Control, EngineCounters, EngineEvent, EventKind, EventSender};
use crate::error::NodeError;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};
use voicemesh_protocol::{
    Bye, ClusterTime, DecodeError, ErrorCode, ErrorMsg, FrameReader, Heartbeat, Hello,
    MAX_FRAME_LEN, Message, Onset, Role, Status, Welcome, discovery, encode_frame,
};

/// How long the node waits for the coordinator to open the stream and send `Welcome`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing session waits for the peer to read a final `Error` or `Bye`.
const LINGER: Duration = Duration::from_millis(500);

/// Everything a session needs from the node.
#[derive(Debug)]
pub struct SessionShared {
    /// Node id.
    pub id: String,
    /// Node name.
    pub name: String,
    /// Voice pool size.
    pub voices: u16,
    /// Engine names announced in `Hello`.
    pub engines: Vec<String>,
    /// Audio sample rate.
    pub sample_rate: u32,
    /// The node's cluster clock.
    pub clock: Arc<ClusterClock>,
    /// The PTP slave's report.
    pub ptp: Arc<PtpStatus>,
    /// Engine counters.
    pub counters: Arc<EngineCounters>,
    /// The engine's event queue (control side only; the audio thread never locks).
    pub sender: Mutex<EventSender>,
    /// Voice starts from the audio thread, reported to the coordinator as `Onset`s.
    pub onsets: Mutex<rtrb::Consumer<crate::engine::Onset>>,
    /// `CvSet` messages refused (this node has no CV outputs).
    pub cv_rejected: AtomicU32,
    /// Frames that failed to decode.
    pub bad_frames: AtomicU32,
}

/// A self-signed certificate and the QUIC server configuration around it.
pub fn server_config(id: &str) -> Result<quinn::ServerConfig, NodeError> {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let tls = |e: &dyn std::fmt::Display| NodeError::Tls(e.to_string());
    let cert = rcgen::generate_simple_self_signed(vec![
        "voicemesh-node".to_string(),
        "localhost".to_string(),
        id.to_string(),
    ])
    .map_err(|e| tls(&e))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(&e))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .map_err(|e| tls(&e))?;
    cfg.alpn_protocols = vec![discovery::ALPN.to_vec()];
    let qcfg = quinn::crypto::rustls::QuicServerConfig::try_from(cfg).map_err(|e| tls(&e))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(qcfg)))
}

/// Accepts coordinator connections until `shutdown`; each new one replaces the current
/// session.
pub async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<SessionShared>,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let mut sessions = JoinSet::new();
    let mut current: Option<CancellationToken> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let remote = incoming.remote_address();
                if let Some(old) = current.take() {
                    info!("new coordinator connection from {remote} replaces the current session");
                    old.cancel();
                }
                let tok = shutdown.child_token();
                current = Some(tok.clone());
                let span = info_span!("session", node = %shared.id, peer = %remote);
                sessions.spawn(
                    run_session(incoming, shared.clone(), tok, shutdown.clone()).instrument(span),
                );
            }
        }
    }
    if let Some(c) = current {
        c.cancel();
    }
    while sessions.join_next().await.is_some() {}
    endpoint.close(VarInt::from_u32(0), b"node shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(())
}

async fn run_session(
    incoming: quinn::Incoming,
    shared: Arc<SessionShared>,
    tok: CancellationToken,
    node_shutdown: CancellationToken,
) {
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            warn!("QUIC handshake failed: {e}");
            return;
        }
        Err(_) => {
            warn!("QUIC handshake timed out");
            return;
        }
    };
    let streams = tokio::select! {
        _ = tok.cancelled() => return,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()) => r,
    };
    let (send, recv) = match streams {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!("coordinator opened no stream: {e}");
            return;
        }
        Err(_) => {
            warn!("coordinator opened no stream within {HANDSHAKE_TIMEOUT:?}");
            conn.close(VarInt::from_u32(1), b"no control stream");
            return;
        }
    };
    let mut s = Session {
        shared,
        conn,
        send,
        recv,
        reader: Box::new(FrameReader::new()),
        welcome: None,
        peer_minor: 0,
        seq: 0,
    };
    let reason = s.run(&tok, &node_shutdown).await;
    info!("session ended: {reason}");
    if s.welcome.is_some() && !matches!(reason, End::Shutdown | End::Replaced) {
        s.release_unless_replaced(&tok);
    }
}

/// The next tick of the heartbeat timer, or never before `Welcome` set it up.
async fn tick(t: &mut Option<tokio::time::Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Why a session ended.
enum End {
    Shutdown,
    Replaced,
    PeerClosed(String),
    PeerError(String),
    BadFrame(String),
    Io(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Shutdown => write!(f, "node shutting down"),
            End::Replaced => write!(f, "replaced by a newer coordinator connection"),
            End::PeerClosed(r) => write!(f, "coordinator closed the session ({r})"),
            End::PeerError(t) => write!(f, "coordinator sent an error: {t}"),
            End::BadFrame(t) => write!(f, "undecodable frame from the coordinator: {t}"),
            End::Io(t) => write!(f, "connection error: {t}"),
        }
    }
}

struct Session {
    shared: Arc<SessionShared>,
    conn: Connection,
    send: SendStream,
    recv: RecvStream,
    reader: Box<FrameReader>,
    welcome: Option<Welcome>,
    /// The coordinator's protocol minor version (from its `Welcome` frame).
    peer_minor: u8,
    seq: u32,
}

impl Session {
    async fn write(&mut self, msg: &Message) -> Result<(), End> {
        let mut buf = [0u8; MAX_FRAME_LEN];
        let n = encode_frame(msg, &mut buf)
            .map_err(|e| End::Io(format!("cannot encode {}: {e}", msg.kind())))?;
        self.send
            .write_all(&buf[..n])
            .await
            .map_err(|e| End::Io(e.to_string()))
    }

    fn hello(&self) -> Message {
        let mut engines = heapless::Vec::new();
        for e in &self.shared.engines {
            let _ = engines.push(Message::text(e));
        }
        Message::Hello(Hello {
            id: Message::text(&self.shared.id),
            name: Message::text(&self.shared.name),
            role: Role::Node,
            voices: self.shared.voices,
            cv: 0,
            engines,
            sample_rate: self.shared.sample_rate,
        })
    }

    fn status(&self) -> Message {
        let c = &self.shared.counters;
        let (mean, max) = c.take_load();
        Message::Status(Status {
            active_voices: c.active().min(u32::from(u16::MAX)) as u16,
            clock_offset_ns: self.shared.ptp.offset_ns(),
            clock_locked: self.shared.ptp.is_locked(),
            load_permille: mean,
            xruns: c.xrun_count(),
            late_events: c.late(),
            load_max_permille: max,
            ..self.shared.ptp.wire_status()
        })
    }

    /// Sends a last message, finishes the stream and gives the peer a moment to read it.
    async fn close_with(&mut self, last: Message, code: u32) {
        let _ = self.write(&last).await;
        let _ = self.send.finish();
        let _ = tokio::time::timeout(LINGER, self.conn.closed()).await;
        self.conn
            .close(VarInt::from_u32(code), last.kind().as_bytes());
    }

    async fn run(&mut self, tok: &CancellationToken, node_shutdown: &CancellationToken) -> End {
        let hello = self.hello();
        if let Err(e) = self.write(&hello).await {
            return e;
        }
        debug!("sent hello");
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        let mut ticker: Option<tokio::time::Interval> = None;
        loop {
            let end = tokio::select! {
                _ = tok.cancelled() => {
                    Some(if node_shutdown.is_cancelled() { End::Shutdown } else { End::Replaced })
                }
                _ = tokio::time::sleep_until(deadline), if self.welcome.is_none() => {
                    Some(End::PeerError(format!("no Welcome within {HANDSHAKE_TIMEOUT:?}")))
                }
                _ = tick(&mut ticker) => self.beat().await.err(),
                r = self.recv.read(self.reader.spare()) => match r {
                    Ok(Some(n)) => {
                        self.reader.filled(n);
                        self.drain_frames(&mut ticker).await.err()
                    }
                    Ok(None) => Some(End::PeerClosed("stream finished".into())),
                    Err(e) => Some(End::Io(e.to_string())),
                }
            };
            if let Some(end) = end {
                return self.finish(end).await;
            }
        }
    }

    async fn finish(&mut self, end: End) -> End {
        match &end {
            End::Shutdown | End::Replaced => {
                let bye = Message::Bye(Bye {
                    reason: Message::text(&end.to_string()),
                });
                self.close_with(bye, 0).await;
            }
            End::BadFrame(_) | End::PeerError(_) | End::PeerClosed(_) | End::Io(_) => {
                self.conn.close(VarInt::from_u32(0), b"session ended");
            }
        }
        end
    }

    async fn beat(&mut self) -> Result<(), End> {
        self.seq = self.seq.wrapping_add(1);
        let hb = Message::Heartbeat(Heartbeat {
            seq: self.seq,
            now: self.shared.clock.now(),
        });
        self.write(&hb).await?;
        let st = self.status();
        self.write(&st).await?;
        self.report_onsets().await
    }

    /// Sends the voice starts rendered since the last call as `Onset`s (protocol 1.2: an
    /// older coordinator would not understand them, so they are dropped for it).
    async fn report_onsets(&mut self) -> Result<(), End> {
        loop {
            let next = match self.shared.onsets.lock() {
                Ok(mut rx) => rx.pop().ok(),
                Err(_) => None,
            };
            let Some(o) = next else { return Ok(()) };
            if self.peer_minor < 2 {
                continue;
            }
            let msg = Message::Onset(Onset {
                voice: o.voice,
                note: o.note,
                at: ClusterTime(o.at_ns),
                at_frame: ClusterTime(o.frame_cluster_ns),
                emitted_mono_ns: o.emitted_mono_ns,
            });
            self.write(&msg).await?;
        }
    }

    async fn drain_frames(
        &mut self,
        ticker: &mut Option<tokio::time::Interval>,
    ) -> Result<(), End> {
        loop {
            match self.reader.next_frame() {
                Ok(Some(frame)) => {
                    if self.welcome.is_none() {
                        self.peer_minor = frame.minor;
                    }
                    self.handle(frame.message, ticker).await?
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.bad_frame(e).await),
            }
        }
    }

    async fn bad_frame(&mut self, e: DecodeError) -> End {
        self.shared.bad_frames.fetch_add(1, Ordering::Relaxed);
        let text = e.to_string();
        error!("closing the session: undecodable frame from the coordinator: {text}");
        let code = match e {
            DecodeError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            _ => ErrorCode::BadMessage,
        };
        let msg = Message::Error(ErrorMsg {
            code,
            text: Message::text(&text),
        });
        self.close_with(msg, 2).await;
        End::BadFrame(text)
    }

    fn to_engine(&self, c: Control) {
        match self.shared.sender.lock() {
            Ok(mut s) => {
                if !s.send(c) {
                    debug!("event dropped (queue full or voice out of range)");
                }
            }
            Err(_) => error!("engine queue lock poisoned; event dropped"),
        }
    }

    /// Releases this session's voices when it ended on its own (the coordinator closed it or
    /// the connection died), rather than leaving them to their leases. Checked under the
    /// engine queue's lock: a replaced session is cancelled before its successor starts, so
    /// this never releases the successor's voices.
    fn release_unless_replaced(&self, tok: &CancellationToken) {
        match self.shared.sender.lock() {
            Ok(mut s) => {
                if !tok.is_cancelled() {
                    info!("releasing this session's voices");
                    s.send(Control::ReleaseAll);
                }
            }
            Err(_) => error!("engine queue lock poisoned; voices left to their leases"),
        }
    }

    fn voice_event(&self, voice: u16, at: ClusterTime, kind: EventKind) {
        self.to_engine(Control::Event(EngineEvent { voice, at, kind }));
    }

    async fn handle(
        &mut self,
        msg: Message,
        ticker: &mut Option<tokio::time::Interval>,
    ) -> Result<(), End> {
        if self.welcome.is_none() {
            return match msg {
                Message::Welcome(w) => {
                    let ms = w.heartbeat_ms.clamp(10, 10_000);
                    info!(
                        "welcomed by coordinator {} (heartbeat {ms} ms, lease {} ms)",
                        w.coordinator, w.lease_ms
                    );
                    let mut t = tokio::time::interval(Duration::from_millis(u64::from(ms)));
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    *ticker = Some(t);
                    // A new coordinator session starts from nothing: voices of an earlier one
                    // (a coordinator that restarted, or lost this node and re-spawned its notes
                    // elsewhere) are stale, and nobody renews or releases them.
                    self.to_engine(Control::ReleaseAll);
                    self.to_engine(Control::Timeline(w.timeline));
                    self.welcome = Some(w);
                    Ok(())
                }
                Message::Error(e) => {
                    warn!("coordinator refused the node ({:?}): {}", e.code, e.text);
                    Err(End::PeerError(e.text.to_string()))
                }
                Message::Bye(b) => Err(End::PeerClosed(b.reason.to_string())),
                // The coordinator's first write (a stream is invisible until written to).
                Message::Heartbeat(_) => Ok(()),
                other => {
                    warn!("ignoring {} before Welcome", other.kind());
                    Ok(())
                }
            };
        }
        match msg {
            Message::Heartbeat(_) => {}
            Message::VoiceOn(v) => self.voice_event(
                v.voice,
                v.at,
                EventKind::On {
                    note: v.note,
                    velocity: v.velocity,
                    lease_until: v.lease_until,
                },
            ),
            Message::VoiceOff(v) => self.voice_event(v.voice, v.at, EventKind::Off),
            Message::VoiceParam(v) => self.voice_event(
                v.voice,
                v.at,
                EventKind::Param {
                    param: v.param,
                    value: v.value,
                },
            ),
            Message::LeaseRenew(l) => {
                for v in l.voices {
                    self.voice_event(v, ClusterTime::ZERO, EventKind::Renew { until: l.until });
                }
            }
            Message::Timeline(t) => self.to_engine(Control::Timeline(t)),
            Message::CvSet(cv) => {
                self.shared.cv_rejected.fetch_add(1, Ordering::Relaxed);
                let text = format!(
                    "node {} has no CV outputs (CvSet for channel {})",
                    self.shared.id, cv.channel
                );
                warn!("{text}");
                self.write(&Message::Error(ErrorMsg {
                    code: ErrorCode::BadMessage,
                    text: Message::text(&text),
                }))
                .await?;
            }
            Message::Bye(b) => return Err(End::PeerClosed(b.reason.to_string())),
            Message::Error(e) => warn!("coordinator reports an error ({:?}): {}", e.code, e.text),
            other => debug!("ignoring unexpected {} from the coordinator", other.kind()),
        }
        Ok(())
    }
}
