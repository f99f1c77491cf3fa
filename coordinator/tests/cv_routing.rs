//! CV routing end to end over the MCU link: a fake MCU node (a UDP socket speaking the MCU
//! datagrams) joins an in-process coordinator, the CV configuration is set through the HTTP API,
//! and the MCU gets its assignments, the allocator's voice events, `Control`s for the
//! controllers its outputs follow, heartbeats, `TimeSync` answers and a refresh of its full
//! state every 100 ms (new assignments with the first refresh after a configuration change,
//! not only with the once-a-second re-send); its `CvReport` shows in `/api/cluster`. Malformed, duplicated and
//! replayed datagrams are dropped and counted without ending the session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rosc::{OscMessage, OscPacket, OscType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use voicemesh_coordinator::{ClusterSnapshot, CoordinatorConfig, NodeSnapshot, start};
use voicemesh_node::clock::ClusterClock;
use voicemesh_protocol::datagram::{
    DatagramHeader, MAX_DATAGRAM_LEN, decode_datagram, encode_datagram,
};
use voicemesh_protocol::{
    ClusterTime, ControlKind, CvFunction, CvReport, Heartbeat, Hello, Message, Role, TimeSync,
};
use voicemesh_tests::TempDir;

async fn put(addr: SocketAddr, path: &str, token: &str, body: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "PUT {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out[9..12].parse().unwrap()
}

async fn get(addr: SocketAddr, path: &str, token: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn osc(addr: &str, args: Vec<OscType>) -> Vec<u8> {
    rosc::encoder::encode(&OscPacket::Message(OscMessage {
        addr: addr.into(),
        args,
    }))
    .unwrap()
}

const CV: &str = r#"{
  "voices": [{"node": "mcu-1", "voice": 0,
              "pitch": {"node": "mcu-1", "channel": 0},
              "gate": {"node": "mcu-1", "channel": 1}}],
  "routes": [{"source": {"type": "cc", "channel": 0, "cc": 1},
              "output": {"node": "mcu-1", "channel": 2},
              "min_volts": 0.0, "max_volts": 10.0}],
  "calibration": [{"output": {"node": "mcu-1", "channel": 0},
                   "points": [{"volts": 0.0, "code": 0}, {"volts": 5.0, "code": 4000}]}]
}"#;

/// The MCU's end: one socket, our session id and sequence numbers, the coordinator's address
/// once its first heartbeat came.
struct FakeMcu {
    sock: UdpSocket,
    header: DatagramHeader,
    coordinator: Option<SocketAddr>,
    /// Every datagram sent, for replaying.
    sent: Vec<Vec<u8>>,
}

impl FakeMcu {
    async fn new() -> FakeMcu {
        FakeMcu {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            header: DatagramHeader {
                session: 0x5eed_0001,
                seq: 0,
            },
            coordinator: None,
            sent: Vec::new(),
        }
    }

    async fn send(&mut self, m: &Message) {
        let mut buf = [0u8; MAX_DATAGRAM_LEN];
        let n = encode_datagram(self.header, m, &mut buf).unwrap();
        self.header.seq += 1;
        self.raw(&buf[..n]).await;
        self.sent.push(buf[..n].to_vec());
    }

    async fn raw(&self, bytes: &[u8]) {
        let to = self.coordinator.expect("coordinator known");
        self.sock.send_to(bytes, to).await.unwrap();
    }

    /// The next message that is not a heartbeat (heartbeats are answered).
    async fn next(&mut self) -> Message {
        let mut buf = [0u8; 2048];
        loop {
            let (n, from) = timeout(Duration::from_secs(5), self.sock.recv_from(&mut buf))
                .await
                .expect("a datagram within 5 s")
                .unwrap();
            let (_, frame) = decode_datagram(&buf[..n]).expect("a valid datagram");
            self.coordinator = Some(from);
            match frame.message {
                Message::Heartbeat(h) if h.seq > 0 => {
                    self.send(&Message::Heartbeat(Heartbeat {
                        seq: h.seq,
                        now: h.now,
                    }))
                    .await;
                }
                m => return m,
            }
        }
    }
}

fn mcu(s: &ClusterSnapshot) -> Option<&NodeSnapshot> {
    s.nodes.iter().find(|n| n.id == "mcu-1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcu_joins_gets_assignments_events_controls_and_refreshes() {
    let dir = TempDir::new("vm-cv-routing");
    let mut cfg = CoordinatorConfig::new(dir.0.clone());
    cfg.http = "127.0.0.1:0".parse().unwrap();
    cfg.osc = "127.0.0.1:0".parse().unwrap();
    let shutdown = CancellationToken::new();
    let coord = start(cfg, Arc::new(ClusterClock::new()), shutdown.clone())
        .await
        .expect("starts");
    assert_eq!(
        put(coord.http_addr(), "/api/config/cv", coord.token(), CV).await,
        200
    );

    let mut m = FakeMcu::new().await;
    coord.add_mcu_addr(m.sock.local_addr().unwrap());
    // The opening heartbeat (seq 0), then Hello → Welcome → the assignments.
    let Message::Heartbeat(h) = m.next().await else {
        panic!("heartbeat seq 0 first")
    };
    assert_eq!(h.seq, 0);
    m.send(&Message::Hello(Hello {
        id: Message::text("mcu-1"),
        name: Message::text("teensy"),
        role: Role::Mcu,
        voices: 1,
        cv: 4,
        engines: heapless::Vec::new(),
        sample_rate: 0,
    }))
    .await;
    let mut msgs = Vec::new();
    loop {
        match m.next().await {
            Message::Heartbeat(_) => {}
            Message::Welcome(w) => assert_eq!(w.lease_ms, 1000),
            Message::CvAssign(a) => {
                msgs.push(a);
                if msgs.len() == 4 {
                    break;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let f: Vec<(u16, CvFunction)> = msgs.iter().map(|a| (a.channel, a.function)).collect();
    assert_eq!(
        f,
        vec![
            (0, CvFunction::Pitch),
            (1, CvFunction::Gate),
            (2, CvFunction::Cc),
            (3, CvFunction::Off)
        ]
    );
    assert_eq!(msgs[0].calibration.len(), 2);
    assert_eq!((msgs[2].param, msgs[2].max_uv), (1, 10_000_000));

    let deadline = Instant::now() + Duration::from_secs(5);
    while !mcu(&coord.snapshot()).is_some_and(|n| n.online) {
        assert!(Instant::now() < deadline, "MCU never online");
        let _ = timeout(Duration::from_millis(20), m.next()).await;
    }
    let snap = coord.snapshot();
    let n = mcu(&snap).unwrap();
    assert_eq!((n.role.as_str(), n.voices), ("mcu", 1));
    assert_eq!(n.cv.as_ref().unwrap().channels, 4);

    // A note, a mod wheel move: the VoiceOn and a Control for the CC route's channel.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let osc_to = coord.osc_addr();
    let t0 = coord.snapshot().coordinator.cluster_time_ns;
    sock.send_to(
        &osc("/voicemesh/note", vec![OscType::Int(48), OscType::Int(100)]),
        osc_to,
    )
    .await
    .unwrap();
    let on = loop {
        if let Message::VoiceOn(on) = m.next().await {
            break on;
        }
    };
    assert_eq!((on.voice, on.note, on.velocity), (0, 48, 100));
    assert!(on.at.0 >= t0 + 5_000_000, "at = now + lookahead");
    sock.send_to(
        &osc("/voicemesh/cc", vec![OscType::Int(1), OscType::Int(127)]),
        osc_to,
    )
    .await
    .unwrap();
    // Within the next 100 ms refresh the held note comes again, equal (a refresh, not a new
    // note), with a fresh lease; the Control comes too.
    let (mut control, mut again) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(2);
    while control.is_none() || again.is_none() {
        assert!(Instant::now() < deadline, "{control:?} {again:?}");
        match m.next().await {
            Message::Control(c) => control = Some(c),
            Message::VoiceOn(v) => again = Some(v),
            _ => {}
        }
    }
    let c = control.unwrap();
    assert_eq!(
        (c.kind, c.midi_channel, c.number, c.value),
        (ControlKind::Cc, 0, 1, 127)
    );
    let again = again.unwrap();
    assert_eq!(
        (again.voice, again.note, again.at),
        (on.voice, on.note, on.at)
    );
    assert!(again.lease_until >= on.lease_until);

    // The MCU's report shows in the snapshot; a TimeSync request is answered at once.
    let mut codes = heapless::Vec::new();
    for c in [1966u16, 4095, 0, 0] {
        codes.push(c).unwrap();
    }
    let mut changed_at = heapless::Vec::new();
    for _ in 0..4 {
        changed_at.push(on.at).unwrap();
    }
    m.send(&Message::CvReport(CvReport {
        now: on.at,
        codes,
        changed_at,
        applied_at: on.at,
        dac_faults: 0,
        writes: 9,
        skipped_writes: 1,
        write_errors: 0,
        late_events: 0,
        lease_expiries: 0,
        clock_offset_ns: 120,
        clock_locked: true,
        rx: Default::default(),
    }))
    .await;
    m.send(&Message::TimeSync(TimeSync {
        origin: 777,
        receive: ClusterTime(0),
        transmit: ClusterTime(0),
    }))
    .await;
    let ts = loop {
        if let Message::TimeSync(t) = m.next().await {
            break t;
        }
    };
    assert_eq!(ts.origin, 777);
    assert!(ts.receive.0 > t0 && ts.transmit >= ts.receive, "{ts:?}");
    let snap = coord.snapshot();
    let cv = mcu(&snap).unwrap().cv.clone().unwrap();
    assert_eq!(cv.dac_codes, vec![1966, 4095, 0, 0]);
    assert_eq!(cv.changed_at_ns, vec![on.at.0; 4]);
    assert!(cv.clock_locked);

    // Garbage, a duplicate of the Hello, and a datagram older than the replay window: all
    // dropped and counted; the session goes on.
    m.raw(b"VM\x01\x00garbage").await;
    let hello = m.sent[0].clone();
    for _ in 0..70 {
        m.send(&Message::Heartbeat(Heartbeat {
            seq: 1,
            now: ClusterTime(0),
        }))
        .await;
    }
    m.raw(&hello).await;
    let last = m.sent.last().unwrap().clone();
    m.raw(&last).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let snap = coord.snapshot();
        let d = mcu(&snap).unwrap().cv.clone().unwrap().datagrams;
        if d.malformed == 1 && d.replays == 1 && d.duplicates == 1 {
            assert!(mcu(&snap).unwrap().online);
            break;
        }
        assert!(Instant::now() < deadline, "{d:?}");
        let _ = timeout(Duration::from_millis(20), m.next()).await;
    }

    // The same counters in /metrics.
    let metrics = get(coord.http_addr(), "/metrics", coord.token()).await;
    for (reason, n) in [
        ("malformed", 1),
        ("duplicate", 1),
        ("replay", 1),
        ("version", 0),
    ] {
        let line = format!(
            "voicemesh_mcu_datagrams_dropped_total{{node=\"mcu-1\",reason=\"{reason}\"}} {n}\n"
        );
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }

    // A new configuration reaches the MCU with the next refresh (100 ms), not the
    // once-a-second re-send of the assignments: the gate becomes a trigger.
    let changed = CV.replace(
        r#""gate": {"node": "mcu-1", "channel": 1}}"#,
        r#""gate": {"node": "mcu-1", "channel": 1}, "gate_mode": {"mode": "trigger", "ms": 10}}"#,
    );
    assert_ne!(changed, CV);
    let put_at = Instant::now();
    assert_eq!(
        put(coord.http_addr(), "/api/config/cv", coord.token(), &changed).await,
        200
    );
    let a = loop {
        match m.next().await {
            Message::CvAssign(a) if a.channel == 1 && a.function == CvFunction::Trigger => break a,
            _ => assert!(
                put_at.elapsed() < Duration::from_millis(300),
                "no new assignment"
            ),
        }
    };
    assert_eq!(a.pulse_ms, 10);

    // Note off: the VoiceOff.
    sock.send_to(
        &osc("/voicemesh/note", vec![OscType::Int(48), OscType::Int(0)]),
        osc_to,
    )
    .await
    .unwrap();
    loop {
        if let Message::VoiceOff(off) = m.next().await {
            assert_eq!(off.voice, 0);
            break;
        }
    }

    // Silence from the MCU: offline within offline_after (250 ms) + a heartbeat.
    let quiet = Instant::now();
    while mcu(&coord.snapshot()).is_some_and(|n| n.online) {
        assert!(quiet.elapsed() < Duration::from_millis(400), "still online");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    coord.wait().await.unwrap();
}
