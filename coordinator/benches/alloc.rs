//! Criterion benchmark of the allocator core: one note-on + note-off pair on 64 nodes × 16
//! voices (see `voicemesh_coordinator::allocator::bench`).
#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use voicemesh_coordinator::allocator::bench;
use voicemesh_protocol::ClusterTime;

fn pairs(c: &mut Criterion) {
    let mut a = bench::cluster();
    let mut i = 0u64;
    let mut g = c.benchmark_group("alloc");
    g.throughput(Throughput::Elements(1));
    g.bench_function("note_on_off_pair_64x16", |b| {
        b.iter(|| {
            i += 1;
            bench::pair(&mut a, ClusterTime(1_000_000_000 + i * 1_000), i)
        })
    });
    g.finish();
}

criterion_group!(benches, pairs);
criterion_main!(benches);
