//! Proves the render path never allocates: a counting global allocator counts allocations made
//! on this test's thread while thousands of events are queued and blocks rendered.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use voicemesh_node::engine::{
    Control, Engine, EngineCounters, EngineEvent, EventKind, PARAM_PITCH_SEMITONES, PARAM_VOLUME,
};
use voicemesh_protocol::ClusterTime;

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    // try_with: the thread-locals may be gone while a thread is torn down.
    let _ = ARMED.try_with(|a| {
        if a.get() {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
    });
}

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn counted<R>(f: impl FnOnce() -> R) -> (R, u64) {
    COUNT.with(|c| c.set(0));
    ARMED.with(|a| a.set(true));
    let r = f();
    ARMED.with(|a| a.set(false));
    (r, COUNT.with(|c| c.get()))
}

#[test]
fn the_allocator_counts() {
    // Guards the test itself: a Vec in the armed region must be seen.
    let (_, n) = counted(|| std::hint::black_box(vec![1u8; 16]));
    assert!(n >= 1);
}

#[test]
fn render_and_events_never_allocate() {
    for name in voicemesh_node::engine::ENGINE_NAMES {
        workload(name);
    }
}

fn workload(name: &str) {
    const SR: u32 = 48_000;
    const BLOCK: usize = 256;
    let counters = Arc::new(EngineCounters::default());
    let (mut engine, mut tx) = Engine::with_engine(name, 8, SR, counters.clone()).unwrap();
    let nparams = engine.synth().info().params.len() as u16;
    let mut onsets = engine.record_onsets();
    let mut out = vec![0.0f32; BLOCK];
    let block_ns = BLOCK as u64 * 1_000_000_000 / u64::from(SR);
    let mut t = 1_000_000_000_000u64;

    let ((), allocs) = counted(|| {
        let mut sent = 0u32;
        for block in 0..2_000u64 {
            // 4 events per block: on, param, param, off, spread over the block and the next;
            // some are late on purpose, and some voices are out of range.
            for k in 0..4u64 {
                let voice = ((block * 4 + k) % 9) as u16;
                let at = ClusterTime(t + k * 1_500_000 + (block % 3) * 2_000_000 - 1_000_000);
                let kind = match k {
                    0 => EventKind::On {
                        note: (36 + block % 60) as u8,
                        velocity: 100,
                        lease_until: ClusterTime(t + 30_000_000),
                    },
                    1 => EventKind::Param {
                        param: PARAM_VOLUME,
                        value: 0.5,
                    },
                    2 if block % 2 == 0 => EventKind::Param {
                        param: PARAM_PITCH_SEMITONES,
                        value: 1.5,
                    },
                    // Every engine parameter in turn, with values far outside their ranges,
                    // unknown parameter numbers and NaN.
                    2 => EventKind::Param {
                        param: ((block / 2) % u64::from(nparams + 2)) as u16,
                        value: match block % 7 {
                            1 => f32::NAN,
                            3 => -1e9,
                            5 => 1e9,
                            _ => (block % 5) as f32 * 0.3,
                        },
                    },
                    _ => EventKind::Off,
                };
                tx.send(Control::Event(EngineEvent { voice, at, kind }));
                sent += 1;
            }
            tx.send(Control::Event(EngineEvent {
                voice: (block % 8) as u16,
                at: ClusterTime(0),
                kind: EventKind::Renew {
                    until: ClusterTime(t + 50_000_000),
                },
            }));
            engine.render_timed(ClusterTime(t), &mut out);
            while onsets.pop().is_ok() {}
            t += block_ns;
        }
        assert_eq!(sent, 8_000);
    });
    assert_eq!(
        allocs, 0,
        "{name}: the render path allocated {allocs} times"
    );
    assert!(counters.blocks.load(std::sync::atomic::Ordering::Relaxed) == 2_000);
    assert!(counters.late() > 0, "the workload includes late events");
    assert!(
        counters.dropped() > 0,
        "the workload includes out-of-range voices"
    );
}

/// The audio clock model's per-block work (a DLL update, the block's cluster time through the
/// cluster clock, a render with onset reports on both queues) allocates nothing either.
#[test]
fn audio_clock_model_and_timed_render_never_allocate() {
    use voicemesh_node::clock::ClusterClock;
    use voicemesh_node::clock::audio::{AudioClock, mono_now_ns};
    const SR: u32 = 48_000;
    const BLOCK: usize = 256;
    let counters = Arc::new(EngineCounters::default());
    let (mut engine, mut tx) = Engine::new(8, SR, counters.clone());
    let mut rec = engine.record_onsets();
    let mut rep = engine.report_onsets();
    let clock = ClusterClock::new();
    let mut dll = AudioClock::new(SR);
    let mut out = vec![0.0f32; BLOCK];
    let mono0 = mono_now_ns();
    let now = clock.now();
    let ((), allocs) = counted(|| {
        for block in 0..2_000u64 {
            let frame = block * BLOCK as u64;
            dll.observe(frame, mono0 + frame * 20_833 + (block % 7) * 30_000);
            let bt = dll.block_time(frame, &clock);
            tx.send(Control::Event(EngineEvent {
                voice: (block % 8) as u16,
                at: now.add_nanos((block * 5_000_000) as i64),
                kind: EventKind::On {
                    note: 60,
                    velocity: 90,
                    lease_until: ClusterTime(u64::MAX),
                },
            }));
            engine.render_block(bt, &mut out);
            while rec.pop().is_ok() {}
            while rep.pop().is_ok() {}
        }
    });
    assert_eq!(allocs, 0, "the timed render path allocated {allocs} times");
    assert!(counters.blocks.load(std::sync::atomic::Ordering::Relaxed) == 2_000);
}
