//! A node's tempo-synced LFO lands on Link's beats: the Link session timeline, carried to a
//! cluster `Timeline` by the coordinator's mapping (`link::glue::cluster_timeline`), drives the
//! node engine's tremolo LFO (`lfo_sync_beats = 1`); the beat instants read back from the
//! rendered audio are compared with the beat instants of the Link peer, in Link host time.
//! (That the coordinator's Link timeline agrees with a real Link peer is shown by
//! tests/tests/link_interop.rs.)

use std::sync::Arc;

use voicemesh_coordinator::link::LinkPeer;
use voicemesh_coordinator::link::glue::{HostMap, cluster_timeline};
use voicemesh_node::engine::{Control, Engine, EngineCounters, EngineEvent, EventKind};
use voicemesh_protocol::ClusterTime;

const SR: u32 = 48_000;
const BLOCK: usize = 256;

/// Renders a held square-wave note whose volume the LFO sweeps fully once per beat, starting
/// at cluster time `start`, for `secs`; returns the samples.
fn render(tl: voicemesh_protocol::Timeline, start: ClusterTime, secs: f64) -> Vec<f32> {
    let counters = Arc::new(EngineCounters::default());
    let (mut engine, mut tx) = Engine::with_engine("subtractive", 1, SR, counters).unwrap();
    assert!(tx.send(Control::Timeline(tl)));
    let lease = start.add_nanos(60_000_000_000);
    let ev = |kind| {
        Control::Event(EngineEvent {
            voice: 0,
            at: start,
            kind,
        })
    };
    // A 92.5 Hz square wave (|x| is its amplitude between edges); full-depth tremolo locked
    // to one cycle per beat; no filter envelope.
    assert!(tx.send(ev(EventKind::On {
        note: 42,
        velocity: 127,
        lease_until: lease
    })));
    for (param, value) in [(2u16, 1.0f32), (23, 1.0), (26, 1.0), (14, 0.0), (27, 0.0)] {
        assert!(tx.send(ev(EventKind::Param { param, value })));
    }
    let frames = (secs * f64::from(SR)) as usize;
    let mut out = vec![0f32; frames];
    for (k, chunk) in out.chunks_mut(BLOCK).enumerate() {
        let at = start.add_nanos((k * BLOCK) as i64 * 1_000_000_000 / i64::from(SR));
        engine.render(at, chunk);
    }
    out
}

/// Frames where the tremolo envelope falls through half its peak: with the LFO at phase 0
/// there (`gain = 1 − (0.5 + 0.5 sin 2πφ)`), these are the beats.
fn falling_half_crossings(x: &[f32]) -> Vec<f64> {
    // Envelope: the median |x| over 2 ms windows centred on each hop: a square wave is on its
    // plateaus but for a few samples per edge, and the median of a monotonic ramp is its
    // value at the window's centre, so the estimate has no lag.
    let w = (SR / 500) as usize;
    let hop = 16;
    let env: Vec<(f64, f32)> = (0..x.len().saturating_sub(w))
        .step_by(hop)
        .map(|i| {
            let mut v: Vec<f32> = x[i..i + w].iter().map(|s| s.abs()).collect();
            v.sort_by(f32::total_cmp);
            ((i + w / 2) as f64, v[v.len() / 2])
        })
        .collect();
    let peak = env.iter().map(|e| e.1).fold(0f32, f32::max);
    let half = peak / 2.0;
    env.windows(2)
        .filter(|p| p[0].1 >= half && p[1].1 < half)
        .map(|p| {
            let (f0, a) = p[0];
            let (f1, b) = p[1];
            f0 + (f1 - f0) * f64::from((a - half) / (a - b))
        })
        .collect()
}

#[test]
fn tempo_synced_lfo_lands_on_link_beats_within_1_ms() {
    for (bpm, change) in [(120.0, None), (97.3, Some(133.7)), (171.0, Some(64.0))] {
        // A Link peer (host µs) with an odd beat origin and, maybe, a tempo change.
        let h0 = 7_000_000_000i64;
        let mut peer = LinkPeer::new(h0, 11, bpm, 3_217_001);
        if let Some(b) = change {
            peer.set_tempo(h0 + 1_234_567, b);
        }
        let map = HostMap {
            offset_ns: 1_795_000_123_456_789_000,
        };
        let tl = cluster_timeline(&peer, &map);
        let start_host = h0 + 2_000_000;
        let start = map.to_cluster(start_host);
        let x = render(tl, start, 6.0);
        let crossings = falling_half_crossings(&x);
        // Skip the first second (attack, parameter smoothing).
        let beats: Vec<f64> = crossings
            .into_iter()
            .filter(|&f| f > f64::from(SR))
            .collect();
        let per_beat = 60.0 / peer.timeline().bpm();
        assert!(
            beats.len() as f64 >= 4.0 / per_beat,
            "{bpm}: {} beats found",
            beats.len()
        );
        let mut worst: f64 = 0.0;
        for f in &beats {
            // The frame's host time, and the host time of the nearest Link beat.
            let host = start_host as f64 + f * 1e6 / f64::from(SR);
            let b = peer.beats_at_host(host.round() as i64) as f64 / 1e6;
            let k = b.round() as i64 * 1_000_000;
            let link_host = peer.host(peer.timeline().time_at(k)) as f64;
            let err_ms = (host - link_host) / 1000.0;
            worst = worst.max(err_ms.abs());
        }
        println!(
            "{bpm} BPM → {:.3}: {} beats, worst {worst:.3} ms",
            peer.timeline().bpm(),
            beats.len()
        );
        assert!(worst < 1.0, "{bpm}: beat off by {worst:.3} ms");
    }
}
