//! In-process tests of the coordinator on 127.0.0.1 against a fake node written here with
//! quinn: handshake, OSC → VoiceOn timing, offline detection, HTTP auth, hostile input.

mod common;
use common::node_endpoint;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rosc::{OscBundle, OscMessage, OscPacket, OscTime, OscType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use voicemesh_coordinator::{
    ClusterSnapshot, CoordinatorConfig, RunningCoordinator, StartError, start,
};
use voicemesh_node::clock::ClusterClock;
use voicemesh_protocol::{
    ClusterTime, FrameReader, Heartbeat, Hello, Message, Role, Welcome, discovery, encode_frame_vec,
};
use voicemesh_tests::TempDir;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn config(dir: &TempDir) -> CoordinatorConfig {
    let mut cfg = CoordinatorConfig::new(dir.0.clone());
    cfg.id = "test-coord".into();
    cfg.http = "127.0.0.1:0".parse().unwrap();
    cfg.osc = "127.0.0.1:0".parse().unwrap();
    cfg
}

struct Fixture {
    coord: RunningCoordinator,
    clock: Arc<ClusterClock>,
    shutdown: CancellationToken,
    _dir: TempDir,
}

async fn coordinator() -> Fixture {
    let dir = TempDir::new("vm-coord-test");
    let clock = Arc::new(ClusterClock::new());
    let shutdown = CancellationToken::new();
    let coord = start(config(&dir), clock.clone(), shutdown.clone())
        .await
        .expect("coordinator starts");
    Fixture {
        coord,
        clock,
        shutdown,
        _dir: dir,
    }
}

struct FakeNode {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    /// Taken by the heartbeat task in the test that silences the node.
    send: Option<quinn::SendStream>,
    recv: quinn::RecvStream,
    reader: FrameReader,
}

impl FakeNode {
    async fn write(&mut self, m: &Message) {
        self.send
            .as_mut()
            .expect("send stream")
            .write_all(&encode_frame_vec(m).unwrap())
            .await
            .unwrap();
    }

    /// Next message from the coordinator, or `None` at end of stream / connection loss.
    async fn next(&mut self) -> Option<Message> {
        loop {
            if let Some(f) = self
                .reader
                .next_frame()
                .expect("coordinator sends valid frames")
            {
                return Some(f.message);
            }
            match self.recv.read(self.reader.spare()).await {
                Ok(Some(n)) => self.reader.filled(n),
                _ => return None,
            }
        }
    }

    /// Skips heartbeats until a message for which `pick` returns `Some`.
    async fn until<T>(&mut self, mut pick: impl FnMut(&Message) -> Option<T>) -> T {
        timeout(Duration::from_secs(5), async {
            loop {
                let m = self.next().await.expect("session open");
                if let Some(t) = pick(&m) {
                    return t;
                }
            }
        })
        .await
        .expect("message within 5 s")
    }
}

/// Starts a fake node, has the coordinator connect to it, and completes the handshake.
async fn join(coord: &RunningCoordinator, id: &str, voices: u16) -> (FakeNode, Welcome) {
    let ep = node_endpoint();
    coord.add_node_addr(ep.local_addr().unwrap());
    accept_node(ep, id, voices).await
}

/// Waits for the coordinator to connect to `ep` and completes the handshake.
async fn accept_node(ep: quinn::Endpoint, id: &str, voices: u16) -> (FakeNode, Welcome) {
    let conn = timeout(Duration::from_secs(5), async {
        ep.accept()
            .await
            .expect("incoming")
            .await
            .expect("handshake")
    })
    .await
    .expect("coordinator connects");
    assert_eq!(
        conn.handshake_data()
            .unwrap()
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap()
            .protocol
            .as_deref(),
        Some(discovery::ALPN)
    );
    let (send, recv) = timeout(Duration::from_secs(5), conn.accept_bi())
        .await
        .expect("stream opened")
        .expect("stream");
    let mut node = FakeNode {
        _endpoint: ep,
        conn,
        send: Some(send),
        recv,
        reader: FrameReader::new(),
    };
    node.write(&Message::Hello(Hello {
        id: Message::text(id),
        name: Message::text("fake"),
        role: Role::Node,
        voices,
        cv: 0,
        engines: heapless::Vec::new(),
        sample_rate: 48_000,
    }))
    .await;
    let welcome = node
        .until(|m| match m {
            Message::Welcome(w) => Some(w.clone()),
            _ => None,
        })
        .await;
    (node, welcome)
}

/// Sends heartbeats from the fake node every 50 ms until `stop`; returns the time of the last
/// one and the stream (dropping it would finish the stream, a clean close, not silence).
fn heartbeats(
    mut send: quinn::SendStream,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(Instant, quinn::SendStream)> {
    tokio::spawn(async move {
        let mut seq = 0;
        let mut last = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return (last, send),
                _ = tick.tick() => {
                    seq += 1;
                    let hb = Message::Heartbeat(Heartbeat { seq, now: ClusterTime(0) });
                    send.write_all(&encode_frame_vec(&hb).unwrap()).await.unwrap();
                    last = Instant::now();
                }
            }
        }
    })
}

async fn wait_for(
    coord: &RunningCoordinator,
    within: Duration,
    mut cond: impl FnMut(&ClusterSnapshot) -> bool,
) -> ClusterSnapshot {
    let end = Instant::now() + within;
    loop {
        let s = coord.snapshot();
        if cond(&s) {
            return s;
        }
        assert!(
            Instant::now() < end,
            "condition not met within {within:?}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn osc(addr: &str, args: Vec<OscType>) -> Vec<u8> {
    rosc::encoder::encode(&OscPacket::Message(OscMessage {
        addr: addr.into(),
        args,
    }))
    .unwrap()
}

async fn http_get(addr: SocketAddr, path: &str, auth: Option<&str>) -> (u16, String) {
    http_request(addr, "GET", path, auth, "").await
}

async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = auth
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let len = body.len();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn osc_note_reaches_node_stamped_and_node_goes_offline() {
    let f = coordinator().await;
    let (node, welcome) = join(&f.coord, "fake-1", 4).await;
    assert_eq!(welcome.coordinator.as_str(), "test-coord");
    assert_eq!((welcome.heartbeat_ms, welcome.lease_ms), (100, 1000));
    assert_eq!(welcome.timeline.milli_bpm(), 120_000);

    let mut node = node;
    let stop = CancellationToken::new();
    let hb = heartbeats(node.send.take().expect("send stream"), stop.clone());

    let s = f.coord.snapshot();
    assert_eq!(s.nodes.len(), 1);
    assert!(s.nodes[0].online);
    assert_eq!((s.nodes[0].id.as_str(), s.nodes[0].voices), ("fake-1", 4));

    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let before = f.clock.now();
    sock.send_to(
        &osc(
            "/voicemesh/note",
            vec![OscType::Int(60), OscType::Int(100), OscType::Int(2)],
        ),
        f.coord.osc_addr(),
    )
    .await
    .unwrap();
    let on = node
        .until(|m| match m {
            Message::VoiceOn(v) => Some(*v),
            _ => None,
        })
        .await;
    let after = f.clock.now();
    // Held: its lease is renewed (every lease / 4 = 250 ms) to now + lookahead + lease.
    let renew = node
        .until(|m| match m {
            Message::LeaseRenew(l) => Some(l.clone()),
            _ => None,
        })
        .await;
    assert_eq!(renew.voices.as_slice(), &[on.voice]);
    assert!(renew.until.nanos_since(on.lease_until) >= 200_000_000);
    assert_eq!((on.note, on.velocity, on.channel), (60, 100, 2));
    let lookahead = 5_000_000;
    assert!(
        on.at.nanos_since(before) >= lookahead && after.nanos_since(on.at) >= -lookahead,
        "at {} not within [{before}+5ms, {after}+5ms]",
        on.at
    );
    assert_eq!(on.lease_until.nanos_since(on.at), 1_000_000_000);
    let s = wait_for(&f.coord, Duration::from_secs(2), |s| {
        s.latency.osc_to_session_us.count == 1
    })
    .await;
    assert_eq!(s.nodes[0].active_voices, 1);
    assert_eq!(s.osc.notes, 1);

    // Velocity 0 as floats: note-off for the same voice.
    sock.send_to(
        &osc(
            "/voicemesh/note",
            vec![
                OscType::Float(60.0),
                OscType::Float(0.0),
                OscType::Float(2.0),
            ],
        ),
        f.coord.osc_addr(),
    )
    .await
    .unwrap();
    let off = node
        .until(|m| match m {
            Message::VoiceOff(v) => Some(*v),
            _ => None,
        })
        .await;
    assert_eq!(off.voice, on.voice);

    // The node goes silent: offline within 300 ms of its last heartbeat.
    stop.cancel();
    let (last, _keep_open) = hb.await.unwrap();
    let s = wait_for(&f.coord, Duration::from_millis(600), |s| !s.nodes[0].online).await;
    let took = last.elapsed();
    assert!(took < Duration::from_millis(300), "offline after {took:?}");
    assert!(
        s.nodes[0].error.as_deref().unwrap_or("").contains("silent"),
        "{s:?}"
    );
    assert_eq!(s.voices.capacity, 0);

    f.shutdown.cancel();
    timeout(Duration::from_secs(5), f.coord.wait())
        .await
        .expect("shuts down")
        .expect("clean");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_needs_token_and_serves_snapshot() {
    let f = coordinator().await;
    let addr = f.coord.http_addr();
    let token = f.coord.token().to_owned();
    assert_eq!(token.len(), 32);
    assert_eq!(
        f.coord.dashboard_url(),
        format!("http://{addr}/?token={token}")
    );

    let (st, body) = http_get(addr, "/api/cluster", None).await;
    assert_eq!(st, 401);
    assert!(body.contains("\"error\""), "{body}");
    let (st, _) = http_get(
        addr,
        "/api/cluster",
        Some("0123456789abcdef0123456789abcdef"),
    )
    .await;
    assert_eq!(st, 401);
    let (st, _) = http_get(addr, "/metrics", None).await;
    assert_eq!(st, 401);

    let (st, body) = http_get(addr, "/api/cluster", Some(&token)).await;
    assert_eq!(st, 200);
    let snap: ClusterSnapshot = serde_json::from_str(&body).expect("snapshot JSON");
    assert_eq!(snap.coordinator.id, "test-coord");
    assert_eq!(snap.tempo_bpm, 120.0);
    assert_eq!(snap.lookahead_ms, 5);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    for k in [
        "coordinator",
        "tempo_bpm",
        "link_peers",
        "lookahead_ms",
        "nodes",
        "osc",
        "latency",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }

    let (st, body) = http_get(addr, &format!("/metrics?token={token}"), None).await;
    assert_eq!(st, 200);
    assert!(body.contains("voicemesh_nodes_online 0"), "{body}");

    let (st, body) = http_get(addr, "/", None).await;
    assert_eq!(st, 200);
    assert!(body.contains("/api/cluster"));

    f.shutdown.cancel();
    f.coord.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_osc_is_counted_and_service_goes_on() {
    let f = coordinator().await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut deep = OscPacket::Message(OscMessage {
        addr: "/voicemesh/panic".into(),
        args: vec![],
    });
    for _ in 0..100 {
        deep = OscPacket::Bundle(OscBundle {
            timetag: OscTime::from((0, 1)),
            content: vec![deep],
        });
    }
    let datagrams = [
        b"\x00\xff garbage".to_vec(),
        rosc::encoder::encode(&deep).unwrap(),
        osc("/nope", vec![]),
        osc("/voicemesh/note", vec![OscType::Int(300), OscType::Int(1)]),
        osc("/voicemesh/note", vec![OscType::String("x".into())]),
    ];
    for d in &datagrams {
        sock.send_to(d, f.coord.osc_addr()).await.unwrap();
    }
    let s = wait_for(&f.coord, Duration::from_secs(2), |s| {
        s.osc.received == datagrams.len() as u64
    })
    .await;
    for (reason, n) in [
        ("malformed", 1),
        ("too_deep", 1),
        ("unknown_address", 1),
        ("out_of_range", 1),
        ("bad_args", 1),
    ] {
        assert_eq!(s.osc.dropped[reason], n, "{reason}: {:?}", s.osc.dropped);
    }
    // Still serving: a valid note with no nodes is counted as a note.
    sock.send_to(
        &osc("/voicemesh/note", vec![OscType::Int(1), OscType::Int(1)]),
        f.coord.osc_addr(),
    )
    .await
    .unwrap();
    let s = wait_for(&f.coord, Duration::from_secs(2), |s| s.osc.notes == 1).await;
    assert_eq!(s.voices.no_voices, 1);
    f.shutdown.cancel();
    f.coord.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frame_gets_error_and_close() {
    let f = coordinator().await;
    let (mut node, _) = join(&f.coord, "fake-bad", 2).await;
    // A frame claiming protocol major 9.
    node.send
        .as_mut()
        .unwrap()
        .write_all(&[0, 0, 0, 3, 9, 0, 0xc0])
        .await
        .unwrap();
    let err = node
        .until(|m| match m {
            Message::Error(e) => Some(e.clone()),
            _ => None,
        })
        .await;
    assert!(err.text.contains("protocol 9"), "{}", err.text);
    timeout(Duration::from_secs(2), node.conn.closed())
        .await
        .expect("coordinator closes");
    let s = wait_for(&f.coord, Duration::from_secs(2), |s| {
        s.voices.decode_errors == 1 && !s.nodes[0].online
    })
    .await;
    assert!(
        s.nodes[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("bad frame")
    );
    f.shutdown.cancel();
    f.coord.wait().await.unwrap();
}

#[tokio::test]
async fn ports_in_use_and_corrupt_token_are_named() {
    let dir = TempDir::new("vm-coord-test");
    let clock = Arc::new(ClusterClock::new());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(&dir);
    cfg.http = taken.local_addr().unwrap();
    let e = start(cfg, clock.clone(), CancellationToken::new())
        .await
        .expect_err("port taken");
    assert!(matches!(e, StartError::HttpPortInUse(_)));
    assert!(e.to_string().contains("already in use"), "{e}");

    let taken_udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(&dir);
    cfg.osc = taken_udp.local_addr().unwrap();
    let e = start(cfg, clock.clone(), CancellationToken::new())
        .await
        .expect_err("port taken");
    assert!(matches!(e, StartError::OscPortInUse(_)), "{e}");

    let mut cfg = config(&dir);
    cfg.heartbeat = Duration::ZERO;
    let e = start(cfg, clock.clone(), CancellationToken::new())
        .await
        .expect_err("zero heartbeat");
    assert!(matches!(e, StartError::BadConfig(_)), "{e}");

    std::fs::write(dir.0.join("token"), "").unwrap();
    let e = start(config(&dir), clock, CancellationToken::new())
        .await
        .expect_err("corrupt token");
    assert!(e.to_string().contains("corrupt token file"), "{e}");
    assert!(e.to_string().contains(&dir.0.display().to_string()), "{e}");
}

/// mDNS on loopback only: the coordinator finds a node by its `_voicemesh._udp` record and
/// connects to the TXT `port`; a node advertising another protocol version is listed with an
/// error and never connected to.
///
/// Runs in a private network namespace: on the shared loopback, every other test's coordinator
/// would browse the same records and could take the fake node's one connection first.
#[test]
fn discovers_nodes_over_loopback_mdns() {
    voicemesh_tests::in_private_netns(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(discovers_nodes_over_loopback_mdns_body())
    });
}

async fn discovers_nodes_over_loopback_mdns_body() {
    use voicemesh_node::mdns::{ServiceInstance, advertise};
    let f = coordinator().await;
    let tag = format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let ep = node_endpoint();
    let port = ep.local_addr().unwrap().port();
    let instance = |id: &str, proto: &str| ServiceInstance {
        service_type: discovery::NODE_SERVICE.to_owned(),
        instance: id.to_owned(),
        host: id.to_owned(),
        // The record's own port is deliberately wrong: the TXT `port` is the one to use.
        port: 1,
        txt: [
            ("id", id.to_owned()),
            ("role", "node".to_owned()),
            ("voices", "8".to_owned()),
            ("cv", "0".to_owned()),
            ("proto", proto.to_owned()),
            ("engines", "ref".to_owned()),
            ("port", port.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
    };
    let good = format!("vm-good-{tag}");
    let old = format!("vm-old-{tag}");
    let mdns = advertise(
        voicemesh_node::NetScope::Loopback,
        vec![
            instance(&old, "0"),
            instance(&good, &voicemesh_protocol::PROTOCOL_VERSION.to_string()),
        ],
        CancellationToken::new(),
    )
    .unwrap();

    let (_node, welcome) = accept_node(ep, &good, 8).await;
    assert_eq!(welcome.coordinator.as_str(), "test-coord");
    let s = wait_for(&f.coord, Duration::from_secs(5), |s| {
        s.nodes.iter().any(|n| n.id == old) && s.nodes.iter().any(|n| n.id == good && n.online)
    })
    .await;
    let o = s.nodes.iter().find(|n| n.id == old).unwrap();
    assert!(!o.online);
    assert!(
        o.error.as_deref().unwrap_or("").contains("protocol"),
        "{o:?}"
    );
    mdns.stop().await;
    f.shutdown.cancel();
    f.coord.wait().await.unwrap();
}

/// A tempo change through the HTTP API reaches every connected node as a new timeline that
/// keeps the beat continuous; transport and bad tempos are answered; nothing is sent when
/// nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tempo_change_is_broadcast_to_nodes() {
    let f = coordinator().await;
    let (mut a, wa) = join(&f.coord, "tempo-a", 4).await;
    let (mut b, _) = join(&f.coord, "tempo-b", 4).await;
    let addr = f.coord.http_addr();
    let t = f.coord.token().to_owned();
    let before = f.clock.now();
    let (st, body) = http_request(
        addr,
        "POST",
        "/api/tempo",
        Some(&t),
        r#"{"tempo_bpm": 90.5}"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let after = f.clock.now();
    let snap: voicemesh_coordinator::tempo::TempoSnapshot = serde_json::from_str(&body).unwrap();
    assert!((snap.tempo_bpm - 90.5).abs() < 1e-6, "{body}");
    for node in [&mut a, &mut b] {
        let tl = node
            .until(|m| match m {
                Message::Timeline(t) => Some(*t),
                _ => None,
            })
            .await;
        assert_eq!(tl.ns_per_beat, 662_983_425);
        // Continuity: the change happened between `before` and `after`; at that moment the new
        // line gives the same beat as the old one (within a micro-beat of rounding).
        assert!(tl.t0 >= before && tl.t0 <= after, "{tl:?}");
        let old = wa.timeline.micro_beats_at(tl.t0);
        assert!(
            (tl.micro_beats_at(tl.t0) - old).abs() <= 1,
            "{tl:?} vs {old}"
        );
    }
    let (st, body) =
        http_request(addr, "POST", "/api/tempo", Some(&t), r#"{"playing": true}"#).await;
    assert_eq!(st, 200, "{body}");
    let s = f.coord.snapshot();
    assert!(s.tempo.playing);
    assert!((s.tempo_bpm - 90.5).abs() < 1e-6);
    assert!((0.0..4.0).contains(&s.tempo.phase));
    for bad in [
        r#"{"tempo_bpm": 5}"#,
        r#"{"tempo_bpm": 1000}"#,
        r#"{"bpm": 100}"#,
        "x",
    ] {
        let (st, body) = http_request(addr, "POST", "/api/tempo", Some(&t), bad).await;
        assert_eq!(st, 400, "{bad}: {body}");
    }
    // Same tempo again, then OSC: only the real change is sent.
    f.coord.tempo().set_tempo_bpm(90.5).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = f.coord.osc_addr();
    for bad in [
        osc("/voicemesh/tempo", vec![OscType::Float(10.0)]),
        osc("/voicemesh/transport", vec![OscType::Int(2)]),
        osc("/voicemesh/tempo", vec![OscType::String("fast".into())]),
    ] {
        sock.send_to(&bad, to).await.unwrap();
    }
    sock.send_to(&osc("/voicemesh/tempo", vec![OscType::Float(150.0)]), to)
        .await
        .unwrap();
    sock.send_to(&osc("/voicemesh/transport", vec![OscType::Int(0)]), to)
        .await
        .unwrap();
    let tl = a
        .until(|m| match m {
            Message::Timeline(t) => Some(*t),
            _ => None,
        })
        .await;
    assert_eq!(tl.ns_per_beat, 400_000_000);
    let s = wait_for(&f.coord, Duration::from_secs(2), |s| !s.tempo.playing).await;
    assert_eq!(s.osc.dropped["out_of_range"], 2, "{:?}", s.osc);
    assert_eq!(s.osc.dropped["bad_args"], 1, "{:?}", s.osc);
    let (st, _) = http_request(addr, "POST", "/api/tempo", None, r#"{"playing": false}"#).await;
    assert_eq!(st, 401);
    f.shutdown.cancel();
}
