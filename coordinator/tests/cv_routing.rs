//! CV routing end to end: a fake MCU node joins an in-process coordinator, the CV configuration
//! is set through the HTTP API, and OSC notes and controllers come out as `CvSet`s on the MCU's
//! session — pitch before gate at the note's `at`, right after the allocator's `VoiceOn`.

mod common;
use common::node_endpoint;
use std::sync::Arc;
use std::time::Duration;

use rosc::{OscMessage, OscPacket, OscType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use voicemesh_coordinator::{CoordinatorConfig, start};
use voicemesh_node::clock::ClusterClock;
use voicemesh_protocol::{
    ClusterTime, CvSet, FrameReader, Heartbeat, Hello, Message, Role, encode_frame_vec,
};
use voicemesh_tests::TempDir;

async fn put(addr: std::net::SocketAddr, path: &str, token: &str, body: &str) -> u16 {
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
              "min_volts": 0.0, "max_volts": 10.0}]
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn osc_note_and_cc_reach_the_mcu_as_cv() {
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

    // The fake MCU: one voice slot, three CV channels.
    let ep = node_endpoint();
    coord.add_node_addr(ep.local_addr().unwrap());
    let conn = timeout(Duration::from_secs(5), async {
        ep.accept()
            .await
            .expect("incoming")
            .await
            .expect("handshake")
    })
    .await
    .expect("coordinator connects");
    let (mut send, mut recv) = timeout(Duration::from_secs(5), conn.accept_bi())
        .await
        .expect("stream opened")
        .expect("stream");
    let hello = Message::Hello(Hello {
        id: Message::text("mcu-1"),
        name: Message::text("teensy"),
        role: Role::Mcu,
        voices: 1,
        cv: 3,
        engines: heapless::Vec::new(),
        sample_rate: 0,
    });
    send.write_all(&encode_frame_vec(&hello).unwrap())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let hb_stop = stop.clone();
    let hb = tokio::spawn(async move {
        let mut seq = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = hb_stop.cancelled() => return send,
                _ = tick.tick() => {
                    seq += 1;
                    let m = Message::Heartbeat(Heartbeat { seq, now: ClusterTime(0) });
                    send.write_all(&encode_frame_vec(&m).unwrap()).await.unwrap();
                }
            }
        }
    });

    let mut reader = FrameReader::new();
    let mut next = async || -> Message {
        loop {
            if let Some(f) = reader.next_frame().expect("valid frames") {
                match f.message {
                    Message::Heartbeat(_) | Message::LeaseRenew(_) | Message::Timeline(_) => {
                        continue;
                    }
                    m => return m,
                }
            }
            let n = timeout(Duration::from_secs(5), recv.read(reader.spare()))
                .await
                .expect("message within 5 s")
                .unwrap()
                .expect("stream open");
            reader.filled(n);
        }
    };
    assert!(matches!(next().await, Message::Welcome(_)));
    // Wait until the coordinator counts the MCU online.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !coord.snapshot().nodes.iter().any(|n| n.online) {
        assert!(tokio::time::Instant::now() < deadline, "MCU never online");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(
        &osc("/voicemesh/note", vec![OscType::Int(48), OscType::Int(100)]),
        coord.osc_addr(),
    )
    .await
    .unwrap();
    let Message::VoiceOn(on) = next().await else {
        panic!("VoiceOn first")
    };
    assert_eq!((on.voice, on.note), (0, 48));
    let mut cv = Vec::new();
    while cv.len() < 2 {
        if let Message::CvSet(c) = next().await {
            cv.push(c);
        }
    }
    // Pitch (1 V above base note 36) before gate (5 V), both at the note's time.
    assert_eq!(
        cv,
        vec![
            CvSet {
                channel: 0,
                microvolts: 1_000_000,
                at: on.at
            },
            CvSet {
                channel: 1,
                microvolts: 5_000_000,
                at: on.at
            },
        ]
    );

    sock.send_to(
        &osc("/voicemesh/cc", vec![OscType::Int(1), OscType::Int(127)]),
        coord.osc_addr(),
    )
    .await
    .unwrap();
    let c = loop {
        if let Message::CvSet(c) = next().await {
            break c;
        }
    };
    assert_eq!((c.channel, c.microvolts), (2, 10_000_000));

    // Note off: the gate drops.
    sock.send_to(
        &osc("/voicemesh/note", vec![OscType::Int(48), OscType::Int(0)]),
        coord.osc_addr(),
    )
    .await
    .unwrap();
    let c = loop {
        if let Message::CvSet(c) = next().await {
            break c;
        }
    };
    assert_eq!((c.channel, c.microvolts), (1, 0));

    stop.cancel();
    let _send = hb.await.unwrap();
    shutdown.cancel();
    coord.wait().await.unwrap();
    drop(conn);
}
