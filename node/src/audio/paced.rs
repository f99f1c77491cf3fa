//! The `wav:DIR` and `null` backends: a render thread paced by the cluster clock.
//!
//! The device these backends stand for is a *media clock locked to cluster time*, the way an
//! AES67/Dante interface derives its word clock from PTP: frame `N` of the cluster's sample
//! grid is heard at cluster time `round(N·1e9/sr)` on every node, so every paced node's frames
//! sit on the same grid and an event lands on the same grid frame everywhere
//! ([`grid_time`]). The stream starts at the first grid frame two blocks ahead of the clock.
//! The frame → cluster-time map is therefore exact and needs no filter (the
//! [`AudioClock`](crate::clock::audio::AudioClock) DLL is for free-running sound cards: JACK
//! and ALSA); the device emits grid frame `N` at the local instant the node's
//! [`ClusterClock`] reads `grid_time(N)`, which is what each onset's `emitted_mono_ns`
//! reports (on `CLOCK_MONOTONIC`, shared by every process on the machine, so a measurement
//! can compare nodes against the truth: a node whose clock is off emits off).
//!
//! The render thread asks for SCHED_FIFO, then renders [`BLOCK_FRAMES`]-frame blocks; block
//! `k` starts at stream frame `n = k·BLOCK_FRAMES` and is rendered when the cluster clock
//! reaches the block's *end*: a file has no output latency to hide, so waiting for the block
//! to have elapsed gives every event stamped inside it its full lookahead to arrive (rendering
//! at the block's start would make any event less than a block ahead late). Falling more than
//! a block behind (a stalled thread, a clock step) counts an xrun; the frame → time mapping
//! never changes.
//!
//! With a WAV sink the samples and onsets go through wait-free queues to a writer thread,
//! which writes `DIR/<id>.wav` (mono 32-bit float) and at shutdown finalizes it and writes
//! `DIR/<id>.json` atomically (temp file, fsync, rename).

use super::{AudioParams, RunningAudio};
use crate::clock::ClusterClock;
use crate::engine::{BlockTime, Engine, Onset};
use crate::error::NodeError;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use voicemesh_protocol::ClusterTime;

/// Frames per rendered block.
pub const BLOCK_FRAMES: usize = 256;
/// Longest single sleep, so shutdown and clock changes are noticed quickly.
const MAX_SLEEP_NS: u64 = 20_000_000;

/// The JSON sidecar of a WAV recording.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WavSidecar {
    /// Node id.
    pub id: String,
    /// Node name.
    pub name: String,
    /// Sample rate of the WAV file.
    pub sample_rate: u32,
    /// Cluster time of the file's first frame, ns.
    pub first_frame_cluster_ns: u64,
    /// Frames in the file.
    pub frames: u64,
    /// Late events counted by the engine.
    pub late_events: u32,
    /// Every voice start, in order.
    pub onsets: Vec<SidecarOnset>,
}

/// One onset in the [`WavSidecar`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SidecarOnset {
    /// Voice slot.
    pub voice: u16,
    /// MIDI note.
    pub note: u8,
    /// MIDI velocity.
    pub velocity: u8,
    /// The event's `at`, ns.
    pub at_ns: u64,
    /// Frame of the file on which the voice started.
    pub frame: u64,
    /// Cluster time of that frame, ns.
    pub frame_cluster_ns: u64,
}

impl From<Onset> for SidecarOnset {
    fn from(o: Onset) -> Self {
        SidecarOnset {
            voice: o.voice,
            note: o.note,
            velocity: o.velocity,
            at_ns: o.at_ns,
            frame: o.frame,
            frame_cluster_ns: o.frame_cluster_ns,
        }
    }
}

/// Cluster time of frame `n` of a stream whose frame 0 is at `first` ns.
pub fn frame_time(first: u64, n: u64, sample_rate: u32) -> u64 {
    let sr = u128::from(sample_rate.max(1));
    first + ((u128::from(n) * 1_000_000_000 + sr / 2) / sr) as u64
}

/// Cluster time of frame `n` of the cluster's sample grid at `sample_rate`: `round(n·1e9/sr)`.
pub fn grid_time(n: u64, sample_rate: u32) -> u64 {
    frame_time(0, n, sample_rate)
}

/// The first grid frame at or after cluster time `t`.
pub fn grid_frame_at_or_after(t: ClusterTime, sample_rate: u32) -> u64 {
    let sr = u128::from(sample_rate.max(1));
    let n = (u128::from(t.0) * sr).div_ceil(1_000_000_000) as u64;
    // `grid_time` rounds: step back while the previous frame is still at or after `t`.
    if n > 0 && grid_time(n - 1, sample_rate) >= t.0 {
        n - 1
    } else {
        n
    }
}

pub(crate) struct WavOut {
    pub(crate) wav: hound::WavWriter<std::io::BufWriter<std::fs::File>>,
    pub(crate) wav_path: PathBuf,
    pub(crate) json_path: PathBuf,
}

/// Starts the paced backend; with `dir` it records, without it discards.
pub fn start(
    dir: Option<PathBuf>,
    p: AudioParams,
    shutdown: CancellationToken,
) -> Result<RunningAudio, NodeError> {
    let sr = p.sample_rate;
    let wav = match &dir {
        Some(dir) => Some(open_wav(dir, &p.id, sr)?),
        None => None,
    };
    let description = match &wav {
        Some(w) => format!("WAV file {}", w.wav_path.display()),
        None => format!("null output (paced by the cluster clock, {sr} Hz)"),
    };

    let (mut engine, sender) = Engine::new(p.voices, sr, p.counters.clone());
    let onsets = engine.report_onsets();
    let rec = wav.map(|w| {
        let onsets = engine.record_onsets();
        let (samples_tx, samples_rx) = rtrb::RingBuffer::<f32>::new(sr as usize * 2);
        (w, onsets, samples_tx, samples_rx)
    });
    let clock = p.clock.clone();
    let first_frame = grid_frame_at_or_after(clock.now().add_nanos(2 * block_ns(sr) as i64), sr);

    let (realtime, task) =
        super::spawn_audio_thread(format!("vm-audio-{}", p.id), "audio thread", move || {
            match rec {
                None => {
                    render_loop(&mut engine, &clock, first_frame, &shutdown, |_, _| {});
                    Ok(())
                }
                Some((w, onsets, mut samples_tx, samples_rx)) => {
                    let finished = Arc::new(AtomicBool::new(false));
                    let f2 = finished.clone();
                    let meta = (
                        p.id.clone(),
                        p.name.clone(),
                        sr,
                        first_frame,
                        p.counters.clone(),
                    );
                    let writer = std::thread::Builder::new()
                        .name(format!("vm-wav-{}", p.id))
                        .spawn(move || write_loop(w, samples_rx, onsets, f2, meta));
                    match writer {
                        Err(e) => Err(NodeError::AudioThread(format!(
                            "cannot start the WAV writer thread: {e}"
                        ))),
                        Ok(writer) => {
                            let wt = writer.thread().clone();
                            let counters = p.counters.clone();
                            render_loop(&mut engine, &clock, first_frame, &shutdown, |block, _| {
                                for s in block {
                                    if samples_tx.push(*s).is_err() {
                                        // The writer fell two seconds behind: a gap.
                                        counters.xruns.fetch_add(1, Ordering::Relaxed);
                                        break;
                                    }
                                }
                                wt.unpark();
                            });
                            finished.store(true, Ordering::Release);
                            wt.unpark();
                            writer.join().unwrap_or_else(|_| {
                                Err(NodeError::AudioThread("the WAV writer panicked".into()))
                            })
                        }
                    }
                }
            }
        })?;
    Ok(RunningAudio {
        description,
        sample_rate: sr,
        sender,
        onsets,
        realtime,
        task,
    })
}

fn block_ns(sr: u32) -> u64 {
    BLOCK_FRAMES as u64 * 1_000_000_000 / u64::from(sr.max(1))
}

pub(crate) fn open_wav(dir: &Path, id: &str, sr: u32) -> Result<WavOut, NodeError> {
    let dir_err = |source| NodeError::WavDir {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(dir_err)?;
    let wav_path = dir.join(format!("{id}.wav"));
    let json_path = dir.join(format!("{id}.json"));
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: sr,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    let wav = hound::WavWriter::create(&wav_path, spec).map_err(|e| match e {
        hound::Error::IoError(io) => dir_err(io),
        other => NodeError::WavWrite {
            path: wav_path.clone(),
            detail: other.to_string(),
        },
    })?;
    Ok(WavOut {
        wav,
        wav_path,
        json_path,
    })
}

/// Sleeps until the cluster clock reaches `t` (or shutdown); returns false on shutdown.
fn wait_until(clock: &ClusterClock, t: ClusterTime, shutdown: &CancellationToken) -> bool {
    loop {
        if shutdown.is_cancelled() {
            return false;
        }
        let model = clock.model();
        let now_local = crate::clock::local_now_ns();
        let target = model.to_local(t);
        if target <= now_local {
            return true;
        }
        let wake = target.min(now_local + MAX_SLEEP_NS);
        let ts = libc::timespec {
            tv_sec: (wake / 1_000_000_000) as libc::time_t,
            tv_nsec: (wake % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `ts` is a valid timespec; the remaining-time pointer may be null with
        // TIMER_ABSTIME. An EINTR just loops.
        unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_REALTIME,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        };
    }
}

/// The timing of the paced block starting at grid frame `frame`: its grid time, and the
/// `CLOCK_MONOTONIC` instant the clock's current model reads it (when the media clock emits it).
pub fn block_time(clock: &ClusterClock, frame: u64, sample_rate: u32) -> BlockTime {
    let model = clock.model();
    let cluster = ClusterTime(grid_time(frame, sample_rate));
    let local = model.to_local(cluster);
    BlockTime {
        cluster,
        mono_ns: crate::clock::audio::mono_of_realtime(local),
        frame_ns: 1e9 / f64::from(sample_rate.max(1)) / (1.0 + model.rate),
    }
}

fn render_loop(
    engine: &mut Engine,
    clock: &ClusterClock,
    first_frame: u64,
    shutdown: &CancellationToken,
    mut sink: impl FnMut(&[f32], ClusterTime),
) {
    let sr = engine.sample_rate();
    let bns = block_ns(sr) as i64;
    let mut buf = [0.0f32; BLOCK_FRAMES];
    let mut frame = first_frame;
    let mut behind = false;
    loop {
        let start = ClusterTime(grid_time(frame, sr));
        let end = ClusterTime(grid_time(frame + BLOCK_FRAMES as u64, sr));
        if !wait_until(clock, end, shutdown) {
            break;
        }
        let lag = clock.now().nanos_since(end);
        if lag > bns {
            if !behind {
                engine.counters().xruns.fetch_add(1, Ordering::Relaxed);
            }
            behind = true;
        } else {
            behind = false;
        }
        let entered = super::monotonic_ns();
        engine.render_block(block_time(clock, frame, sr), &mut buf);
        super::record_block_load(engine.counters(), entered, BLOCK_FRAMES, sr);
        sink(&buf, start);
        frame += BLOCK_FRAMES as u64;
    }
}

type Meta = (String, String, u32, u64, Arc<crate::engine::EngineCounters>);

fn write_loop(
    mut w: WavOut,
    mut samples: rtrb::Consumer<f32>,
    mut onsets: rtrb::Consumer<Onset>,
    finished: Arc<AtomicBool>,
    (id, name, sample_rate, first_frame, counters): Meta,
) -> Result<(), NodeError> {
    let wav_err = |path: &Path, e: hound::Error| NodeError::WavWrite {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let mut frames = 0u64;
    let mut collected: Vec<SidecarOnset> = Vec::new();
    let mut failed: Option<NodeError> = None;
    loop {
        // Read the flag before draining so nothing pushed before it is missed.
        let done = finished.load(Ordering::Acquire);
        while let Ok(s) = samples.pop() {
            if failed.is_none()
                && let Err(e) = w.wav.write_sample(s)
            {
                tracing::error!("WAV recording stopped: {e}");
                failed = Some(wav_err(&w.wav_path, e));
            }
            frames += 1;
        }
        while let Ok(o) = onsets.pop() {
            let mut o = SidecarOnset::from(o);
            // The file's exact frame → time model (the engine rounds within a block).
            o.frame_cluster_ns = grid_time(first_frame + o.frame, sample_rate);
            collected.push(o);
        }
        if done {
            break;
        }
        std::thread::park_timeout(Duration::from_millis(200));
    }
    let wav_path = w.wav_path.clone();
    w.wav.finalize().map_err(|e| wav_err(&wav_path, e))?;
    if let Some(e) = failed {
        return Err(e);
    }
    let sidecar = WavSidecar {
        id,
        name,
        sample_rate,
        first_frame_cluster_ns: grid_time(first_frame, sample_rate),
        frames,
        late_events: counters.late(),
        onsets: collected,
    };
    write_json_atomically(&w.json_path, &sidecar)?;
    tracing::info!(
        "wrote {} ({frames} frames) and {}",
        wav_path.display(),
        w.json_path.display()
    );
    Ok(())
}

pub(crate) fn write_json_atomically(path: &Path, sidecar: &WavSidecar) -> Result<(), NodeError> {
    let err = |detail: String| NodeError::WavWrite {
        path: path.to_path_buf(),
        detail,
    };
    let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
    let body = serde_json::to_vec_pretty(sidecar).map_err(|e| err(e.to_string()))?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(parent) = path.parent()
            && let Ok(d) = std::fs::File::open(parent)
        {
            // Make the rename itself durable.
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_times_are_exact_multiples() {
        assert_eq!(frame_time(1_000, 0, 48_000), 1_000);
        assert_eq!(frame_time(1_000, 48_000, 48_000), 1_000_001_000);
        assert_eq!(frame_time(0, 3, 48_000), 62_500);
        // 1e9/48000 = 20833.33…: rounded per frame, never accumulated.
        assert_eq!(frame_time(0, 1, 48_000), 20_833);
        assert_eq!(frame_time(0, 2, 48_000), 41_667);
    }

    #[test]
    fn unwritable_dir_is_a_clear_error() {
        let e = match open_wav(Path::new("/proc/voicemesh-no"), "a", 48_000) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("/proc is not writable"),
        };
        assert!(
            e.contains("cannot write WAV output in /proc/voicemesh-no"),
            "{e}"
        );
    }
}
