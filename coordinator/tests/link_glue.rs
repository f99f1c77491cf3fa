//! Two in-process coordinators with Link on, in a private network namespace (loopback only):
//! they find each other, share one session, and a tempo or transport change made through one
//! coordinator's tempo API reaches the other's cluster timeline; disabling Link at run time
//! sends a BYEBYE.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use voicemesh_coordinator::{CoordinatorConfig, RunningCoordinator, start};
use voicemesh_node::clock::ClusterClock;
use voicemesh_tests::{TempDir, in_private_netns};

async fn coordinator(dir: &TempDir, shutdown: &CancellationToken) -> RunningCoordinator {
    let mut cfg = CoordinatorConfig::new(dir.0.clone());
    cfg.http = "127.0.0.1:0".parse().unwrap();
    cfg.osc = "127.0.0.1:0".parse().unwrap();
    cfg.link = true;
    start(cfg, Arc::new(ClusterClock::new()), shutdown.clone())
        .await
        .expect("coordinator starts")
}

async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        sleep(Duration::from_millis(5)).await;
    }
    t0.elapsed()
}

#[test]
fn two_coordinators_share_a_link_session() {
    in_private_netns(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(body())
    });
}

async fn body() {
    let (da, db) = (TempDir::new("vm-link-a"), TempDir::new("vm-link-b"));
    let stop = CancellationToken::new();
    let a = coordinator(&da, &stop).await;
    a.tempo().set_tempo_bpm(140.0).unwrap();
    sleep(Duration::from_millis(700)).await;
    let b = coordinator(&db, &stop).await;
    // B joins A's older session and adopts its tempo.
    until("B joins A", Duration::from_secs(5), || {
        let s = b.tempo().snapshot();
        s.link.peers == 1 && (s.tempo_bpm - 140.0).abs() < 1e-3
    })
    .await;
    until("A counts B", Duration::from_millis(500), || {
        a.tempo().snapshot().link.peers == 1
    })
    .await;
    assert!(a.tempo().snapshot().link.enabled);
    // Same phase at the same instant (one machine, one cluster clock base).
    let (sa, sb) = (a.tempo().snapshot(), b.tempo().snapshot());
    let t = sa.cluster_time_ns;
    let ba = sa.timeline.beats_at(voicemesh_protocol::ClusterTime(t));
    let bb = sb.timeline.beats_at(voicemesh_protocol::ClusterTime(t));
    assert!((ba - bb).abs() * 60.0 / 140.0 < 1e-4, "beats {ba} vs {bb}");
    // Edits through B's API reach A within 0.5 s.
    b.tempo().set_tempo_bpm(90.0).unwrap();
    let d = until("tempo B → A", Duration::from_millis(500), || {
        (a.tempo().snapshot().tempo_bpm - 90.0).abs() < 1e-3
    })
    .await;
    println!("tempo B → A in {d:?}");
    a.tempo().set_playing(true);
    until("play A → B", Duration::from_millis(500), || {
        b.tempo().snapshot().playing
    })
    .await;
    // A leaves at run time: B drops it at once (BYEBYE), not after the 5 s TTL.
    a.tempo().set_link_enabled(false);
    let d = until("B sees A leave", Duration::from_secs(1), || {
        b.tempo().snapshot().link.peers == 0
    })
    .await;
    println!("BYEBYE seen in {d:?}");
    assert!(!a.tempo().snapshot().link.enabled);
    assert!((b.tempo().snapshot().tempo_bpm - 90.0).abs() < 1e-3);
    // And joins again.
    a.tempo().set_link_enabled(true);
    until("A back", Duration::from_secs(5), || {
        a.tempo().snapshot().link.peers == 1 && b.tempo().snapshot().link.peers == 1
    })
    .await;
    stop.cancel();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

/// Runs `ip args…` in the calling thread's namespace; whether it succeeded.
fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("ip runs")
        .success()
}

/// Adds an interface `name` with `cidr`, up: a dummy where the kernel has the driver, else one
/// end of a veth pair (whose other end, without an address, is up too).
fn add_iface(name: &str, cidr: &str) {
    let dummy = std::process::Command::new("ip")
        .args(["link", "add", name, "type", "dummy"])
        .stderr(std::process::Stdio::null())
        .status()
        .expect("ip runs");
    if !dummy.success() {
        let peer = format!("{name}p");
        assert!(ip(&[
            "link", "add", name, "type", "veth", "peer", "name", &peer
        ]));
        assert!(ip(&["link", "set", &peer, "up"]));
    }
    assert!(ip(&["addr", "add", cidr, "dev", name]));
    assert!(ip(&["link", "set", name, "up"]));
}

/// In LAN scope Link runs on every running interface address, loopback included, and the
/// 5 s rescan opens and closes gateways as interfaces come and go.
#[test]
fn link_gateways_follow_interfaces() {
    in_private_netns(|| {
        add_iface("vml0", "10.91.0.1/24");
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let dir = TempDir::new("vm-link-scan");
                let stop = CancellationToken::new();
                let mut cfg = CoordinatorConfig::new(dir.0.clone());
                cfg.http = "127.0.0.1:0".parse().unwrap();
                cfg.osc = "127.0.0.1:0".parse().unwrap();
                cfg.scope = voicemesh_node::NetScope::Lan("10.91.0.1".parse().unwrap());
                cfg.link = true;
                let c = start(cfg, Arc::new(ClusterClock::new()), stop.clone())
                    .await
                    .expect("coordinator starts");
                let gw = || c.tempo().snapshot().link.gateways;
                until("lo + vml0", Duration::from_secs(2), || gw() == 2).await;
                add_iface("vml1", "10.92.0.1/24");
                let d = until("vml1 gets a gateway", Duration::from_secs(6), || gw() == 3).await;
                println!("new interface picked up after {d:?}");
                assert!(ip(&["link", "del", "vml1"]));
                let d = until("vml1's gateway closed", Duration::from_secs(6), || {
                    gw() == 2
                })
                .await;
                println!("vanished interface dropped after {d:?}");
                stop.cancel();
                c.wait().await.unwrap();
            });
    });
}

/// The quantum comes from `config.json` (`link.quantum`); a bad one stops the start naming it.
#[test]
fn quantum_is_a_setting() {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let dir = TempDir::new("vm-link-quantum");
            std::fs::create_dir_all(&dir.0).unwrap();
            let config = dir.0.join("config.json");
            let stop = CancellationToken::new();
            let cfg = || {
                let mut c = CoordinatorConfig::new(dir.0.clone());
                c.http = "127.0.0.1:0".parse().unwrap();
                c.osc = "127.0.0.1:0".parse().unwrap();
                c
            };
            std::fs::write(&config, r#"{"version": 1, "link": {"quantum": 3}}"#).unwrap();
            let c = start(cfg(), Arc::new(ClusterClock::new()), stop.clone())
                .await
                .expect("coordinator starts");
            let s = c.snapshot().tempo;
            assert_eq!(s.quantum, 3.0);
            assert!((0.0..3.0).contains(&s.phase), "{s:?}");
            assert!((s.phase - s.beats.rem_euclid(3.0)).abs() < 1e-9);
            stop.cancel();
            c.wait().await.unwrap();
            std::fs::write(&config, r#"{"version": 1, "link": {"quantum": 0}}"#).unwrap();
            let e = start(
                cfg(),
                Arc::new(ClusterClock::new()),
                CancellationToken::new(),
            )
            .await
            .expect_err("quantum 0 is refused");
            assert!(e.to_string().contains("link.quantum"), "{e}");
        });
}
