//! `voicemesh bench input`: input latency inside the coordinator, from a datagram received to
//! the VoiceOn it causes written to the node's session, for RTP-MIDI and for OSC.
//!
//! One process runs a coordinator (HTTP, OSC and RTP-MIDI on free loopback ports, 5 ms
//! lookahead) and a node (`--audio null`) connected to it by address. A plain-socket RTP-MIDI
//! initiator built from `rtpmidi::wire` joins the coordinator's session; then note-on /
//! note-off pairs go over RTP-MIDI and OSC (`/voicemesh/note`) interleaved, one datagram every
//! 500 µs. The figures are the
//! coordinator's own instrumentation, the one `/api/cluster` serves as
//! `latency.rtpmidi_to_session_us` and `latency.osc_to_session_us`: the time between the
//! receiving task's `recv` returning and the session task's `write_all` of the VoiceOn frame.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio_util::sync::CancellationToken;
use voicemesh_coordinator::rtpmidi::RtpMidiConfig;
use voicemesh_coordinator::rtpmidi::wire::{self, Control, Exchange};
use voicemesh_coordinator::{CoordinatorConfig, LatencySummary, RunningCoordinator};
use voicemesh_node::AudioSpec;
use voicemesh_node::clock::ClusterClock;

#[derive(Debug, Args)]
pub struct BenchInputArgs {
    /// Note-on + note-off pairs sent per input (at most 2000: the coordinator keeps the last
    /// 4096 samples).
    #[arg(long, value_name = "N", default_value_t = 2000)]
    notes: u32,
}

/// Spacing of the datagrams, so each is handled alone (a burst would measure queueing).
const GAP: Duration = Duration::from_micros(500);

pub async fn run(a: BenchInputArgs) -> Result<()> {
    if !(1..=2000).contains(&a.notes) {
        bail!("--notes must be 1 to 2000");
    }
    let state = std::env::temp_dir().join(format!("voicemesh-bench-input-{}", std::process::id()));
    let shutdown = CancellationToken::new();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let cfg = CoordinatorConfig {
        id: "bench-coordinator".into(),
        http: loopback,
        osc: loopback,
        rtpmidi: Some(RtpMidiConfig {
            control: loopback,
            ..RtpMidiConfig::new(loopback.ip())
        }),
        ..CoordinatorConfig::new(state.clone())
    };
    let clock = Arc::new(ClusterClock::new());
    let coordinator = voicemesh_coordinator::start(cfg, clock, shutdown.clone())
        .await
        .context("starting the coordinator")?;
    let node = voicemesh_node::start(
        voicemesh_node::NodeConfig {
            audio: AudioSpec::Null,
            ..voicemesh_node::NodeConfig::new("bench-node")
        },
        shutdown.clone(),
    )
    .await
    .context("starting the node")?;
    coordinator.add_node_addr(node.quic_addr());
    let result = measure(&coordinator, a.notes).await;
    shutdown.cancel();
    let _ = node.wait().await;
    let _ = coordinator.wait().await;
    let _ = std::fs::remove_dir_all(&state);
    let (rtp, osc) = result?;
    println!("input → VoiceOn written to the node's session, inside the coordinator (µs):");
    println!("  input     count    p50    p99    max");
    for (name, s) in [("rtp-midi", rtp), ("osc", osc)] {
        println!(
            "  {name:<8} {:>6} {:>6} {:>6} {:>6}",
            s.count, s.p50, s.p99, s.max
        );
    }
    println!(
        "rtpmidi_p50_us={} rtpmidi_p99_us={} osc_p50_us={} osc_p99_us={}",
        rtp.p50, rtp.p99, osc.p50, osc.p99
    );
    Ok(())
}

async fn measure(c: &RunningCoordinator, notes: u32) -> Result<(LatencySummary, LatencySummary)> {
    let t0 = Instant::now();
    while !c.snapshot().nodes.iter().any(|n| n.online) {
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("the node did not join within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ctrl = c
        .rtpmidi()
        .context("RTP-MIDI is not running")?
        .control_addr();
    let osc = c.osc_addr();
    tokio::task::spawn_blocking(move || send_both(ctrl, osc, notes))
        .await
        .context("the sender")??;
    let rtp = wait_count(c, notes, |s| s.latency.rtpmidi_to_session_us).await?;
    let osc = wait_count(c, notes, |s| s.latency.osc_to_session_us).await?;
    Ok((rtp, osc))
}

async fn wait_count(
    c: &RunningCoordinator,
    notes: u32,
    pick: impl Fn(&voicemesh_coordinator::ClusterSnapshot) -> LatencySummary,
) -> Result<LatencySummary> {
    let t0 = Instant::now();
    loop {
        let s = pick(&c.snapshot());
        if s.count >= u64::from(notes) {
            return Ok(s);
        }
        if t0.elapsed() > Duration::from_secs(5) {
            bail!("only {} of {notes} VoiceOns measured", s.count);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Joins the coordinator's RTP-MIDI session as initiator (IN on both ports), then sends the
/// note pairs over both inputs, interleaved (an RTP-MIDI note-on, an OSC note-on, an RTP-MIDI
/// note-off, an OSC note-off, …) so both see the same machine conditions. One command per RTP
/// packet; OSC `/voicemesh/note iii` encoded by hand.
fn send_both(ctrl: SocketAddr, osc: SocketAddr, notes: u32) -> Result<()> {
    let data_addr = SocketAddr::new(ctrl.ip(), ctrl.port() + 1);
    let c = UdpSocket::bind("127.0.0.1:0")?;
    let d = UdpSocket::bind("127.0.0.1:0")?;
    let o = UdpSocket::bind("127.0.0.1:0")?;
    for s in [&c, &d] {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
    }
    let ssrc = 0xB0B0_0001;
    let inv = Control::Invitation(Exchange {
        version: 2,
        token: 0x1234_5678,
        ssrc,
        name: Some("bench".into()),
    })
    .to_vec();
    let mut buf = [0u8; 512];
    for (sock, to) in [(&c, ctrl), (&d, data_addr)] {
        sock.send_to(&inv, to)?;
        let n = sock.recv(&mut buf).context("no answer to the invitation")?;
        if !matches!(Control::parse(&buf[..n]), Ok(Control::Accepted(_))) {
            bail!("the coordinator did not accept the invitation");
        }
    }
    let start = Instant::now();
    let mut seq: u16 = 1;
    let mut pkt = Vec::with_capacity(32);
    for i in 0..notes {
        // Two different notes, so the inputs never release each other's voices.
        let note = 36 + (i % 24) as u8;
        for vel in [100u8, 0] {
            let ts = (start.elapsed().as_micros() / 100) as u32;
            pkt.clear();
            wire::emit_rtp(&mut pkt, seq, ts, ssrc, &[0x90, note, vel]);
            seq = seq.wrapping_add(1);
            d.send_to(&pkt, data_addr)?;
            std::thread::sleep(GAP);
            let mut v = Vec::with_capacity(40);
            v.extend_from_slice(b"/voicemesh/note\0,iii\0\0\0\0");
            for x in [i32::from(note) + 24, i32::from(vel), 0] {
                v.extend_from_slice(&x.to_be_bytes());
            }
            o.send_to(&v, osc)?;
            std::thread::sleep(GAP);
        }
    }
    Ok(())
}
