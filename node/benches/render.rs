//! Render-loop benchmark: voices rendered per core in real time at 48 kHz in 64-frame blocks,
//! for the subtractive (reference) engine, the FM engine and the naive scalar voice.
//!
//! Criterion reports throughput in voice-frames per second (elements); divide by 48 000 for
//! voices per core. After the criterion groups, the same figures from
//! `voicemesh_node::engine::bench::measure` are printed with the ratio to the naive voice.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use voicemesh_node::engine::bench::{
    BLOCK, SAMPLE_RATE, VOICES, loaded_engine, measure, measure_naive,
};
use voicemesh_node::engine::naive::NaiveVoice;

fn render(c: &mut Criterion) {
    let mut g = c.benchmark_group("render_64_frames_256_voices");
    g.throughput(Throughput::Elements((VOICES * BLOCK) as u64));
    for name in ["subtractive", "fm2"] {
        let mut e = loaded_engine(name).expect("registered engine");
        let mut out = [0.0f32; BLOCK];
        g.bench_function(name, |b| {
            b.iter(|| {
                out.fill(0.0);
                e.render_add(black_box(&mut out));
            })
        });
    }
    let sr = SAMPLE_RATE as f32;
    let mut voices: Vec<NaiveVoice> = (0..VOICES)
        .map(|v| {
            let mut n = NaiveVoice::new();
            n.note_on(36 + (v * 7 % 48) as u8, 100);
            n
        })
        .collect();
    let mut out = [0.0f32; BLOCK];
    g.bench_function("naive_scalar", |b| {
        b.iter(|| {
            out.fill(0.0);
            for v in voices.iter_mut() {
                v.render_add(black_box(&mut out), sr);
            }
        })
    });
    g.finish();

    let sub = measure("subtractive", 3.0).expect("registered");
    let fm = measure("fm2", 3.0).expect("registered");
    let naive = measure_naive(3.0);
    println!(
        "reference_voices_per_core={sub:.0} fm_voices_per_core={fm:.0} naive_voices_per_core={naive:.0} ratio={:.1}",
        sub / naive
    );
}

criterion_group!(benches, render);
criterion_main!(benches);
