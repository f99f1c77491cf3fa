//! The allocator's MIDI hot path does not allocate once warmed up: a counting global
//! allocator watches 20 000 note-on + note-off pairs, pedals, bends and steals.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use voicemesh_coordinator::allocator::{MidiEvent, bench};
use voicemesh_protocol::ClusterTime;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn play(a: &mut voicemesh_coordinator::allocator::VoiceAllocator, from: u64, n: u64) {
    for i in from..from + n {
        let now = ClusterTime(1_000_000_000 + i * 1_000);
        bench::pair(a, now, i);
        let ch = (i % 14) as u8;
        let extra = [
            MidiEvent::ControlChange {
                channel: ch,
                controller: 64,
                value: if i % 2 == 0 { 127 } else { 0 },
            },
            MidiEvent::PitchBend {
                channel: ch,
                value: (i % 8000) as i16,
            },
            // Held notes on a full cluster: steals.
            MidiEvent::NoteOn {
                channel: 13,
                note: (i % 128) as u8,
                velocity: 90,
            },
        ];
        for ev in extra {
            a.handle_midi(now, ev).for_each(drop);
        }
    }
}

#[test]
fn midi_hot_path_does_not_allocate() {
    let mut a = bench::cluster();
    // Warm-up: buffers, the note table, the allocation-order queue reach their size.
    play(&mut a, 0, 20_000);
    COUNTING.store(true, Ordering::Relaxed);
    play(&mut a, 20_000, 20_000);
    COUNTING.store(false, Ordering::Relaxed);
    assert_eq!(
        ALLOCS.load(Ordering::Relaxed),
        0,
        "allocations in the hot path"
    );
    assert!(a.stats().stolen > 0, "the run covered stealing");
}
