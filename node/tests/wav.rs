//! The `wav:DIR` backend renders in real time, paced by the cluster clock, and leaves a WAV
//! file whose frames line up with cluster time as its JSON sidecar says.

mod common;

use common::TempDir;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use voicemesh_node::audio::paced::{WavSidecar, grid_time};
use voicemesh_node::audio::{self, AudioParams, AudioSpec};
use voicemesh_node::clock::ClusterClock;
use voicemesh_node::engine::{Control, EngineCounters, EngineEvent, EventKind};
use voicemesh_node::error::NodeError;
use voicemesh_protocol::ClusterTime;

fn params(id: &str, clock: Arc<ClusterClock>, counters: Arc<EngineCounters>) -> AudioParams {
    AudioParams {
        id: id.to_string(),
        name: format!("{id} name"),
        voices: 8,
        sample_rate: 48_000,
        clock,
        counters,
    }
}

/// Sleeps until the cluster clock has reached `t` (the backend under test is paced by real
/// time, so real time has to pass).
async fn until_cluster(clock: &ClusterClock, t: ClusterTime) {
    let d = t.nanos_since(clock.now());
    if d > 0 {
        tokio::time::sleep(Duration::from_nanos(d as u64)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wav_backend_records_a_note_on_its_frame() {
    let dir = TempDir::new("vm-wav");
    let out_dir = dir.0.join("nested/out"); // created by the backend
    let clock = Arc::new(ClusterClock::new());
    let counters = Arc::new(EngineCounters::default());
    let stop = CancellationToken::new();
    let mut a = audio::start(
        &AudioSpec::Wav(out_dir.clone()),
        params("wavnode", clock.clone(), counters.clone()),
        stop.clone(),
    )
    .unwrap();
    let wav_path = out_dir.join("wavnode.wav");
    assert_eq!(a.description, format!("WAV file {}", wav_path.display()));

    let at = clock.now().add_nanos(40_000_000);
    let off = at.add_nanos(100_000_000);
    a.sender.send(Control::Event(EngineEvent {
        voice: 5,
        at,
        kind: EventKind::On {
            note: 69,
            velocity: 127,
            lease_until: at.add_nanos(10_000_000_000),
        },
    }));
    a.sender.send(Control::Event(EngineEvent {
        voice: 5,
        at: off,
        kind: EventKind::Off,
    }));
    // Past the 60 ms release, plus two blocks.
    until_cluster(&clock, off.add_nanos(80_000_000)).await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), &mut a.task)
        .await
        .expect("backend did not stop")
        .unwrap()
        .unwrap();

    let json = std::fs::read_to_string(out_dir.join("wavnode.json")).unwrap();
    let side: WavSidecar = serde_json::from_str(&json).unwrap();
    assert_eq!(side.id, "wavnode");
    assert_eq!(side.name, "wavnode name");
    assert_eq!(side.sample_rate, 48_000);
    assert_eq!(side.late_events, 0);
    assert_eq!(side.onsets.len(), 1, "{json}");
    let o = &side.onsets[0];
    assert_eq!((o.voice, o.note, o.velocity, o.at_ns), (5, 69, 127, at.0));
    // The onset is on the frame whose cluster time is nearest `at`.
    let dt = at.0 - side.first_frame_cluster_ns;
    let expect_frame = (u128::from(dt) * 48_000 + 500_000_000) / 1_000_000_000;
    assert_eq!(o.frame as u128, expect_frame);
    // Frames sit on the cluster's sample grid: the first frame is grid frame `g`
    // (`first_frame_cluster_ns = round(g·1e9/sr)`), the onset is grid frame `g + frame`, its time
    // `round((g + frame)·1e9/sr)` — one rounding, so it may differ by 1 ns from
    // `first_frame_cluster_ns + round(frame·1e9/sr)`.
    let g = (u128::from(side.first_frame_cluster_ns) * 48_000 / 1_000_000_000) as u64;
    let g = (g..g + 2)
        .find(|&g| grid_time(g, 48_000) == side.first_frame_cluster_ns)
        .expect("the first frame is on the sample grid");
    assert_eq!(o.frame_cluster_ns, grid_time(g + o.frame, 48_000));
    assert!(
        o.frame_cluster_ns.abs_diff(at.0) <= 10_417,
        "within half a frame"
    );

    let mut r = hound::WavReader::open(&wav_path).unwrap();
    let spec = r.spec();
    assert_eq!(spec.channels, 1);
    assert_eq!(spec.sample_rate, 48_000);
    assert_eq!(spec.bits_per_sample, 32);
    assert_eq!(spec.sample_format, hound::SampleFormat::Float);
    let samples: Vec<f32> = r.samples::<f32>().map(|s| s.unwrap()).collect();
    assert_eq!(samples.len() as u64, side.frames);
    let f = o.frame as usize;
    assert!(
        samples[..f].iter().all(|s| *s == 0.0),
        "silence before the onset"
    );
    assert!(samples[f] != 0.0, "sound on the onset frame");
    // A4 at 440 Hz: about 109 samples per period; count falling zero crossings over 0.05 s.
    let seg = &samples[f + 500..f + 500 + 2400];
    // The saw rises slowly and falls through zero only at its wrap.
    let wraps = seg.windows(2).filter(|w| w[0] > 0.0 && w[1] <= 0.0).count();
    assert!(
        (21..=23).contains(&wraps),
        "{wraps} saw wraps in 50 ms (expect 22)"
    );
    // Released 100 ms after the onset: silent again once the 60 ms release is over.
    let end = f + 4_800 + 2_880 + 10;
    assert!(
        samples[end..].iter().all(|s| *s == 0.0),
        "silent after release"
    );
    assert!(side.frames as usize > end);
}

#[tokio::test]
async fn unwritable_wav_dir_is_named_in_the_error() {
    let clock = Arc::new(ClusterClock::new());
    let e = audio::start(
        &AudioSpec::Wav("/proc/1/voicemesh".into()),
        params("x", clock, Arc::new(EngineCounters::default())),
        CancellationToken::new(),
    )
    .unwrap_err();
    assert!(matches!(e, NodeError::WavDir { .. }), "{e}");
    assert!(e.to_string().contains("/proc/1/voicemesh"), "{e}");
}
