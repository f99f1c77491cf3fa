//! `voicemesh demo`: a whole cluster on this machine — a coordinator, two nodes and a simulated
//! MCU node — playing a chord progression that the coordinator spreads across both nodes, while
//! the MCU node plays each chord's root as control voltages (1 V/oct pitch, gate, velocity).
//!
//! The phrase travels the real path: it is sent as OSC over UDP to the coordinator, which
//! allocates voices and sends them over QUIC to the nodes and over the MCU datagram link to the
//! MCU node, which all play them at the cluster time stamped on them. By default everything
//! stays on loopback.

use crate::{
    DemoArgs, cancel_on_signals, coordinator_config, node_config, print_node, scope_text,
    start_coordinator,
};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use voicemesh_mcu::sim::{SimConfig, SimHandle, start_sim};
use voicemesh_node::AudioSpec;

/// The phrase: close-voiced seventh chords (each within an octave), as MIDI notes.
pub const PHRASE: [[u8; 4]; 4] = [
    [60, 64, 67, 71], // Cmaj7
    [57, 60, 64, 67], // Am7
    [53, 57, 60, 64], // Fmaj7
    [55, 59, 62, 65], // G7
];
/// How long each chord is held.
const CHORD_ON: Duration = Duration::from_millis(600);
/// Silence between chords (longer than a voice's release).
const CHORD_GAP: Duration = Duration::from_millis(250);
/// Lookahead of the demo's coordinator when the nodes play through JACK.
const JACK_LOOKAHEAD_MS: u64 = 30;
/// The nodes the demo starts.
const NODES: [&str; 2] = ["node-a", "node-b"];
/// The simulated MCU node the demo starts.
const MCU: &str = "mcu-demo";
/// The MIDI channel the chord roots are played on, routed to the MCU node.
const CV_CHANNEL: u8 = 1;
/// The demo's configuration (when the state directory has none): the chords (channel 0) on the
/// two nodes, the roots (channel 1) on the MCU node's voice 0 — pitch on CV 0, gate on CV 1,
/// velocity on CV 2.
const DEMO_CONFIG: &str = r#"{
  "version": 1,
  "channels": [
    {"channel": 0, "nodes": ["node-a", "node-b"]},
    {"channel": 1, "nodes": ["mcu-demo"]}
  ],
  "cv": {
    "voices": [{"node": "mcu-demo", "voice": 0,
                "pitch": {"node": "mcu-demo", "channel": 0},
                "gate": {"node": "mcu-demo", "channel": 1},
                "velocity": {"node": "mcu-demo", "channel": 2}}]
  }
}"#;

pub async fn run(a: DemoArgs) -> Result<()> {
    let scope = a.net.scope()?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone())?;
    let deadline = match a.seconds {
        Some(s) if !(s.is_finite() && s > 0.0) => bail!("--seconds must be a positive number"),
        Some(s) => Some(Instant::now() + Duration::from_secs_f64(s)),
        None => None,
    };

    let (state_dir, _temp_guard) = match a.state_dir {
        Some(d) => (d, None),
        None => {
            let d = std::env::temp_dir().join(format!("voicemesh-demo-{}", std::process::id()));
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            (d.clone(), Some(RemoveOnDrop(d)))
        }
    };
    let audio = match a.audio {
        AudioSpec::Auto if !voicemesh_node::jack_server_running() => {
            AudioSpec::Wav(PathBuf::from("voicemesh-demo-audio"))
        }
        other => other,
    };

    println!(
        "VoiceMesh demo: a coordinator, two nodes and a simulated MCU node on this machine ({}).",
        scope_text(scope)
    );
    if !voicemesh_coordinator::config::path(&state_dir).exists() {
        let cfg: voicemesh_coordinator::config::Config =
            voicemesh_coordinator::config::parse_json(DEMO_CONFIG.as_bytes())
                .map_err(|e| anyhow::anyhow!("the demo's configuration: {e}"))?;
        voicemesh_coordinator::config::save(&state_dir, &cfg)?;
    }
    // A JACK node hears a block one output latency after it renders it (two 256-frame periods
    // are 10.7 ms), so events need more lookahead than the 5 ms default or they arrive late.
    // (`Auto` is left here only when a JACK server answered.)
    let lookahead_ms = match audio {
        AudioSpec::Jack | AudioSpec::Auto => JACK_LOOKAHEAD_MS,
        _ => 5,
    };
    let mut cfg = coordinator_config(
        "demo-coordinator".into(),
        state_dir,
        a.http,
        a.osc,
        lookahead_ms,
        None,
        scope,
    );
    cfg.link = a.link || a.net.lan;
    let (coordinator, ptp_task) = start_coordinator(cfg, a.net.ptp(scope), &shutdown).await?;
    println!("dashboard: {}", coordinator.dashboard_url());

    let mut nodes = Vec::new();
    for name in NODES {
        let cfg = voicemesh_node::NodeConfig {
            audio: audio.clone(),
            ..node_config(name, name, &a.net, scope)
        };
        let node = voicemesh_node::start(cfg, shutdown.clone())
            .await
            .with_context(|| format!("starting {name}"))?;
        print_node(name, &node, scope);
        nodes.push(node);
    }

    let sim_cfg = SimConfig {
        id: MCU.into(),
        name: MCU.into(),
        dacs: 1,
        voices: 1,
        port: 0,
        scope,
        advertise: true,
    };
    let mcu = start_sim(sim_cfg, shutdown.clone())
        .await
        .context("starting the simulated MCU node")?;
    println!(
        "MCU node {MCU}: CV over udp://{} ({}); it plays each chord's root (MIDI channel {}) as \
         1 V/oct pitch on CV 0, gate on CV 1, velocity on CV 2 (12-bit virtual DAC, 0–5 V)",
        mcu.local_addr,
        scope_text(scope),
        CV_CHANNEL + 1
    );

    let played = play(&coordinator, &mcu, &shutdown, deadline).await;
    shutdown.cancel();
    let mut first_err = played.err();
    if let Err(e) = mcu.join().await {
        first_err.get_or_insert(e.into());
    }
    for node in nodes {
        if let Err(e) = node.wait().await {
            first_err.get_or_insert(e.into());
        }
    }
    if let Err(e) = coordinator.wait().await {
        first_err.get_or_insert(e.into());
    }
    let _ = ptp_task.await;
    match first_err {
        Some(e) => Err(e),
        None => {
            if let AudioSpec::Wav(dir) = &audio {
                println!("audio written to {}/", dir.display());
            }
            println!("demo finished");
            Ok(())
        }
    }
}

/// Waits for both nodes and the MCU node, then plays the phrase until the deadline or shutdown.
async fn play(
    coordinator: &voicemesh_coordinator::RunningCoordinator,
    mcu: &SimHandle,
    shutdown: &CancellationToken,
    deadline: Option<Instant>,
) -> Result<()> {
    let members = NODES.len() + 1;
    println!(
        "waiting for {} nodes and the MCU node to join over mDNS…",
        NODES.len()
    );
    let joined = Instant::now();
    loop {
        let online = coordinator
            .snapshot()
            .nodes
            .iter()
            .filter(|n| n.online)
            .count();
        if online >= members {
            println!(
                "{online} nodes online after {} ms",
                joined.elapsed().as_millis()
            );
            break;
        }
        if joined.elapsed() > Duration::from_secs(15) {
            bail!("only {online} of {members} nodes joined within 15 s (is mDNS blocked?)");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }

    let sock = UdpSocket::bind((coordinator.osc_addr().ip(), 0))
        .await
        .context("OSC socket")?;
    let target = coordinator.osc_addr();
    let chord_len = CHORD_ON + CHORD_GAP;
    let mut rounds = 0usize;
    'outer: loop {
        for chord in PHRASE {
            if shutdown.is_cancelled() {
                break 'outer;
            }
            if let Some(d) = deadline {
                // Only start a chord that can finish before the deadline.
                if Instant::now() + chord_len + Duration::from_millis(100) > d {
                    break 'outer;
                }
            }
            let root = chord[0] - 12;
            println!("chord {}", chord.map(note_name).join(" "));
            send_chord(&sock, target, &chord, root, 100).await?;
            tokio::select! {
                _ = shutdown.cancelled() => { send_chord(&sock, target, &chord, root, 0).await?; break 'outer; }
                _ = tokio::time::sleep(CV_LOOK) => {}
            }
            print_cv(mcu, root);
            tokio::select! {
                _ = shutdown.cancelled() => { send_chord(&sock, target, &chord, root, 0).await?; break 'outer; }
                _ = tokio::time::sleep(CHORD_ON - CV_LOOK) => {}
            }
            send_chord(&sock, target, &chord, root, 0).await?;
            tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                _ = tokio::time::sleep(CHORD_GAP) => {}
            }
        }
        rounds += 1;
        if deadline.is_none() && rounds == 1 {
            println!("phrase played; repeating until Ctrl-C");
        }
    }
    if let Some(d) = deadline {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep_until(d.into()) => {}
        }
    }
    Ok(())
}

/// When the MCU node's DAC codes are shown after a chord starts.
const CV_LOOK: Duration = Duration::from_millis(100);

/// One line: the root the MCU node plays and the codes its virtual DAC holds.
fn print_cv(mcu: &SimHandle, root: u8) {
    let codes = mcu.snapshot().codes;
    let code = |ch: usize| codes.get(ch).copied().unwrap_or(0);
    let volts = f64::from(voicemesh_protocol::cv::pitch_microvolts(root, 36, 0, 200)) / 1e6;
    println!(
        "  CV {MCU}: root {} = {volts:.3} V → pitch DAC code {}, gate code {}, velocity code {}",
        note_name(root),
        code(0),
        code(1),
        code(2)
    );
}

/// Sends all notes of a chord (MIDI channel 0) and its root (channel 1, for the MCU node) in
/// one OSC bundle, so the coordinator stamps them together.
async fn send_chord(
    sock: &UdpSocket,
    target: std::net::SocketAddr,
    chord: &[u8],
    root: u8,
    velocity: i32,
) -> Result<()> {
    let notes = chord.iter().map(|&n| (n.into(), velocity, 0));
    let bytes = crate::bench_sync::note_bundle_on(notes.chain([(
        root.into(),
        velocity,
        CV_CHANNEL.into(),
    )]))?;
    sock.send_to(&bytes, target)
        .await
        .with_context(|| format!("sending OSC to {target}"))?;
    Ok(())
}

fn note_name(n: u8) -> String {
    const NAMES: [&str; 12] = [
        "C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B",
    ];
    format!("{}{}", NAMES[n as usize % 12], n as i32 / 12 - 1)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chords_are_close_voiced() {
        // The WAV analysis of the demo test relies on every chord spanning less than an octave,
        // so no overtone of a chord tone lands on another chord tone.
        for c in PHRASE {
            assert!(c.iter().max().unwrap() - c.iter().min().unwrap() < 12);
        }
        assert_eq!(note_name(60), "C4");
        assert_eq!(note_name(57), "A3");
    }
}
