//! The ALSA backend: an interleaved f32 playback PCM (`default`, or the one named by
//! `--audio alsa:DEVICE`) opened through [`super::ffi::alsa`] (libasound loaded at run time,
//! so building needs no ALSA development files), the engine's mono output copied to every
//! channel.
//!
//! A dedicated audio thread (it asks for SCHED_FIFO through [`crate::rt::request_realtime`],
//! as the paced backend does) loops: render one block, write it with
//! [`Pcm::write_interleaved`]. The write blocks until the device has room for the block:
//! that wait *is* the ALSA clock, by design, and the only place the thread blocks. Rendering
//! allocates nothing (both buffers are allocated before the loop) and takes no lock.
//!
//! The block's timing comes from the [`AudioClock`] DLL over the count of frames written:
//! just before rendering, the next frame to be written is heard after the PCM's delay
//! ([`Pcm::delay`]: frames written but not yet heard), which is one noisy observation per
//! block; the DLL averages the jitter and follows the card's drift, and the block's cluster
//! time is the cluster clock's reading of the model's instant.
//! The block is at most one period long ([`MAX_BLOCK`] at most). Underruns recovered by the
//! write are the backend's xruns; the load is measured per block from its start to the end of
//! rendering (the write's wait excluded).
//!
//! A PCM that is not a clock (ALSA's `null` sink takes every write at once) would make the
//! loop render as fast as the CPU allows; so the thread never runs more than one buffer ahead
//! of CLOCK_MONOTONIC, re-anchored whenever a write had to wait (a real device keeps the
//! anchor on its own clock, and this pacing never kicks in).
//!
//! Opening fails with [`NodeError::Alsa`], naming the device and the alternatives, when
//! there is no such device, it cannot be opened (a machine without a sound card), it refuses
//! the format, or libasound is missing.

use super::ffi::alsa::{AlsaError, Pcm, PcmConfig};
use super::{AudioParams, RunningAudio};
use crate::clock::ClusterClock;
use crate::clock::audio::{AudioClock, mono_now_ns};
use crate::engine::{Engine, EngineCounters};
use crate::error::NodeError;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// ALSA's default PCM, used by plain `--audio alsa`.
pub const DEFAULT_DEVICE: &str = "default";
/// Largest block the thread renders and writes at once (the PCM's period when smaller).
pub const MAX_BLOCK: usize = 1024;
/// Smallest block, whatever the period.
const MIN_BLOCK: usize = 32;
/// Buffer latency asked of ALSA (it picks buffer and period sizes from it).
pub const LATENCY_US: u32 = 20_000;

fn alsa_error(device: &str, e: &AlsaError) -> NodeError {
    let detail = match e {
        AlsaError::Open { message, .. } => message.clone(),
        e => e.to_string(),
    };
    NodeError::Alsa {
        device: device.to_string(),
        detail,
    }
}

/// Opens the playback PCM `device` (`None`: ALSA's `default`) at `sample_rate`: stereo, or
/// mono when the device refuses two channels.
fn open_device(device: Option<&str>, sample_rate: u32) -> Result<Pcm, NodeError> {
    let name = device.unwrap_or(DEFAULT_DEVICE);
    let config = |channels| PcmConfig {
        channels,
        rate: sample_rate,
        soft_resample: true,
        latency_us: LATENCY_US,
    };
    match Pcm::open_playback(name, &config(2)) {
        Ok(pcm) => Ok(pcm),
        Err(AlsaError::SetParams { .. }) => {
            Pcm::open_playback(name, &config(1)).map_err(|e| alsa_error(name, &e))
        }
        Err(e) => Err(alsa_error(name, &e)),
    }
}

/// What the audio thread needs besides the PCM and the engine.
struct Loop {
    clock: Arc<ClusterClock>,
    counters: Arc<EngineCounters>,
    shutdown: CancellationToken,
    sample_rate: u32,
}

fn frames_to_ns(frames: u64, sample_rate: u32) -> u64 {
    frames * 1_000_000_000 / u64::from(sample_rate.max(1))
}

impl Loop {
    /// Renders and writes blocks until shutdown; an unrecoverable write error ends it.
    fn run(&self, pcm: &mut Pcm, engine: &mut Engine) -> Result<(), NodeError> {
        let sr = self.sample_rate;
        let channels = pcm.config().channels.max(1) as usize;
        let block = (pcm.period_frames() as usize).clamp(MIN_BLOCK, MAX_BLOCK);
        let buffer_ns = frames_to_ns(pcm.buffer_frames().max(block as u64), sr);
        let block_ns = frames_to_ns(block as u64, sr);
        let mut mono = vec![0.0f32; block];
        let mut interleaved = vec![0.0f32; block * channels];
        let mut xruns_seen = 0u64;
        // Pacing for a PCM that is not a clock: `anchor` is when frame 0 would have been
        // heard, were the device consuming at `sr` from a full buffer.
        let mut written: u64 = 0;
        let mut anchor = super::monotonic_ns();
        let mut dll = AudioClock::new(sr);
        while !self.shutdown.is_cancelled() {
            let entered = super::monotonic_ns();
            let delay = pcm.delay().unwrap_or(0).max(0) as u64;
            dll.observe(written, mono_now_ns() + frames_to_ns(delay, sr));
            engine.render_block(dll.block_time(written, &self.clock), &mut mono);
            for (frame, s) in interleaved.chunks_exact_mut(channels).zip(&mono) {
                frame.fill(*s);
            }
            super::record_block_load(&self.counters, entered, block, sr);

            let before = super::monotonic_ns();
            pcm.write_interleaved(&interleaved)
                .map_err(|e| NodeError::AudioThread(format!("ALSA playback stopped: {e}")))?;
            let after = super::monotonic_ns();
            written += block as u64;
            let xruns = pcm.xruns();
            if xruns != xruns_seen {
                self.counters
                    .xruns
                    .fetch_add(xruns.wrapping_sub(xruns_seen) as u32, Ordering::Relaxed);
                xruns_seen = xruns;
            }
            let written_ns = frames_to_ns(written, sr);
            if after.saturating_sub(before) >= block_ns / 4 {
                // The device made us wait: it is the clock; its buffer is full now.
                anchor = (after + buffer_ns).saturating_sub(written_ns);
            } else {
                let ahead = (anchor + written_ns).saturating_sub(after);
                if ahead > buffer_ns {
                    std::thread::sleep(Duration::from_nanos(ahead - buffer_ns));
                }
            }
        }
        Ok(())
    }
}

/// Starts the engine on the ALSA playback device `device` (`None`: `default`).
pub fn start(
    device: Option<&str>,
    p: AudioParams,
    shutdown: CancellationToken,
) -> Result<RunningAudio, NodeError> {
    let name = device.unwrap_or(DEFAULT_DEVICE).to_string();
    let mut pcm = open_device(device, p.sample_rate)?;
    let sr = pcm.config().rate;
    let channels = pcm.config().channels;
    let description = format!(
        "ALSA device {name} ({channels} channels, {sr} Hz, f32, period {} frames, buffer {} \
         frames)",
        pcm.period_frames(),
        pcm.buffer_frames()
    );
    let (mut engine, sender) = Engine::new(p.voices, sr, p.counters.clone());
    let onsets = engine.report_onsets();
    let lp = Loop {
        clock: p.clock.clone(),
        counters: p.counters.clone(),
        shutdown,
        sample_rate: sr,
    };
    let (realtime, task) =
        super::spawn_audio_thread(format!("vm-alsa-{}", p.id), "ALSA thread", move || {
            let result = lp.run(&mut pcm, &mut engine);
            drop(pcm);
            result
        })?;
    tracing::info!("{description}");
    Ok(RunningAudio {
        description,
        sample_rate: sr,
        sender,
        onsets,
        realtime,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Control, EngineEvent, EventKind};

    fn params(id: &str) -> AudioParams {
        AudioParams {
            id: id.into(),
            name: id.into(),
            voices: 4,
            sample_rate: 48_000,
            clock: Arc::new(crate::clock::ClusterClock::new()),
            counters: Arc::new(crate::engine::EngineCounters::default()),
        }
    }

    /// A device name ALSA cannot know fails with an error naming it and the alternatives.
    #[test]
    fn unknown_device_is_a_clear_error() {
        let e = match open_device(Some("voicemesh-no-such-pcm"), 48_000) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("ALSA found a device that cannot exist"),
        };
        assert!(
            e.contains("cannot open ALSA output device \"voicemesh-no-such-pcm\""),
            "{e}"
        );
        assert!(e.contains("--audio jack") && e.contains("wav:DIR"), "{e}");
        assert!(e.contains("--audio null"), "{e}");
    }

    /// On a machine without a sound card (no cards in /proc/asound/cards), `--audio alsa`
    /// fails at start with an error naming `default` and the alternatives, and does not panic.
    #[tokio::test]
    async fn default_device_without_a_sound_card_is_a_clear_error() {
        let cards = std::fs::read_to_string("/proc/asound/cards").unwrap_or_default();
        let no_card = !cards
            .lines()
            .any(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()));
        let stop = CancellationToken::new();
        match start(None, params("alsa-test"), stop.clone()) {
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains("cannot open ALSA output device \"default\""),
                    "{e}"
                );
                assert!(
                    e.contains("--audio jack") && e.contains("--audio null"),
                    "{e}"
                );
            }
            Ok(running) => {
                assert!(
                    !no_card,
                    "opened ALSA default without a sound card: {}",
                    running.description
                );
                eprintln!(
                    "this machine has a sound card; opened {}",
                    running.description
                );
                stop.cancel();
                running.task.await.unwrap().unwrap();
            }
        }
    }

    /// ALSA's `null` PCM is a real sink: the backend starts, renders a note in real time
    /// (paced, not as fast as the CPU allows) and stops cleanly.
    #[tokio::test]
    async fn null_pcm_renders_in_real_time() {
        let p = params("alsa-null");
        let counters = p.counters.clone();
        let clock = p.clock.clone();
        let stop = CancellationToken::new();
        let mut running = start(Some("null"), p, stop.clone()).expect("ALSA null PCM opens");
        assert!(
            running.description.starts_with("ALSA device null ("),
            "{}",
            running.description
        );
        assert_eq!(running.sample_rate, 48_000);
        let at = clock.now().add_nanos(20_000_000);
        running.sender.send(Control::Event(EngineEvent {
            voice: 0,
            at,
            kind: EventKind::On {
                note: 60,
                velocity: 100,
                lease_until: at.add_nanos(2_000_000_000),
            },
        }));
        let t0 = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let blocks = counters.blocks.load(Ordering::Relaxed);
        let elapsed = t0.elapsed().as_secs_f64();
        assert!(blocks > 0, "no block rendered");
        // Blocks are at least 32 frames: in real time that is at most elapsed·sr/32 blocks
        // plus one buffer's worth; an unpaced loop renders far more.
        let bound = (elapsed + 0.1) * 48_000.0 / 32.0;
        assert!(
            (blocks as f64) < bound,
            "{blocks} blocks in {elapsed} s: not paced"
        );
        assert_eq!(counters.active(), 1);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), running.task)
            .await
            .expect("ALSA backend did not stop")
            .unwrap()
            .unwrap();
    }
}
