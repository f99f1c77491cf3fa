//! A flood of garbage at the coordinator's RTP-MIDI ports — 100 000 datagrams a second for two
//! seconds, to both ports, in a namespace of its own — leaves it responsive (`/api/cluster`
//! answers during and after) and counting (the datagrams are counted, the garbage dropped by
//! reason), and a real invitation is still accepted afterwards.

use std::net::UdpSocket;
use std::time::{Duration, Instant};
use voicemesh_tests::{Netns, coordinator, try_http_get_json_local};

const RATE: u64 = 100_000;
const SECONDS: u64 = 2;

#[test]
fn a_garbage_flood_leaves_the_coordinator_responsive_and_counting() {
    let ns = Netns::new();
    let dir = std::env::temp_dir().join(format!("vm-rtp-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (coordinator, api) = coordinator(&ns, &dir.join("state"), &[]);
    coordinator.expect_line("rtpmidi: udp://127.0.0.1:5004", Duration::from_secs(5));

    let (sent, worst_api, after, ok) = ns.in_ns(move || {
        // The flood, from a thread: batches of 100 every millisecond, bounded in count.
        let flood = std::thread::spawn(|| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let mut buf = [0u8; 64];
            let start = Instant::now();
            let mut sent = 0u64;
            while sent < RATE * SECONDS {
                for _ in 0..100 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = 3 + (x % 61) as usize;
                    for (i, b) in buf[..len].iter_mut().enumerate() {
                        *b = (x >> (i % 8 * 8)) as u8 ^ i as u8;
                    }
                    // Half look like control packets (with a command no peer uses, so none is
                    // accepted by chance), half like RTP, to reach both parsers.
                    if sent.is_multiple_of(2) {
                        buf[0] = 0xFF;
                        buf[1] = 0xFF;
                        buf[2] = 0x00;
                    } else {
                        buf[0] = 0x80;
                    }
                    let port = if sent.is_multiple_of(3) { 5004 } else { 5005 };
                    let _ = s.send_to(&buf[..len], ("127.0.0.1", port));
                    sent += 1;
                }
                let due = start + Duration::from_micros(sent * 1_000_000 / RATE);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            sent
        });
        // Meanwhile the API keeps answering.
        let mut worst = Duration::ZERO;
        while !flood.is_finished() {
            let t = Instant::now();
            try_http_get_json_local(&api).expect("/api/cluster answers during the flood");
            worst = worst.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(50));
        }
        let sent = flood.join().unwrap();
        // Then a real invitation: IN on the control port is answered OK.
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut inv = vec![
            0xFF, 0xFF, b'I', b'N', 0, 0, 0, 2, 0, 0, 0x12, 0x34, 0, 0, 0, 9,
        ];
        inv.extend_from_slice(b"after\0");
        let mut ok = false;
        let mut buf = [0u8; 256];
        for _ in 0..10 {
            s.send_to(&inv, "127.0.0.1:5004").unwrap();
            if let Ok(n) = s.recv(&mut buf) {
                ok = n >= 16 && buf[..4] == [0xFF, 0xFF, b'O', b'K'];
                break;
            }
        }
        (sent, worst, try_http_get_json_local(&api).unwrap(), ok)
    });
    let r = &after["rtpmidi"];
    let received = r["datagrams"].as_u64().unwrap();
    let malformed: u64 = r["malformed"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let unknown = r["unknown_sender"].as_u64().unwrap();
    println!(
        "flood: sent {sent}, counted {received} (malformed {malformed}, from no session {unknown}); \
         slowest /api/cluster during the flood {} ms",
        worst_api.as_millis()
    );
    assert_eq!(sent, RATE * SECONDS);
    // The kernel drops what does not fit the sockets' buffers while the task is busy (a third
    // on this machine under load); a large share must be counted, and every one of them
    // dropped as malformed or as coming from no session.
    assert!(received >= sent / 4, "only {received} of {sent} counted");
    assert!(malformed + unknown + 1 >= received, "{r}");
    assert!(worst_api < Duration::from_secs(1), "{worst_api:?}");
    assert!(ok, "no OK to an invitation after the flood\n{r}");
    assert_eq!(r["sessions"].as_array().unwrap().len(), 1, "{r}");
    drop(coordinator);
    let _ = std::fs::remove_dir_all(&dir);
}
