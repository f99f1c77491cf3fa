//! A measurement of the allocator core: note-on + note-off pairs per second and the p99 time
//! of one operation, on 64 nodes × 16 voices with a quarter of the voices held by a background
//! chord. Used by `voicemesh bench alloc` and the criterion bench.
// A measurement harness, not part of the core: it has to read a clock.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use voicemesh_protocol::ClusterTime;

use super::{AllocatorConfig, MidiEvent, VoiceAllocator};

/// Nodes in the benchmark cluster.
pub const NODES: usize = 64;
/// Voices per node.
pub const VOICES: u16 = 16;

/// The benchmark cluster: 64 nodes × 16 voices, 256 voices held on channel 15.
pub fn cluster() -> VoiceAllocator {
    let mut a = VoiceAllocator::new(AllocatorConfig::default());
    for i in 0..NODES {
        let _ = a.add_node(&format!("node-{i:02}"), VOICES);
    }
    for k in 0..256u16 {
        let ev = MidiEvent::NoteOn {
            channel: 14 + (k / 128) as u8,
            note: (k % 128) as u8,
            velocity: 100,
        };
        a.handle_midi(ClusterTime(1), ev).for_each(drop);
    }
    a
}

/// Runs pair `i` (a note-on then its note-off) and returns how many actions came out.
#[inline]
pub fn pair(a: &mut VoiceAllocator, now: ClusterTime, i: u64) -> usize {
    let (channel, note) = ((i % 14) as u8, ((i / 14) % 128) as u8);
    let on = MidiEvent::NoteOn {
        channel,
        note,
        velocity: 100,
    };
    let off = MidiEvent::NoteOff {
        channel,
        note,
        velocity: 0,
    };
    let n = a.handle_midi(now, on).map(black_box).count();
    n + a.handle_midi(now, off).map(black_box).count()
}

/// Measures for about `seconds` (half throughput, half per-operation timing) and returns
/// (note-on + note-off pairs per second, p99 time of one operation in µs).
pub fn measure(seconds: f64) -> (f64, f64) {
    let half = Duration::from_secs_f64(seconds.max(0.02) / 2.0);
    let mut a = cluster();
    let mut i = 0u64;
    let mut now = ClusterTime(1_000_000_000);
    // Throughput: batches of pairs between clock reads.
    let start = Instant::now();
    let mut pairs = 0u64;
    while start.elapsed() < half {
        for _ in 0..1024 {
            now.0 += 1_000;
            black_box(pair(&mut a, now, i));
            i += 1;
        }
        pairs += 1024;
    }
    let pairs_per_s = pairs as f64 / start.elapsed().as_secs_f64();
    // Latency: every operation timed on its own.
    let mut samples: Vec<u32> = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    while start.elapsed() < half && samples.len() + 2 <= samples.capacity() {
        for _ in 0..256 {
            now.0 += 1_000;
            let (channel, note) = ((i % 14) as u8, ((i / 14) % 128) as u8);
            i += 1;
            for ev in [
                MidiEvent::NoteOn {
                    channel,
                    note,
                    velocity: 100,
                },
                MidiEvent::NoteOff {
                    channel,
                    note,
                    velocity: 0,
                },
            ] {
                let t = Instant::now();
                black_box(a.handle_midi(now, ev).map(black_box).count());
                let ns = t.elapsed().as_nanos();
                if samples.len() < samples.capacity() {
                    samples.push(u32::try_from(ns).unwrap_or(u32::MAX));
                }
            }
        }
    }
    let p99_ns = if samples.is_empty() {
        0
    } else {
        let k = (samples.len() - 1) * 99 / 100;
        *samples.select_nth_unstable(k).1
    };
    (pairs_per_s, f64::from(p99_ns) / 1000.0)
}

/// The stealing path: note-ons only on the benchmark cluster, so after the first 768 every
/// note-on steals the oldest voice. Runs for about `seconds` with every operation timed and
/// returns (note-ons per second, p99 time of one note-on in µs).
pub fn measure_steal(seconds: f64) -> (f64, f64) {
    let limit = Duration::from_secs_f64(seconds.max(0.01));
    let mut a = cluster();
    let mut now = ClusterTime(1_000_000_000);
    let mut samples: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut i = 0u64;
    let start = Instant::now();
    while start.elapsed() < limit && samples.len() + 256 <= samples.capacity() {
        for _ in 0..256 {
            now.0 += 1_000;
            let ev = MidiEvent::NoteOn {
                channel: (i % 14) as u8,
                note: ((i / 14) % 128) as u8,
                velocity: 100,
            };
            i += 1;
            let t = Instant::now();
            black_box(a.handle_midi(now, ev).map(black_box).count());
            samples.push(u32::try_from(t.elapsed().as_nanos()).unwrap_or(u32::MAX));
        }
    }
    let per_s = samples.len() as f64 / start.elapsed().as_secs_f64();
    let k = (samples.len() - 1) * 99 / 100;
    let p99 = *samples.select_nth_unstable(k).1;
    (per_s, f64::from(p99) / 1000.0)
}
