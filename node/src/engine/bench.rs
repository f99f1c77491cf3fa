//! Capacity measurement: how many voices of an engine one core renders in real time at
//! 48 kHz in 64-frame blocks. `voicemesh bench engine` prints it; the criterion bench
//! (`node/benches/render.rs`) measures the same loop.

use super::dsp::LANES;
use super::naive::NaiveVoice;
use super::plugin::{SynthEngine, UnknownEngine, create};
use std::time::Instant;

/// Sample rate of the measurement.
pub const SAMPLE_RATE: u32 = 48_000;
/// Block size of the measurement.
pub const BLOCK: usize = 64;
/// Voices rendered at once.
pub const VOICES: usize = 256;

/// An engine `name` with [`VOICES`] voices all sounding (spread notes and velocities; the
/// first preset after `init` if there is one, so the filter and modulators are in use).
pub fn loaded_engine(name: &str) -> Result<Box<dyn SynthEngine>, UnknownEngine> {
    let mut e = create(name, SAMPLE_RATE, BLOCK, VOICES)?;
    let info = e.info();
    let preset = info.presets.get(1).or(info.presets.first());
    for v in 0..VOICES {
        if let Some(p) = preset {
            for (id, value) in info.preset_values(p).into_iter().enumerate() {
                e.set_param(v, id as u16, value);
            }
        }
        e.note_on(v, 36 + (v * 7 % 48) as u8, 64 + (v % 64) as u8);
    }
    Ok(e)
}

/// Voices per core in real time (48 kHz, 64-frame blocks) of engine `name`, measured for about
/// `seconds` of wall time on the calling thread.
pub fn measure(engine: &str, seconds: f64) -> Result<f64, UnknownEngine> {
    let mut e = loaded_engine(engine)?;
    Ok(time_blocks(seconds, VOICES, |out| e.render_add(out)))
}

/// [`measure`] for the naive scalar voice ([`NaiveVoice`]), the baseline of the ratio.
pub fn measure_naive(seconds: f64) -> f64 {
    let sr = SAMPLE_RATE as f32;
    let mut voices: Vec<NaiveVoice> = (0..VOICES)
        .map(|v| {
            let mut n = NaiveVoice::new();
            n.note_on(36 + (v * 7 % 48) as u8, 64 + (v % 64) as u8);
            n
        })
        .collect();
    time_blocks(seconds, VOICES, |out| {
        for v in voices.iter_mut() {
            v.render_add(out, sr);
        }
    })
}

fn time_blocks(seconds: f64, voices: usize, mut render: impl FnMut(&mut [f32])) -> f64 {
    let mut out = [0.0f32; BLOCK];
    // Warm up (caches, branch predictors, envelopes past their attack).
    for _ in 0..200 {
        out.fill(0.0);
        render(&mut out);
    }
    let t0 = Instant::now();
    let mut blocks = 0u64;
    loop {
        for _ in 0..50 {
            out.fill(0.0);
            render(&mut out);
            std::hint::black_box(&mut out);
        }
        blocks += 50;
        if t0.elapsed().as_secs_f64() >= seconds.max(0.01) {
            break;
        }
    }
    let spent = t0.elapsed().as_secs_f64();
    let audio = blocks as f64 * BLOCK as f64 / f64::from(SAMPLE_RATE);
    voices as f64 * audio / spent
}

const _: () = assert!(VOICES.is_multiple_of(LANES));
