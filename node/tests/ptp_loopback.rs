//! A grandmaster and a slave, real statime and real kernel-timestamped multicast, inside a
//! fresh network namespace with only `lo` (nothing reaches a real interface).
//!
//! How the test gets into the namespace: it creates `vm-ptp-<pid>-<n>` with `ip netns add`
//! (deleted by a guard on every exit, panics included), then runs the whole PTP part on a
//! dedicated thread that first enters the namespace with `setns(CLONE_NEWNET)` and then builds
//! a current-thread tokio runtime. Sockets belong to the namespace of the thread that creates
//! them, and nothing here creates sockets on another thread. Needs root; fails (never skips)
//! without it.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use voicemesh_node::clock::ClusterClock;
use voicemesh_node::clock::ptp::{self, PtpConfig, PtpPortState, PtpStatus, ServoState};
use voicemesh_node::net::NetScope;

/// A network namespace this test created; deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn create() -> NetNs {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vm-ptp-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.name))
            .expect("open the namespace handle");
        // SAFETY: `f` is an open namespace file; setns only changes this thread's namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "could not delete network namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("could not delete network namespace {}: {e}", self.name),
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run `ip` (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (this test needs root and network namespaces)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `slave − master` in ns, read back to back (the order alternates to cancel the read time).
fn offset_ns(slave: &ClusterClock, master: &ClusterClock, i: usize) -> i64 {
    if i.is_multiple_of(2) {
        let m = master.now();
        let s = slave.now();
        s.nanos_since(m)
    } else {
        let s = slave.now();
        let m = master.now();
        s.nanos_since(m)
    }
}

#[test]
fn slave_locks_to_grandmaster_in_a_namespace() {
    let ns = NetNs::create();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(scenario());
            })
            .join()
            .expect("the PTP scenario failed");
    });
    drop(ns);
}

async fn scenario() {
    let cfg = PtpConfig {
        scope: NetScope::Loopback,
        ..PtpConfig::default()
    };
    assert_eq!(cfg.scope.multicast_if(), Ipv4Addr::LOCALHOST);

    let master = Arc::new(ClusterClock::new());
    let slave = Arc::new(ClusterClock::new());
    slave.step(3_000_000);
    slave.set_rate(50e-6);
    let initial = offset_ns(&slave, &master, 0);
    println!("initial offset slave − master: {} µs", initial as f64 / 1e3);
    assert!(initial >= 3_000_000, "the slave must start ≥ 3 ms off");

    let shutdown = CancellationToken::new();
    let gm_status = Arc::new(PtpStatus::default());
    let status = Arc::new(PtpStatus::default());
    let gm_stop = CancellationToken::new();
    let gm = tokio::spawn(ptp::run_grandmaster_with_status(
        cfg,
        master.clone(),
        gm_status.clone(),
        gm_stop.clone(),
    ));
    let sl = tokio::spawn(ptp::run_slave(
        cfg,
        slave.clone(),
        status.clone(),
        shutdown.clone(),
    ));

    // Poll the status until locked, bounded.
    let started = Instant::now();
    let locked = tokio::time::timeout(Duration::from_secs(40), async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if status.is_locked() {
                return;
            }
        }
    })
    .await;
    let lock_time = started.elapsed();
    if locked.is_err() {
        shutdown.cancel();
        gm_stop.cancel();
        panic!(
            "no lock within 40 s: slave state {:?}, grandmaster state {:?}, offset {} ns, \
             {} measurements, {} steps, {} malformed, {} socket errors (gm {})",
            status.port_state(),
            gm_status.port_state(),
            status.offset_ns(),
            status.measurements(),
            status.steps(),
            status.malformed(),
            status.socket_errors(),
            gm_status.socket_errors(),
        );
    }
    assert!(slave.is_locked(), "the slave's clock carries the lock too");
    assert_eq!(status.servo_state(), ServoState::Locked);
    assert_eq!(status.port_state(), PtpPortState::Slave);
    assert_eq!(gm_status.port_state(), PtpPortState::Master);
    assert_eq!(
        master.model().rate,
        0.0,
        "the grandmaster's clock is never steered"
    );

    // Once locked, the clocks agree, and keep agreeing for a while.
    let mut worst = 0i64;
    let mut sum = 0i128;
    let mut n = 0usize;
    let mut first = 0i64;
    let mut last = 0i64;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for i in 0..40 {
        tick.tick().await;
        let d = offset_ns(&slave, &master, i);
        if i == 0 {
            first = d;
        }
        last = d;
        worst = worst.max(d.abs());
        sum += d as i128;
        n += 1;
    }
    println!(
        "locked after {:.2} s; then over 2 s: max |slave − master| {:.1} µs, mean {:.1} µs; \
         servo: offset {} ns, path delay {} ns, jitter {} ns, rate {} ppb, {} steps, \
         {} measurements, {} malformed, {} socket errors",
        lock_time.as_secs_f64(),
        worst as f64 / 1e3,
        (sum / n as i128) as f64 / 1e3,
        status.offset_ns(),
        status.path_delay_ns(),
        status.jitter_ns(),
        status.rate_ppb(),
        status.steps(),
        status.measurements(),
        status.malformed(),
        status.socket_errors(),
    );
    assert!(worst < 100_000, "slave and master differ by {worst} ns");
    assert!(status.steps() >= 1, "a 3 ms error is stepped, not slewed");
    // Both models run on the same CLOCK_REALTIME: the servo must have taken most of the 50 ppm
    // out (it still pulls the offset in, so not all of it yet), and the clocks drift apart far
    // less than 50 ppm × 2 s = 100 µs over the window.
    assert!(
        status.rate_ppb().abs() < 25_000,
        "rate correction left: {} ppb",
        status.rate_ppb()
    );
    assert!(
        (last - first).abs() < 50_000,
        "drift over 2 s: {} ns",
        last - first
    );
    assert!(status.is_locked());

    // Garbage on both ports is dropped and counted; nothing stops, the lock holds.
    assert_eq!(status.malformed() + gm_status.malformed(), 0);
    let junk = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("junk socket");
    socket2::SockRef::from(&junk)
        .set_multicast_if_v4(&Ipv4Addr::LOCALHOST)
        .expect("junk multicast interface");
    for port in [cfg.event_port, cfg.general_port] {
        for len in [0usize, 5, 33, 44, 300] {
            let mut bad = vec![0xa5u8; len];
            if len > 4 {
                bad[1] = 2; // PTPv2, but a lying messageLength or a short header
            }
            junk.send_to(&bad, (ptp::socket::PTP_PRIMARY_GROUP, port))
                .expect("send junk");
        }
    }
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while status.malformed() < 10 || gm_status.malformed() < 10 {
            tick.tick().await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "junk not counted: slave {}, grandmaster {}",
            status.malformed(),
            gm_status.malformed()
        )
    });
    println!(
        "malformed datagrams counted: slave {}, grandmaster {}",
        status.malformed(),
        gm_status.malformed()
    );
    let measured = status.measurements();
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while status.measurements() < measured + 4 {
            tick.tick().await;
        }
    })
    .await
    .expect("the slave keeps measuring after junk");
    assert!(status.is_locked() && !gm.is_finished() && !sl.is_finished());

    // The grandmaster goes away: the slave notices (announce receipt timeout), unlocks and
    // keeps running, its clock free-running.
    gm_stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), gm)
        .await
        .expect("the grandmaster stops on its token")
        .expect("grandmaster task")
        .expect("grandmaster");
    let gone = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while status.is_locked() {
            tick.tick().await;
        }
    })
    .await
    .expect("the slave unlocks when its grandmaster is gone");
    println!(
        "grandmaster gone: slave unlocked after {:.2} s",
        gone.elapsed().as_secs_f64()
    );
    assert!(!slave.is_locked());
    assert_ne!(status.port_state(), PtpPortState::Slave);
    assert_eq!(
        status.servo_state(),
        ServoState::Holdover,
        "a slave that lost its master says it holds over"
    );
    assert!(
        status.bmca_runs() >= 10,
        "the BMCA runs on its interval: {} runs",
        status.bmca_runs()
    );
    assert!(!sl.is_finished());

    // Holdover: the slave free-runs at the rate it learnt. The old grandmaster's clock keeps
    // running (it is a model over the same CLOCK_REALTIME), so the true offset is measurable:
    // over 4 s it moves by the residual rate error only, far less than the 50 ppm × 4 s =
    // 200 µs the slave's clock would drift without the learnt rate.
    let steps_before = status.steps();
    let holdover_start = offset_ns(&slave, &master, 0);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let holdover_end = offset_ns(&slave, &master, 1);
    let drift = holdover_end - holdover_start;
    println!(
        "holdover: true offset {:.1} µs → {:.1} µs over 4 s (rate {} ppb)",
        holdover_start as f64 / 1e3,
        holdover_end as f64 / 1e3,
        status.rate_ppb()
    );
    assert!(drift.abs() < 20_000, "holdover drifted {drift} ns in 4 s");
    assert_eq!(status.servo_state(), ServoState::Holdover);

    // A new grandmaster (a restarted coordinator: new identity, its own clock on the same
    // timescale): the slave re-acquires it by slewing — no step. statime starts a fresh filter
    // that re-learns the frequency from its first noisy measurements; on a busy loopback
    // (6–8 µs rms stamp jitter) that moved the clock by up to ~21 µs, slowly (ppm-level rate
    // changes, nothing audible), so the bound is 50 µs.
    let master2 = Arc::new(ClusterClock::new());
    let gm2_stop = CancellationToken::new();
    let gm2_status = Arc::new(PtpStatus::default());
    let gm2 = tokio::spawn(ptp::run_grandmaster_with_status(
        cfg,
        master2.clone(),
        gm2_status,
        gm2_stop.clone(),
    ));
    let back = Instant::now();
    let mut worst = 0i64;
    let mut i = 0usize;
    let relocked = tokio::time::timeout(Duration::from_secs(30), async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            worst = worst.max(offset_ns(&slave, &master2, i).abs());
            i += 1;
            if status.is_locked() {
                return;
            }
        }
    })
    .await;
    gm2_stop.cancel();
    let _ = gm2.await;
    assert!(
        relocked.is_ok(),
        "no lock to the new grandmaster within 30 s (state {:?})",
        status.servo_state()
    );
    println!(
        "new grandmaster: locked again after {:.2} s, worst |offset| meanwhile {:.1} µs, \
         {} steps",
        back.elapsed().as_secs_f64(),
        worst as f64 / 1e3,
        status.steps() - steps_before
    );
    assert_eq!(
        status.steps(),
        steps_before,
        "re-acquiring a grandmaster on the same timescale is slewed, not stepped"
    );
    assert!(
        worst < 50_000,
        "re-acquisition moved the clock {worst} ns off"
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), sl)
        .await
        .expect("the slave stops on its token")
        .expect("slave task")
        .expect("slave");
    assert!(
        !slave.is_locked(),
        "a stopped slave no longer claims a lock"
    );
}
