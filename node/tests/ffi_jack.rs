//! `audio::ffi::jack` (libjack loaded at run time) against a real JACK server: jackd2 with
//! the dummy driver under a unique server name, stopped afterwards. The server is named
//! explicitly (`JackServerName`), so nothing here touches the process environment. jackd
//! missing is a failure with a clear message, not a skip.
//!
//! One test in this binary, its steps in sequence: libjack (JACK2) keeps one server's shared
//! state per process, so clients of two servers at once in one process crash it.

mod common;

use common::unique;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::{Duration, Instant};
use voicemesh_node::audio::ffi::jack::{Client, JackError, PORT_IS_INPUT, PORT_IS_OUTPUT};

use voicemesh_tests::Jackd;

/// Waits for one message on `rx`, failing with `what` after `secs` seconds.
fn expect(rx: &Receiver<()>, secs: u64, what: &str) {
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|e| panic!("{what} within {secs} s: {e}"));
}

#[test]
fn ffi_jack_against_a_real_server() {
    no_server_is_a_clear_error();
    let jackd = Jackd::start("vm-ffi-jack");
    a_client_plays_into_a_probe(&jackd.name);
    a_panicking_handler_is_silenced_not_fatal(&jackd.name);
}

fn no_server_is_a_clear_error() {
    let server = unique("vm-ffi-nojack");
    let e = Client::open("vm-nobody", Some(&server)).unwrap_err();
    match &e {
        JackError::NoServer { server: s, .. } => assert_eq!(s, &server),
        other => panic!("expected NoServer, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("no JACK server {server:?} running"))
            && msg.contains("start jackd or use --audio wav:DIR or null"),
        "{msg}"
    );
}

fn a_client_plays_into_a_probe(server: &str) {
    let server = Some(server);

    // The player: a sine on one output port.
    let player = Client::open("vm-player", server).unwrap();
    assert_eq!(player.sample_rate(), 48_000);
    assert_eq!(player.buffer_size(), 256);
    assert!(player.name().starts_with("vm-player"), "{}", player.name());
    let monitor = player.monitor();
    let (cycled, cycles_rx) = sync_channel(1);
    let calls = Arc::new(AtomicU64::new(0));
    let calls_in = calls.clone();
    let mut phase = 0f32;
    let player = player
        .activate_output("out", move |nframes, out| {
            assert_eq!(out.len(), nframes as usize);
            for s in out.iter_mut() {
                *s = 0.25 * phase.sin();
                phase = (phase + 2.0 * std::f32::consts::PI * 440.0 / 48_000.0)
                    % (2.0 * std::f32::consts::PI);
            }
            if calls_in.fetch_add(1, Ordering::Relaxed) + 1 == 10 {
                let _ = cycled.try_send(());
            }
        })
        .unwrap();
    let out_name = player.port_name().to_string();
    assert_eq!(out_name, format!("{}:out", player.name()));
    expect(&cycles_rx, 10, "10 process callbacks");
    assert!(monitor.cycles() >= 10);
    assert!(!monitor.panicked());
    let times = monitor.cycle_times();
    assert!(times.next_usecs > times.current_usecs, "{times:?}");
    assert!(times.period_usecs > 0.0, "{times:?}");
    assert!(player.time_us() >= times.current_usecs);
    let _ = player.frame_time();
    let _ = (player.is_realtime(), player.real_time_priority());

    // The system ports of the dummy driver.
    let playback = player.ports("^system:playback_", PORT_IS_INPUT).unwrap();
    assert!(
        playback.iter().any(|p| p == "system:playback_1"),
        "{playback:?}"
    );
    let connected = player.connect_system_playback().unwrap();
    assert_eq!(connected, ["system:playback_1", "system:playback_2"]);
    assert!(player.is_connected_to("system:playback_1"));
    assert!(player.is_connected_to("system:playback_2"));
    // Connecting again is not an error.
    assert_eq!(player.connect_system_playback().unwrap(), connected);
    let latency = player.playback_latency();
    assert!(latency.max > 0, "the dummy driver has a playback latency");
    assert_eq!(monitor.playback_latency(), latency);

    // The probe: a second client with an input port, hearing the player.
    let probe = Client::open("vm-probe", server).unwrap();
    let (heard, heard_rx) = sync_channel(1);
    let probe = probe
        .activate_input("in", move |_, input| {
            if input.iter().any(|s| s.abs() > 0.01) {
                let _ = heard.try_send(());
            }
        })
        .unwrap();
    assert!(
        player
            .ports("", PORT_IS_OUTPUT)
            .unwrap()
            .contains(&out_name)
    );
    player.connect(&out_name, probe.port_name()).unwrap();
    assert!(player.is_connected_to(probe.port_name()));
    expect(&heard_rx, 5, "the probe hears the player's sine");

    // A bad connection is an error naming both ports.
    let e = player.connect(&out_name, "nobody:nothing").unwrap_err();
    assert!(
        matches!(e, JackError::Connect { .. }) && e.to_string().contains("nobody:nothing"),
        "{e}"
    );

    drop(probe);
    drop(player);
    assert!(calls.load(Ordering::Relaxed) >= 10);
}

fn a_panicking_handler_is_silenced_not_fatal(server: &str) {
    let server = Some(server);
    let player = Client::open("vm-panicker", server).unwrap();
    let monitor = player.monitor();
    let player = player
        .activate_output("out", |_, out| {
            out.fill(1.0);
            panic!("handler panic (expected by the test)");
        })
        .unwrap();
    let probe = Client::open("vm-probe", server).unwrap();
    let (silent, silent_rx) = sync_channel(1);
    let mut cycles = 0u32;
    let probe = probe
        .activate_input("in", move |_, input| {
            if input.iter().all(|s| *s == 0.0) {
                cycles += 1;
                if cycles == 10 {
                    let _ = silent.try_send(());
                }
            } else {
                cycles = 0;
            }
        })
        .unwrap();
    player
        .connect(player.port_name(), probe.port_name())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !monitor.panicked() {
        assert!(Instant::now() < deadline, "the handler never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    expect(&silent_rx, 5, "10 silent cycles after the panic");
    let before = monitor.cycles();
    let deadline = Instant::now() + Duration::from_secs(5);
    while monitor.cycles() < before + 5 {
        assert!(Instant::now() < deadline, "cycles stopped after the panic");
        std::thread::sleep(Duration::from_millis(5));
    }
}
