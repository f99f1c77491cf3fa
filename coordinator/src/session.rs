//! Control sessions with Linux nodes: one QUIC connection and one bidirectional stream each.
//!
//! The coordinator connects (ALPN [`discovery::ALPN`]) and opens the stream. A QUIC stream only
//! becomes visible to the peer once data is sent on it, so the coordinator sends a first
//! `Heartbeat` (seq 0) right away; the node then sends `Hello` and the coordinator answers
//! `Welcome`. Afterwards both ends send `Heartbeat` every heartbeat interval and the node sends
//! `Status`. A node heard from not at all for `offline_after` is marked offline and its voices
//! are dropped from the allocator; the connector retries the address with a back-off.
//!
//! Each outgoing frame is written with one `write_all`. A frame that fails to decode is
//! counted, answered with an `Error` message carrying the decode error's text, and the session
//! is closed.
//!
//! Certificates: nodes present self-signed certificates and the coordinator accepts any server
//! certificate for now, while still verifying the handshake signature made with the
//! certificate's key. The cluster-key challenge–response of the design (DESIGN §9) replaces
//! this in the security work.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use voicemesh_protocol::{
    ErrorCode, ErrorMsg, FrameReader, Heartbeat, Hello, Message, Welcome, discovery,
    encode_frame_vec,
};

use crate::state::{Outgoing, SESSION_QUEUE, Shared};

/// How long connecting and the Hello may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// First and longest pause between reconnection attempts.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// QUIC connection could not be set up.
    #[error("cannot connect to node at {addr}: {reason}")]
    Connect {
        /// Node address.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// The node did not complete the handshake in time.
    #[error("node at {0} did not send Hello within {HANDSHAKE_TIMEOUT:?}")]
    HelloTimeout(SocketAddr),
    /// The first message was not a Hello.
    #[error("node at {addr} sent {kind} instead of Hello")]
    NoHello {
        /// Node address.
        addr: SocketAddr,
        /// What it sent.
        kind: &'static str,
    },
    /// A frame failed to decode.
    #[error("bad frame from node at {addr}: {error}")]
    Decode {
        /// Node address.
        addr: SocketAddr,
        /// The decode error.
        error: voicemesh_protocol::DecodeError,
    },
    /// Stream read or write failed.
    #[error("stream to node at {addr} failed: {reason}")]
    Stream {
        /// Node address.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// Nothing heard within `offline_after`.
    #[error("node at {addr} silent for {after:?}; marked offline")]
    Silent {
        /// Node address.
        addr: SocketAddr,
        /// The silence limit.
        after: Duration,
    },
    /// The node closed the session (Bye or end of stream).
    #[error("node at {0} closed the session")]
    Closed(SocketAddr),
}

/// Accepts any server certificate but checks the handshake signature made with its key.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A QUIC client endpoint bound to `bind` for sessions with nodes.
pub(crate) fn client_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![discovery::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(500)));
    client.transport_config(Arc::new(transport));
    let mut ep = quinn::Endpoint::client(bind).map_err(|e| e.to_string())?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// Keeps a session with the node at `addr` up until `cancel`: connects, runs the session, and
/// after it ends retries with a back-off.
pub(crate) async fn connector(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    cancel: CancellationToken,
) {
    let mut pause = RETRY_MIN;
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = run_session(&shared, &endpoint, addr, &cancel) => r,
        };
        match result {
            Ok(()) => return,
            Err(e) => tracing::warn!(%addr, "session ended: {e}"),
        }
        if started.elapsed() > RETRY_MAX {
            pause = RETRY_MIN;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sleep(pause) => {}
        }
        pause = (pause * 2).min(RETRY_MAX);
    }
}

async fn write_msg(
    send: &mut quinn::SendStream,
    msg: &Message,
    addr: SocketAddr,
) -> Result<(), SessionError> {
    let frame = encode_frame_vec(msg).map_err(|e| SessionError::Stream {
        addr,
        reason: format!("cannot encode {}: {e}", msg.kind()),
    })?;
    send.write_all(&frame)
        .await
        .map_err(|e| SessionError::Stream {
            addr,
            reason: e.to_string(),
        })
}

fn stream_err(addr: SocketAddr, e: impl std::fmt::Display) -> SessionError {
    SessionError::Stream {
        addr,
        reason: e.to_string(),
    }
}

/// Reports a decode error to the peer and closes.
async fn reject(
    shared: &Shared,
    send: &mut quinn::SendStream,
    conn: &quinn::Connection,
    addr: SocketAddr,
    error: voicemesh_protocol::DecodeError,
) -> SessionError {
    shared.lock().counters.decode_errors += 1;
    let code = match error {
        voicemesh_protocol::DecodeError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
        _ => ErrorCode::BadMessage,
    };
    let msg = Message::Error(ErrorMsg {
        code,
        text: Message::text(&error.to_string()),
    });
    // Best effort: the peer is already misbehaving.
    let _ = timeout(Duration::from_millis(200), async {
        let _ = write_msg(send, &msg, addr).await;
        let _ = send.finish();
        let _ = send.stopped().await;
    })
    .await;
    conn.close(1u32.into(), b"bad frame");
    SessionError::Decode { addr, error }
}

async fn run_session(
    shared: &Arc<Shared>,
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let connect_err = |reason: String| SessionError::Connect { addr, reason };
    let connecting = endpoint
        .connect(addr, "voicemesh-node")
        .map_err(|e| connect_err(e.to_string()))?;
    let conn = timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| connect_err("timed out".into()))?
        .map_err(|e| connect_err(e.to_string()))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let mut seq = 0u32;
    write_msg(
        &mut send,
        &Message::Heartbeat(Heartbeat {
            seq,
            now: shared.now(),
        }),
        addr,
    )
    .await?;

    let mut reader = FrameReader::new();
    let hello = timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match reader.next_frame() {
                Ok(Some(f)) => return Ok(f.message),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
            match recv.read(reader.spare()).await {
                Ok(Some(n)) => reader.filled(n),
                Ok(None) | Err(_) => {
                    return Ok(Message::Bye(voicemesh_protocol::Bye {
                        reason: Message::text("closed before Hello"),
                    }));
                }
            }
        }
    })
    .await
    .map_err(|_| SessionError::HelloTimeout(addr))?;
    let hello: Hello = match hello {
        Ok(Message::Hello(h)) => h,
        Ok(Message::Bye(_)) => return Err(SessionError::Closed(addr)),
        Ok(other) => {
            let kind = other.kind();
            let _ = write_msg(
                &mut send,
                &Message::Error(ErrorMsg {
                    code: ErrorCode::BadMessage,
                    text: Message::text("expected Hello"),
                }),
                addr,
            )
            .await;
            conn.close(1u32.into(), b"expected hello");
            return Err(SessionError::NoHello { addr, kind });
        }
        Err(e) => return Err(reject(shared, &mut send, &conn, addr, e).await),
    };
    let node_id = hello.id.to_string();
    let span = tracing::info_span!("session", node = %node_id, %addr);

    let (tx, mut rx) = mpsc::channel::<Outgoing>(SESSION_QUEUE);
    let generation = shared.lock().join_node(&hello, addr, tx);
    tracing::info!(parent: &span, voices = hello.voices, "node joined");

    let result = serve(
        shared,
        &conn,
        &mut send,
        &mut recv,
        &mut reader,
        &mut rx,
        addr,
        &node_id,
        &mut seq,
        cancel,
    )
    .instrument(span)
    .await;

    // Only the session that still owns the entry may mark it offline: a newer session for the
    // same node id (a reconnect that raced this one) keeps it. The lost node's voices are
    // re-spawned on the survivors right away.
    let mut g = shared.lock();
    let error = match &result {
        Ok(()) | Err(SessionError::Closed(_)) => None,
        Err(e) => Some(e.to_string()),
    };
    g.end_session(shared.now(), &node_id, generation, error);
    drop(g);
    conn.close(0u32.into(), b"session ended");
    result
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    shared: &Shared,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    reader: &mut FrameReader,
    rx: &mut mpsc::Receiver<Outgoing>,
    addr: SocketAddr,
    node_id: &str,
    seq: &mut u32,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let timeline = shared.lock().tempo.timeline;
    write_msg(
        send,
        &Message::Welcome(Welcome {
            coordinator: Message::text(&shared.id),
            heartbeat_ms: u16::try_from(shared.heartbeat.as_millis()).unwrap_or(u16::MAX),
            lease_ms: u32::try_from(shared.lease.as_millis()).unwrap_or(u32::MAX),
            timeline,
        }),
        addr,
    )
    .await?;
    let mut heartbeat = tokio::time::interval(shared.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut deadline = Instant::now() + shared.offline_after;
    loop {
        // Frames already buffered are handled before waiting again.
        loop {
            match reader.next_frame() {
                Ok(Some(f)) => {
                    deadline = Instant::now() + shared.offline_after;
                    let mut g = shared.lock();
                    let Some(n) = g.nodes.get_mut(node_id) else {
                        continue;
                    };
                    n.last_seen = Some(Instant::now());
                    match f.message {
                        Message::Heartbeat(_) => {}
                        Message::Status(s) => {
                            let load = s.load_permille;
                            n.status = Some(s);
                            // An overloaded node gets fewer new voices.
                            g.alloc.set_node_load(node_id, load);
                            // The lowest-latency policy ranks nodes by the control session's
                            // round-trip time, as QUIC measures it.
                            let rtt = u64::try_from(conn.rtt().as_nanos()).unwrap_or(u64::MAX);
                            g.alloc.set_node_latency(node_id, rtt);
                        }
                        Message::Onset(o) => g.onsets.record(node_id, &o),
                        Message::Bye(b) => {
                            tracing::info!(reason = %b.reason, "node said bye");
                            return Err(SessionError::Closed(addr));
                        }
                        Message::Error(e) => {
                            tracing::warn!(code = ?e.code, text = %e.text, "node reported an error");
                            n.error = Some(format!("node reported: {}", e.text));
                        }
                        other => tracing::debug!(kind = other.kind(), "ignored message"),
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(reject(shared, send, conn, addr, e).await),
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = write_msg(send, &Message::Bye(voicemesh_protocol::Bye {
                    reason: Message::text("coordinator shutting down"),
                }), addr).await;
                let _ = send.finish();
                return Ok(());
            }
            r = recv.read(reader.spare()) => match r {
                Ok(Some(n)) => reader.filled(n),
                Ok(None) => return Err(SessionError::Closed(addr)),
                Err(quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(_))) => {
                    return Err(SessionError::Closed(addr));
                }
                Err(e) => return Err(stream_err(addr, e)),
            },
            out = rx.recv() => {
                let Some(out) = out else { return Err(stream_err(addr, "queue closed")) };
                write_msg(send, &out.msg, addr).await?;
                if let Some(t0) = out.osc_rx {
                    let d = Instant::now().saturating_duration_since(t0);
                    shared.lock().record_latency(d);
                }
                if let Some(t0) = out.midi_rx {
                    let d = Instant::now().saturating_duration_since(t0);
                    shared.lock().record_midi_latency(d);
                }
            }
            _ = heartbeat.tick() => {
                *seq = seq.wrapping_add(1);
                let hb = Message::Heartbeat(Heartbeat { seq: *seq, now: shared.now() });
                write_msg(send, &hb, addr).await?;
            }
            _ = sleep_until(deadline) => {
                tracing::warn!("node silent for {:?}; offline", shared.offline_after);
                return Err(SessionError::Silent { addr, after: shared.offline_after });
            }
        }
    }
}
