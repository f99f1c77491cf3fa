//! The JACK backend against a real JACK server (jackd2 with the dummy driver, under a unique
//! server name, stopped with SIGTERM afterwards). jackd missing is a failure with a clear message, not a skip.
//!
//! One test in this binary: it sets `JACK_DEFAULT_SERVER`, which is process-wide.

mod common;

use common::unique;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use voicemesh_node::audio::ffi::jack::Client;
use voicemesh_node::audio::{self, AudioParams, AudioSpec};
use voicemesh_node::clock::ClusterClock;
use voicemesh_node::engine::{Control, EngineCounters, EngineEvent, EventKind};
use voicemesh_node::error::NodeError;
use voicemesh_tests::Jackd;

fn set_server(name: &str) {
    // SAFETY: this binary has a single test and no other thread reads the environment while
    // it is set (the JACK clients are opened afterwards on this thread).
    unsafe { std::env::set_var("JACK_DEFAULT_SERVER", name) };
}

fn params(id: &str, clock: Arc<ClusterClock>, counters: Arc<EngineCounters>) -> AudioParams {
    AudioParams {
        id: id.to_string(),
        name: id.to_string(),
        voices: 8,
        sample_rate: 44_100, // JACK's rate wins
        clock,
        counters,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jack_backend_plays_through_a_real_server() {
    // Without a server: a clear error naming the way out.
    set_server(&unique("vm-nojack"));
    let clock = Arc::new(ClusterClock::new());
    let counters = Arc::new(EngineCounters::default());
    let e = audio::start(
        &AudioSpec::Jack,
        params("j", clock.clone(), counters.clone()),
        CancellationToken::new(),
    )
    .unwrap_err();
    assert!(matches!(e, NodeError::NoJackServer { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("no JACK server running (start jackd or use --audio wav:DIR or null)"),
        "{e}"
    );

    let jackd = Jackd::start("vm-jack");
    let server = jackd.name.clone();
    set_server(&server);

    // Wait for the server to accept clients (it has no readiness signal to await).
    let deadline = Instant::now() + Duration::from_secs(10);
    let probe = loop {
        match Client::open("vm-probe", None) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("jackd {server} did not come up within 10 s: {e}"),
        }
    };

    let id = unique("j");
    let stop = CancellationToken::new();
    let mut a = audio::start(
        &AudioSpec::Jack,
        params(&id, clock.clone(), counters.clone()),
        stop.clone(),
    )
    .unwrap();
    assert_eq!(a.sample_rate, 48_000);
    assert_eq!(
        a.description,
        format!("JACK client voicemesh-{id} -> system:playback_1, system:playback_2")
    );
    let out_name = format!("voicemesh-{id}:out");
    let connections = probe.port_connections(&out_name);
    assert!(
        connections.iter().any(|p| p == "system:playback_1")
            && connections.iter().any(|p| p == "system:playback_2"),
        "{out_name} connected to {connections:?}"
    );

    // Listen to the node's output through a second client.
    let (tx, heard) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    let probe = probe
        .activate_input("in", move |_, input: &[f32]| {
            if input.iter().any(|s| *s != 0.0)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(());
            }
        })
        .unwrap();
    probe.connect(&out_name, probe.port_name()).unwrap();

    let at = clock.now().add_nanos(30_000_000);
    a.sender.send(Control::Event(EngineEvent {
        voice: 0,
        at,
        kind: EventKind::On {
            note: 57,
            velocity: 90,
            lease_until: at.add_nanos(5_000_000_000),
        },
    }));
    tokio::time::timeout(Duration::from_secs(5), heard)
        .await
        .expect("no sound from the node's JACK port")
        .unwrap();
    // The block is rendered one output latency before it sounds, so the probe hears it at
    // most (latency + one period) before `at`; never earlier.
    let now = clock.now();
    let lat_frames = probe
        .port_playback_latency(&out_name)
        .expect("the node's port exists")
        .max;
    assert!(lat_frames > 0, "dummy driver reports a playback latency");
    let bound = (i64::from(lat_frames) + 256) * 1_000_000_000 / 48_000 + 1_000_000;
    assert!(
        now.nanos_since(at) > -bound,
        "sound {} ns early (bound {bound})",
        -now.nanos_since(at)
    );
    assert_eq!(counters.active(), 1);
    assert!(counters.blocks.load(std::sync::atomic::Ordering::Relaxed) > 0);
    let (mean, max) = counters.take_load();
    assert!(mean <= max && max < 1000, "load {mean}/{max} per-mille");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), &mut a.task)
        .await
        .expect("JACK backend did not stop")
        .unwrap()
        .unwrap();
    drop(probe);
}
