//! The ALSA backend, through cpal: one f32 output stream on an ALSA PCM device (`default`, or
//! the one named by `--audio alsa:DEVICE`), the engine's mono output copied to every channel.
//!
//! Block start cluster time = `clock.to_cluster(CLOCK_REALTIME now)` at the callback's entry
//! plus the output latency cpal reports for that callback (its predicted playback instant
//! minus its callback instant; 0 when the host gives no timestamps). cpal may hand out
//! callbacks of any length; the engine renders them in pieces of at most [`MAX_PIECE`] frames
//! into a buffer allocated before the stream starts, each piece timed from its own first
//! frame.
//!
//! cpal owns the callback thread. The first callback asks for SCHED_FIFO for it (one syscall,
//! no allocation) and records what it got, so the node can say so at start. A stream error
//! (an underrun that ALSA recovered, a device that went away) counts as an xrun.
//!
//! Opening fails with [`NodeError::Alsa`], naming the device and the alternatives, when there
//! is no such device or it cannot be opened (a machine without a sound card).

use super::{AudioParams, RunningAudio};
use crate::clock::local_now_ns;
use crate::engine::Engine;
use crate::error::NodeError;
use crate::rt::{MemLock, RT_PRIORITY, RtReport, ThreadSched};
use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// ALSA's default PCM, used by plain `--audio alsa`.
pub const DEFAULT_DEVICE: &str = "default";
/// Largest piece the engine renders at once within one cpal callback.
pub const MAX_PIECE: usize = 1024;
/// How long `start` waits for the first callback to learn the thread's scheduling.
const FIRST_CALLBACK_WAIT: Duration = Duration::from_secs(2);

/// What the first callback learned about its thread.
#[derive(Debug, Default)]
struct SeenSched {
    seen: AtomicBool,
    policy: AtomicI32,
    priority: AtomicI32,
    /// The errno of a refused SCHED_FIFO request, 0 when granted.
    refused: AtomicI32,
}

/// Finds and opens the output device without starting anything: the device and the stream
/// configuration to use. `device` `None` is ALSA's `default`.
fn open_device(
    device: Option<&str>,
    sample_rate: u32,
) -> Result<(cpal::Device, cpal::StreamConfig), NodeError> {
    let name = device.unwrap_or(DEFAULT_DEVICE).to_string();
    let err = |detail: String| NodeError::Alsa {
        device: name.clone(),
        detail,
    };
    let host = cpal::host_from_id(cpal::HostId::Alsa).map_err(|e| err(e.to_string()))?;
    let dev = match device {
        None => host
            .default_output_device()
            .ok_or_else(|| err("ALSA has no default output device".into()))?,
        Some(n) => host
            .device_by_id(&cpal::DeviceId::new(cpal::HostId::Alsa, n))
            .ok_or_else(|| {
                let known: Vec<String> = host
                    .output_devices()
                    .map(|ds| {
                        ds.filter_map(|d| d.id().ok().map(|id| id.id().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                err(if known.is_empty() {
                    "no such device, and ALSA lists no output devices".into()
                } else {
                    format!("no such device; ALSA output devices: {}", known.join(", "))
                })
            })?,
    };
    let def = dev
        .default_output_config()
        .map_err(|e| err(format!("cannot read its output configuration: {e}")))?;
    let config = cpal::StreamConfig {
        channels: def.channels().max(1),
        sample_rate,
        buffer_size: cpal::BufferSize::Default,
    };
    Ok((dev, config))
}

/// Starts the engine on an ALSA output stream.
pub fn start(
    device: Option<&str>,
    p: AudioParams,
    shutdown: CancellationToken,
) -> Result<RunningAudio, NodeError> {
    let name = device.unwrap_or(DEFAULT_DEVICE).to_string();
    let (dev, config) = open_device(device, p.sample_rate)?;
    let sr = config.sample_rate;
    let channels = usize::from(config.channels);
    let (mut engine, sender) = Engine::new(p.voices, sr, p.counters.clone());
    let sched = Arc::new(SeenSched::default());

    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), NodeError>>(1);
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let thread = {
        let sched = sched.clone();
        let counters = p.counters.clone();
        let clock = p.clock.clone();
        let name = name.clone();
        std::thread::Builder::new()
            .name(format!("vm-alsa-{}", p.id))
            .spawn(move || {
                let mut piece = vec![0.0f32; MAX_PIECE];
                let err_counters = counters.clone();
                let data = move |data: &mut [f32], info: &cpal::OutputCallbackInfo| {
                    let entered = super::monotonic_ns();
                    if !sched.seen.load(Ordering::Relaxed) {
                        let param = libc::sched_param {
                            sched_priority: RT_PRIORITY,
                        };
                        // SAFETY: the calling thread, a valid sched_param.
                        let rc = unsafe {
                            libc::pthread_setschedparam(
                                libc::pthread_self(),
                                libc::SCHED_FIFO,
                                &param,
                            )
                        };
                        let s = crate::rt::current_sched();
                        sched.refused.store(rc, Ordering::Relaxed);
                        sched.policy.store(s.policy, Ordering::Relaxed);
                        sched.priority.store(s.priority, Ordering::Relaxed);
                        sched.seen.store(true, Ordering::Release);
                    }
                    let ts = info.timestamp();
                    let latency = ts
                        .playback
                        .checked_duration_since(ts.callback)
                        .map_or(0, |d| d.as_nanos().min(i64::MAX as u128) as i64);
                    let start = clock.to_cluster(local_now_ns()).add_nanos(latency);
                    let frames = data.len() / channels;
                    let mut done = 0usize;
                    while done < frames {
                        let n = (frames - done).min(piece.len());
                        let offset_ns = (done as u64 * 1_000_000_000 / u64::from(sr)) as i64;
                        engine.render(start.add_nanos(offset_ns), &mut piece[..n]);
                        let out = &mut data[done * channels..(done + n) * channels];
                        for (frame, s) in out.chunks_exact_mut(channels).zip(&piece[..n]) {
                            frame.fill(*s);
                        }
                        done += n;
                    }
                    // A trailing partial frame (never from a sane host) is silenced.
                    data[frames * channels..].fill(0.0);
                    super::record_block_load(&counters, entered, frames, sr);
                };
                let error = move |_e: cpal::Error| {
                    err_counters.xruns.fetch_add(1, Ordering::Relaxed);
                };
                let stream = match dev.build_output_stream::<f32, _, _>(config, data, error, None) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(NodeError::Alsa {
                            device: name,
                            detail: format!("cannot open an f32 output stream at {sr} Hz: {e}"),
                        }));
                        return;
                    }
                };
                if let Err(e) = stream.play() {
                    let _ = ready_tx.send(Err(NodeError::Alsa {
                        device: name,
                        detail: format!("cannot start the stream: {e}"),
                    }));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                // Keep the stream until shutdown (or until `start`'s side is gone).
                let _ = stop_rx.recv();
                drop(stream);
            })
            .map_err(|e| NodeError::AudioThread(format!("cannot start the ALSA thread: {e}")))?
    };
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e);
        }
        Err(_) => {
            let _ = thread.join();
            return Err(NodeError::AudioThread(
                "the ALSA thread ended before opening the stream".into(),
            ));
        }
    }

    let deadline = std::time::Instant::now() + FIRST_CALLBACK_WAIT;
    while !sched.seen.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (thread_sched, refused) = if sched.seen.load(Ordering::Acquire) {
        let rc = sched.refused.load(Ordering::Relaxed);
        (
            Ok(ThreadSched {
                policy: sched.policy.load(Ordering::Relaxed),
                priority: sched.priority.load(Ordering::Relaxed),
            }),
            (rc != 0).then(|| std::io::Error::from_raw_os_error(rc).to_string()),
        )
    } else {
        (
            Err(format!(
                "no audio callback within {} s",
                FIRST_CALLBACK_WAIT.as_secs()
            )),
            None,
        )
    };
    let memory = crate::rt::lock_memory();
    let realtime = RtReport {
        thread: "ALSA (cpal) callback thread".into(),
        sched: thread_sched,
        refused,
        memory: memory.clone(),
    };
    if memory != MemLock::All {
        tracing::warn!("{realtime}");
    }
    let description = format!("ALSA device {name} ({channels} channels, {sr} Hz, f32, via cpal)");
    let task = tokio::spawn(async move {
        shutdown.cancelled().await;
        let _ = stop_tx.send(());
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(NodeError::AudioThread("the ALSA thread panicked".into())),
            Err(e) => Err(NodeError::Task {
                task: "alsa",
                detail: e.to_string(),
            }),
        }
    });
    Ok(RunningAudio {
        description,
        sample_rate: sr,
        sender,
        realtime,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let p = AudioParams {
            id: "alsa-test".into(),
            name: "alsa-test".into(),
            voices: 4,
            sample_rate: 48_000,
            clock: Arc::new(crate::clock::ClusterClock::new()),
            counters: Arc::new(crate::engine::EngineCounters::default()),
        };
        match start(None, p, CancellationToken::new()) {
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
            }
        }
    }
}
