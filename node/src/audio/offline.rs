//! Offline rendering: a list of timestamped events into a WAV file and its JSON sidecar, as
//! fast as the CPU allows, with no clock at all.
//!
//! This is the "faster than real time, for tests" half of `wav:DIR`. The live `wav:DIR`
//! backend ([`super::paced`]) must follow the cluster clock, because its events arrive over the
//! network while it runs; an offline render knows all its events up front, so it places frame
//! `n` at `first_frame_cluster_ns + n·1e9/sr` (the same model and the same file format as the
//! live recorder) and renders block after block without waiting. Events are fed to the engine
//! through its ordinary queue a block ahead of their time, so the render path is exactly the
//! one a live node runs.

use super::paced::{BLOCK_FRAMES, SidecarOnset, WavSidecar, frame_time, open_wav};
use crate::engine::{Control, Engine, EngineCounters, EngineEvent};
use crate::error::NodeError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use voicemesh_protocol::ClusterTime;

/// Most events handed to the engine's queue per block (below its capacity, so a burst of
/// simultaneous events spreads over a few queue drains instead of being dropped).
const FEED_PER_BLOCK: usize = 512;

/// What to render.
#[derive(Debug, Clone)]
pub struct OfflineRender {
    /// Engine name; one of [`crate::ENGINES`] (the engine registry).
    pub engine: String,
    /// File stem and sidecar id (`DIR/<id>.wav`, `DIR/<id>.json`).
    pub id: String,
    /// Voice pool size.
    pub voices: u16,
    /// Sample rate, Hz.
    pub sample_rate: u32,
    /// Cluster time of the file's first frame, ns.
    pub first_frame_cluster_ns: u64,
    /// Length of the file.
    pub duration: Duration,
    /// The events, in any order; stable-sorted by `at` before rendering.
    pub events: Vec<EngineEvent>,
}

/// What an offline render produced.
#[derive(Debug, Clone)]
pub struct OfflineOutput {
    /// The WAV file (mono, 32-bit float).
    pub wav_path: PathBuf,
    /// The JSON sidecar.
    pub json_path: PathBuf,
    /// The sidecar's content.
    pub sidecar: WavSidecar,
    /// Events the engine dropped (queue full, voice outside the pool).
    pub dropped_events: u32,
    /// Wall-clock time the render took.
    pub elapsed: Duration,
}

/// Renders `job` into `dir` (created if missing) without waiting for any clock.
pub fn render_offline(job: &OfflineRender, dir: &Path) -> Result<OfflineOutput, NodeError> {
    if job.voices == 0 || job.voices > crate::MAX_VOICES {
        return Err(NodeError::Config(format!(
            "voices = {} (must be 1–{})",
            job.voices,
            crate::MAX_VOICES
        )));
    }
    if !(8_000..=384_000).contains(&job.sample_rate) {
        return Err(NodeError::Config(format!(
            "sample rate {} Hz (must be 8000–384000)",
            job.sample_rate
        )));
    }
    let started = Instant::now();
    let sr = job.sample_rate;
    let first = job.first_frame_cluster_ns;
    let total = (job.duration.as_nanos() * u128::from(sr) / 1_000_000_000) as u64;
    let counters = Arc::new(EngineCounters::default());
    let (mut engine, mut sender) =
        Engine::with_engine(&job.engine, job.voices, sr, counters.clone())
            .map_err(|e| NodeError::Config(e.to_string()))?;
    let mut out = open_wav(dir, &job.id, sr)?;
    let mut onsets = engine.record_onsets();

    let mut events = job.events.clone();
    events.sort_by_key(|e| e.at);
    let mut next = 0usize;
    let mut buf = [0.0f32; BLOCK_FRAMES];
    let mut collected = Vec::new();
    let mut frame = 0u64;
    let wav_err = |e: hound::Error| NodeError::WavWrite {
        path: out_path(dir, &job.id),
        detail: e.to_string(),
    };
    while frame < total {
        let n = (total - frame).min(BLOCK_FRAMES as u64) as usize;
        // Everything due before the end of the *next* block goes in now: the engine keeps
        // early events pending until their frame.
        let horizon = ClusterTime(frame_time(first, frame + 2 * BLOCK_FRAMES as u64, sr));
        let mut fed = 0;
        while next < events.len() && events[next].at < horizon && fed < FEED_PER_BLOCK {
            if !sender.send(Control::Event(events[next])) {
                break;
            }
            next += 1;
            fed += 1;
        }
        let start = ClusterTime(frame_time(first, frame, sr));
        engine.render(start, &mut buf[..n]);
        for s in &buf[..n] {
            out.wav.write_sample(*s).map_err(wav_err)?;
        }
        while let Ok(o) = onsets.pop() {
            let mut o = SidecarOnset::from(o);
            o.frame_cluster_ns = frame_time(first, o.frame, sr);
            collected.push(o);
        }
        frame += n as u64;
    }
    let wav_path = out.wav_path.clone();
    let json_path = out.json_path.clone();
    out.wav.finalize().map_err(wav_err)?;
    let sidecar = WavSidecar {
        id: job.id.clone(),
        name: format!("offline render ({})", job.engine),
        sample_rate: sr,
        first_frame_cluster_ns: first,
        frames: frame,
        late_events: counters.late(),
        onsets: collected,
    };
    super::paced::write_json_atomically(&json_path, &sidecar)?;
    Ok(OfflineOutput {
        wav_path,
        json_path,
        sidecar,
        dropped_events: counters.dropped(),
        elapsed: started.elapsed(),
    })
}

fn out_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.wav"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EventKind;

    fn on(voice: u16, note: u8, at: u64) -> EngineEvent {
        EngineEvent {
            voice,
            at: ClusterTime(at),
            kind: EventKind::On {
                note,
                velocity: 100,
                lease_until: ClusterTime(u64::MAX / 2),
            },
        }
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "voicemesh-offline-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Ten seconds of audio render in far less than ten seconds, events land on the frame
    /// their `at` maps to, and the file is silent before the first onset and not after it.
    #[test]
    fn renders_faster_than_real_time_on_exact_frames() {
        for engine in crate::ENGINES {
            renders_faster_than_real_time_on_exact_frames_with(engine);
        }
    }

    fn renders_faster_than_real_time_on_exact_frames_with(engine: &str) {
        let first = 1_000_000_000_000u64;
        let sr = 48_000;
        let ats = [
            first + 100_000_000,
            first + 2_345_678_901,
            first + 7_000_000_003,
        ];
        let job = OfflineRender {
            engine: engine.to_string(),
            id: format!("off-{engine}"),
            voices: 8,
            sample_rate: sr,
            first_frame_cluster_ns: first,
            duration: Duration::from_secs(10),
            events: ats
                .iter()
                .enumerate()
                .rev() // any order in, sorted inside
                .map(|(i, at)| on(i as u16, 60 + i as u8, *at))
                .collect(),
        };
        let dir = tmpdir(engine);
        let out = render_offline(&job, &dir).unwrap();
        assert!(
            out.elapsed < Duration::from_secs(5),
            "{engine}: 10 s took {:?}: not faster than real time",
            out.elapsed
        );
        assert_eq!(out.sidecar.frames, 480_000);
        assert_eq!(out.sidecar.late_events, 0);
        assert_eq!(out.dropped_events, 0);
        assert_eq!(out.sidecar.onsets.len(), 3);
        for (o, at) in out.sidecar.onsets.iter().zip(ats) {
            let want_round =
                (((at - first) as u128 * u128::from(sr) + 500_000_000) / 1_000_000_000) as u64;
            assert_eq!(o.frame, want_round, "{engine}: onset at {at}");
        }
        let samples: Vec<f32> = hound::WavReader::open(&out.wav_path)
            .unwrap()
            .into_samples::<f32>()
            .map(Result::unwrap)
            .collect();
        assert_eq!(samples.len(), 480_000);
        let onset = out.sidecar.onsets[0].frame as usize;
        assert!(
            samples[..onset].iter().all(|s| *s == 0.0),
            "sound before the first onset"
        );
        let peak = samples[onset..onset + 4800]
            .iter()
            .fold(0.0f32, |m, s| m.max(s.abs()));
        assert!(
            peak > 0.01,
            "{engine}: silent after the onset (peak {peak})"
        );
        let side: WavSidecar =
            serde_json::from_slice(&std::fs::read(&out.json_path).unwrap()).unwrap();
        assert_eq!(side, out.sidecar);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_jobs_are_clear_errors() {
        let mut job = OfflineRender {
            engine: "no-such-engine".into(),
            id: "x".into(),
            voices: 8,
            sample_rate: 48_000,
            first_frame_cluster_ns: 0,
            duration: Duration::from_millis(10),
            events: Vec::new(),
        };
        let dir = tmpdir("bad");
        let e = render_offline(&job, &dir).unwrap_err().to_string();
        assert!(e.contains("unknown engine \"no-such-engine\""), "{e}");
        assert!(!dir.join("x.wav").exists(), "a WAV file for a bad job");
        job.engine = crate::ENGINES[0].to_string();
        job.sample_rate = 7;
        let e = render_offline(&job, &dir).unwrap_err().to_string();
        assert!(e.contains("sample rate 7 Hz"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
