//! The control session end to end, in-process: a quinn client plays the coordinator against a
//! real node (null audio backend, PTP slave, mDNS) inside a private network namespace.

mod common;

use common::{in_private_netns, quic_client, unique};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use voicemesh_node::{AudioSpec, NodeConfig, NodeError, start};
use voicemesh_protocol::{
    ClusterTime, CvSet, ErrorCode, FrameReader, Heartbeat, MAX_FRAME_LEN, Message, Role, Timeline,
    VoiceOn, Welcome, encode_frame,
};

const STEP: Duration = Duration::from_secs(5);

struct Coordinator {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    reader: FrameReader,
}

impl Coordinator {
    async fn connect(ep: &quinn::Endpoint, addr: std::net::SocketAddr) -> Coordinator {
        let conn = ep.connect(addr, "voicemesh-node").unwrap().await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut c = Coordinator {
            conn,
            send,
            recv,
            reader: FrameReader::new(),
        };
        // A QUIC stream becomes visible to the peer with its first bytes.
        c.write(&Message::Heartbeat(Heartbeat {
            seq: 0,
            now: ClusterTime(0),
        }))
        .await;
        c
    }

    async fn write(&mut self, m: &Message) {
        let mut buf = [0u8; MAX_FRAME_LEN];
        let n = encode_frame(m, &mut buf).unwrap();
        self.send.write_all(&buf[..n]).await.unwrap();
    }

    /// The next message, or None when the node finished the stream.
    async fn next(&mut self) -> Option<Message> {
        loop {
            if let Some(f) = self.reader.next_frame().unwrap() {
                return Some(f.message);
            }
            let n = tokio::time::timeout(STEP, self.recv.read(self.reader.spare()))
                .await
                .expect("node went silent")
                .ok()??;
            self.reader.filled(n);
        }
    }

    /// Reads until `pick` accepts a message.
    async fn until<T>(&mut self, mut pick: impl FnMut(&Message) -> Option<T>) -> T {
        loop {
            let m = self.next().await.expect("stream ended early");
            if let Some(t) = pick(&m) {
                return t;
            }
        }
    }

    async fn welcome(&mut self) {
        self.write(&Message::Welcome(Welcome {
            coordinator: Message::text("test-coord"),
            heartbeat_ms: 50,
            lease_ms: 1000,
            timeline: Timeline::from_milli_bpm(120_000, ClusterTime(0)),
        }))
        .await;
    }
}

#[test]
fn control_session_end_to_end() {
    in_private_netns(|| async {
        let shutdown = CancellationToken::new();
        let id = unique("sess");
        let mut cfg = NodeConfig::new(&id);
        cfg.audio = AudioSpec::Null;
        cfg.voices = 6;
        let node = start(cfg.clone(), shutdown.clone()).await.unwrap();
        assert!(
            node.audio_description().starts_with("null output"),
            "{}",
            node.audio_description()
        );

        // A second node on the same QUIC port fails with a clear error.
        let mut dup = cfg.clone();
        dup.id = unique("dup");
        dup.quic_port = node.quic_addr().port();
        let e = start(dup, shutdown.clone()).await.unwrap_err();
        assert!(matches!(e, NodeError::QuicBind { .. }), "{e}");
        assert!(e.to_string().contains("port in use"), "{e}");

        // mDNS: the node is advertised on loopback with its TXT record.
        let stop_browse = CancellationToken::new();
        let mut rx = voicemesh_node::mdns::browse(
            voicemesh_node::NetScope::Loopback,
            voicemesh_protocol::discovery::NODE_SERVICE,
            stop_browse.clone(),
        )
        .unwrap();
        let info = loop {
            match rx.recv().await.unwrap() {
                voicemesh_node::mdns::BrowseEvent::Resolved(i)
                    if i.txt("id") == Some(id.as_str()) =>
                {
                    break i;
                }
                _ => {}
            }
        };
        assert_eq!(info.port, node.quic_addr().port());
        assert_eq!(info.txt("role"), Some("node"));
        assert_eq!(info.txt("voices"), Some("6"));
        assert_eq!(info.txt("cv"), Some("0"));
        assert_eq!(info.txt("proto"), Some("1"));
        assert_eq!(info.txt("engines"), Some("subtractive,fm2"));
        stop_browse.cancel();

        let ep = quic_client();
        let mut c = Coordinator::connect(&ep, node.quic_addr()).await;
        let hello = match c.next().await.unwrap() {
            Message::Hello(h) => h,
            other => panic!("expected Hello first, got {other:?}"),
        };
        assert_eq!(hello.id.as_str(), id);
        assert_eq!(hello.role, Role::Node);
        assert_eq!(hello.voices, 6);
        assert_eq!(hello.sample_rate, 48_000);
        assert_eq!(hello.engines[0].as_str(), "subtractive");

        c.welcome().await;
        c.until(|m| matches!(m, Message::Heartbeat(_)).then_some(()))
            .await;
        let st = c
            .until(|m| match m {
                Message::Status(s) => Some(*s),
                _ => None,
            })
            .await;
        assert_eq!(st.active_voices, 0);

        // A note 60 ms ahead sounds from then on, not before.
        let clock = node.clock();
        let at = clock.now().add_nanos(60_000_000);
        c.write(&Message::VoiceOn(VoiceOn {
            voice: 2,
            note: 60,
            velocity: 100,
            channel: 0,
            at,
            lease_until: at.add_nanos(10_000_000_000),
        }))
        .await;
        c.until(|m| match m {
            Message::Status(s) if s.active_voices == 1 => Some(()),
            _ => None,
        })
        .await;
        let seen = clock.now();
        // The block holding `at` is rendered when its first frame is due: at most one block
        // (5.33 ms at 48 kHz / 256 frames) before `at`.
        assert!(
            seen.nanos_since(at) > -5_400_000,
            "voice active {} ns before its time",
            -seen.nanos_since(at)
        );
        assert_eq!(node.counters().late(), 0);

        // The node reports the note's first frame (protocol 1.2): the paced output puts it on
        // the grid frame nearest `at`, and says when on CLOCK_MONOTONIC it emits that frame.
        let onset = c
            .until(|m| match m {
                Message::Onset(o) => Some(*o),
                _ => None,
            })
            .await;
        assert_eq!((onset.voice, onset.note, onset.at), (2, 60, at));
        assert!(
            onset.at_frame.nanos_since(at).abs() <= 10_417,
            "first frame {} ns from at",
            onset.at_frame.nanos_since(at)
        );
        use voicemesh_node::clock::audio::{mono_now_ns, realtime_of_mono};
        assert!(onset.emitted_mono_ns > 0 && onset.emitted_mono_ns < mono_now_ns());
        let emitted = clock.to_cluster(realtime_of_mono(onset.emitted_mono_ns));
        assert!(
            emitted.nanos_since(onset.at_frame).abs() < 20_000,
            "emitted at cluster {emitted}, first frame at {}",
            onset.at_frame
        );

        // CV on a node without CV is answered with an error and counted.
        c.write(&Message::CvSet(CvSet {
            channel: 3,
            microvolts: 1_000_000,
            at,
        }))
        .await;
        let err = c
            .until(|m| match m {
                Message::Error(e) => Some(e.clone()),
                _ => None,
            })
            .await;
        assert!(err.text.contains("no CV outputs"), "{}", err.text);
        assert_eq!(node.cv_rejected(), 1);

        // A frame of major version 9 gets an Error naming the mismatch; the session closes.
        let mut buf = [0u8; MAX_FRAME_LEN];
        let n = encode_frame(
            &Message::Heartbeat(Heartbeat {
                seq: 9,
                now: ClusterTime(0),
            }),
            &mut buf,
        )
        .unwrap();
        buf[4] = 9;
        c.send.write_all(&buf[..n]).await.unwrap();
        let err = c
            .until(|m| match m {
                Message::Error(e) => Some(e.clone()),
                _ => None,
            })
            .await;
        assert_eq!(err.code, ErrorCode::VersionMismatch);
        assert!(err.text.contains("protocol 9.x"), "{}", err.text);
        while c.next().await.is_some() {}
        tokio::time::timeout(STEP, c.conn.closed())
            .await
            .expect("the node closes the connection after a bad frame");
        assert_eq!(node.bad_frames(), 1);

        // A restarted coordinator connects again; a third connection replaces the second.
        let mut c2 = Coordinator::connect(&ep, node.quic_addr()).await;
        assert!(matches!(c2.next().await, Some(Message::Hello(_))));
        c2.welcome().await;
        c2.until(|m| matches!(m, Message::Status(_)).then_some(()))
            .await;
        let mut c3 = Coordinator::connect(&ep, node.quic_addr()).await;
        assert!(matches!(c3.next().await, Some(Message::Hello(_))));
        let bye = c2
            .until(|m| match m {
                Message::Bye(b) => Some(b.clone()),
                _ => None,
            })
            .await;
        assert!(bye.reason.contains("replaced"), "{}", bye.reason);

        // Shutdown: the live session gets a Bye and every task ends cleanly.
        c3.welcome().await;
        shutdown.cancel();
        let bye = c3
            .until(|m| match m {
                Message::Bye(b) => Some(b.clone()),
                _ => None,
            })
            .await;
        assert!(bye.reason.contains("shutting down"), "{}", bye.reason);
        tokio::time::timeout(Duration::from_secs(10), node.wait())
            .await
            .expect("node did not stop")
            .unwrap();
        drop((c2, c3));
    })
}
