//! A flood of garbage at the coordinator's OSC port — 100 000 datagrams a second for 3 s, from
//! one sender — leaves it responsive: the HTTP API answers throughout, valid OSC from another
//! sender is still played, and every datagram received is counted (as malformed or rate
//! limited). Prints the rate reached and the rate the coordinator took in.
//!
//! Judges timing, so it runs in the serial `timed` group of scripts/test-all.sh.

use std::net::UdpSocket;
use std::time::{Duration, Instant};
use voicemesh_tests::{Child, Netns, TempDir, try_http_get_json_local, voicemesh_bin};

const RATE: u64 = 100_000;
const SECONDS: u64 = 3;

/// xorshift64*: garbage without a dependency.
fn next(s: &mut u64) -> u64 {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    s.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Datagrams per `sendmmsg` call.
const BATCH: usize = 256;

/// Sends `n` (≤ [`BATCH`]) datagrams of 8–63 random bytes with one `sendmmsg`; every fourth
/// (counting from `first`) starts with `/`, to reach the parser's depths. Returns how many the
/// kernel took.
fn send_garbage(sock: &UdpSocket, seed: &mut u64, n: usize, first: u64) -> usize {
    use std::os::fd::AsRawFd;
    let mut bufs = [[0u8; 64]; BATCH];
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(n);
    for (i, buf) in bufs.iter_mut().take(n).enumerate() {
        let len = 8 + (next(seed) % 56) as usize;
        for b in buf[..len].iter_mut() {
            *b = next(seed) as u8;
        }
        if (first + i as u64).is_multiple_of(4) {
            buf[0] = b'/';
        }
        iov.push(libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        });
    }
    let mut msgs: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .map(|v| {
            // SAFETY: an all-zero msghdr is valid (no name, no control data).
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    // SAFETY: `msgs` points at `n` headers whose iovecs point into `bufs`, all alive for the
    // call; the socket is connected, so no address is needed.
    let rc = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
    usize::try_from(rc).unwrap_or(0)
}

fn note(n: u8, vel: u8) -> Vec<u8> {
    // /voicemesh/note ,ii n vel
    let mut b = b"/voicemesh/note\0,ii\0".to_vec();
    b.extend_from_slice(&i32::from(n).to_be_bytes());
    b.extend_from_slice(&i32::from(vel).to_be_bytes());
    b
}

#[test]
fn garbage_flood_leaves_http_and_valid_osc_working_and_is_counted() {
    let ns = Netns::new();
    let dir = TempDir::new("osc-flood");
    let mut cmd = ns.command(voicemesh_bin());
    cmd.args(["coordinator", "--state-dir"])
        .arg(dir.0.join("state"));
    let coordinator = Child::spawn("coordinator", cmd);
    let line = coordinator.expect_line("dashboard: http://", Duration::from_secs(30));
    let dashboard = line.split("dashboard: ").nth(1).unwrap().trim().to_string();
    let api = dashboard.replacen("/?token=", "/api/cluster?token=", 1);

    let (sent, took, http_worst, http_count, valid_sent) = ns.in_ns(|| {
        std::thread::scope(|s| {
            let flooder = s.spawn(|| {
                let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
                sock.connect("127.0.0.1:9000").unwrap();
                let mut seed = 0x9E37_79B9_7F4A_7C15u64;
                let start = Instant::now();
                let total = RATE * SECONDS;
                let mut sent = 0u64;
                while sent < total {
                    // Keep to the rate: send what is due (in batches of one sendmmsg call, so
                    // the sender needs little CPU), then sleep briefly.
                    let due = (start.elapsed().as_nanos() as u64 * RATE / 1_000_000_000).min(total);
                    while sent < due {
                        let n = ((due - sent) as usize).min(BATCH);
                        sent += send_garbage(&sock, &mut seed, n, sent) as u64;
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                (sent, start.elapsed())
            });
            // Meanwhile: the API every 50 ms, and a valid note pair every 100 ms from another
            // socket.
            let valid = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut worst = Duration::ZERO;
            let mut count = 0u32;
            let mut valid_sent = 0u64;
            while !flooder.is_finished() {
                let t = Instant::now();
                try_http_get_json_local(&api).expect("the API answers during the flood");
                worst = worst.max(t.elapsed());
                count += 1;
                if count.is_multiple_of(2) {
                    valid.send_to(&note(60, 0), "127.0.0.1:9000").unwrap();
                    valid_sent += 1;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let (sent, took) = flooder.join().unwrap();
            (sent, took, worst, count, valid_sent)
        })
    });
    let v = ns.in_ns(|| {
        // Let the coordinator drain its socket, then read the counters.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = try_http_get_json_local(&api).unwrap();
            let done = v["osc"]["notes"].as_u64().unwrap() >= valid_sent;
            if done || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let received = v["osc"]["received"].as_u64().unwrap();
    let d = &v["osc"]["dropped"];
    let counted: u64 = d
        .as_object()
        .unwrap()
        .values()
        .map(|x| x.as_u64().unwrap())
        .sum();
    let rate_limited = d["rate_limited"].as_u64().unwrap();
    let rate = sent as f64 / took.as_secs_f64();
    println!(
        "flood: sent {sent} datagrams in {:.2} s ({rate:.0}/s); coordinator received {received} \
         ({:.1} %), {rate_limited} rate limited, {} malformed; HTTP worst {} ms over {http_count} \
         requests; valid notes {} of {valid_sent}",
        took.as_secs_f64(),
        received as f64 * 100.0 / sent as f64,
        d["malformed"],
        http_worst.as_millis(),
        v["osc"]["notes"],
    );
    assert!(
        rate > 0.9 * RATE as f64,
        "the flooder reached only {rate:.0}/s"
    );
    assert_eq!(
        v["osc"]["notes"].as_u64().unwrap(),
        valid_sent,
        "every valid note from the other sender is played: {v}"
    );
    // Every datagram received is accounted for: the valid ones, or a drop reason.
    assert_eq!(received, valid_sent + counted, "{v}");
    assert!(rate_limited > sent / 2, "the flooder is rate limited: {v}");
    // The kernel kept up too: the coordinator read (nearly) everything sent.
    assert!(
        received as f64 >= 0.99 * (sent + valid_sent) as f64,
        "received {received} of {sent}"
    );
    assert!(
        http_worst < Duration::from_millis(500),
        "an API request took {http_worst:?} during the flood"
    );
    drop(coordinator);
}
