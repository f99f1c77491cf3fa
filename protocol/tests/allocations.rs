//! Decoding hostile bytes never allocates more than a small bound, and the portable
//! (`messagepack-serde`, firmware) path allocates nothing at all.
//!
//! Run twice, because serde's features decide what the portable path may do:
//! - `cargo test -p voicemesh-protocol --test allocations` (std): `rmp-serde` decodes stay under
//!   [`RMP_BOUND`]; the portable path allocates nothing for valid messages and for bodies that
//!   announce huge strings, arrays and maps, and at most [`PORTABLE_STD_BOUND`] otherwise —
//!   serde's derived identifier visitor (with serde's `alloc` feature, which std builds have)
//!   makes a lossy UTF-8 copy of an unknown variant name that is not valid UTF-8.
//! - `cargo test -p voicemesh-protocol --no-default-features --test allocations` (serde without
//!   `alloc`, as in the firmware): the portable path, which is then also `decode_frame`,
//!   allocates nothing, for any input.
//!
//! A counting global allocator sits under the whole test process (hence a test file of its
//! own). Counters are per thread, so tests running in parallel do not see each other's
//! allocations, and proptest's own allocations (generating inputs) happen outside the measured
//! calls.

mod arbitrary;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use voicemesh_protocol::{
    FrameReader, MAX_BODY_LEN, MAX_FRAME_LEN, Message, PROTOCOL_VERSION, codec, decode_frame,
    encode_frame,
};

struct Counting;

thread_local! {
    /// Bytes requested by allocations and growing reallocations on this thread.
    static BYTES: Cell<usize> = const { Cell::new(0) };
    /// Number of allocations on this thread.
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

fn record(bytes: usize) {
    // `try_with`: the thread-local may already be gone while a thread shuts down.
    let _ = BYTES.try_with(|b| b.set(b.get() + bytes));
    let _ = COUNT.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards every call to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size.saturating_sub(layout.size()));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns (allocations, bytes) it made on this thread.
fn measure<T>(f: impl FnOnce() -> T) -> (usize, usize) {
    let (c0, b0) = (COUNT.with(Cell::get), BYTES.with(Cell::get));
    let out = f();
    let counts = (COUNT.with(Cell::get) - c0, BYTES.with(Cell::get) - b0);
    drop(out);
    counts
}

/// Upper bound for one `rmp-serde` decode, whatever lengths the input announces. It is a
/// constant multiple of the frame, not of anything the input claims: the reader's scratch
/// buffer (grown by doubling to hold the longest string or binary read, at most about twice the
/// body) plus at most one error message, which may quote a string or binary of the body
/// (serde's "unknown variant `…`, expected one of …"), converted lossily to UTF-8 — each
/// invalid byte becomes a 3-byte U+FFFD — and grown by doubling while it is formatted.
/// Measured worst case: 11 248 bytes for a bin 16 of 1019 bytes of 0x80 as the variant name.
/// A decoder that trusted announced lengths would ask for up to 4 GiB here. The portable path
/// allocates nothing at all.
#[cfg_attr(not(feature = "std"), allow(dead_code))]
const RMP_BOUND: usize = 16 * MAX_FRAME_LEN;

fn frame_with_body(body: &[u8]) -> Vec<u8> {
    let mut f = ((body.len() + 2) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&[PROTOCOL_VERSION, 0]);
    f.extend_from_slice(body);
    f
}

/// Bodies that make decoders want to allocate: huge announced strings, arrays and maps,
/// long strings that are not variant names, deep nesting.
fn hostile_bodies() -> Vec<Vec<u8>> {
    let mut v = vec![
        vec![0xdb, 0xff, 0xff, 0xff, 0xff], // str 32 of 4 GiB
        vec![0xc6, 0xff, 0xff, 0xff, 0xff], // bin 32 of 4 GiB
        vec![0xdd, 0xff, 0xff, 0xff, 0xff], // array 32 of 4 G elements
        vec![0xdf, 0xff, 0xff, 0xff, 0xff], // map 32 of 4 G entries
        vec![
            0x81, 0xa5, b'H', b'e', b'l', b'l', b'o', 0xdf, 0xff, 0xff, 0xff, 0xff,
        ],
        std::iter::repeat_n(0x91, MAX_BODY_LEN).collect(), // 1024 nested arrays
    ];
    // A map whose key is a 1019-byte binary of invalid UTF-8: not a variant name, ends up in
    // an error message three times its size (the measured worst case).
    let mut bad_key = vec![0x81, 0xc5, 0x03, 0xfb];
    bad_key.extend(std::iter::repeat_n(0x80, 1019));
    bad_key.push(0xc0);
    v.push(bad_key);
    // A map whose key is a 1000-byte string: not a variant name, ends up in an error message.
    let mut long_key = vec![0x81, 0xda, 0x03, 0xe8];
    long_key.extend(std::iter::repeat_n(b'x', 1000));
    long_key.push(0xc0);
    v.push(long_key);
    // A Hello whose engine list announces 65535 entries.
    let mut hello = vec![0x81, 0xa5];
    hello.extend_from_slice(b"Hello");
    hello.extend_from_slice(&[0x81, 0xa7]);
    hello.extend_from_slice(b"engines");
    hello.extend_from_slice(&[0xdc, 0xff, 0xff]);
    v.push(hello);
    v
}

/// Upper bound for one portable decode in a std build (see the file's docs): the lossy UTF-8
/// copy of a name of at most 1019 bytes starts at the name's length and doubles until it holds
/// three bytes per input byte: 1019 + 1019 + 2038 = 4076 bytes measured.
#[cfg(feature = "std")]
const PORTABLE_STD_BOUND: usize = 4 * MAX_FRAME_LEN;

/// What the portable decoder may allocate on arbitrary input in this build.
fn portable_bound() -> usize {
    #[cfg(feature = "std")]
    return PORTABLE_STD_BOUND;
    #[cfg(not(feature = "std"))]
    return 0;
}

#[test]
fn portable_decode_of_hostile_lengths_never_allocates() {
    for body in hostile_bodies() {
        // The invalid-UTF-8 name is the one input a std build's serde copies (see file docs).
        if cfg!(feature = "std") && body.get(1) == Some(&0xc5) {
            continue;
        }
        let f = frame_with_body(&body);
        let (n, bytes) = measure(|| codec::portable::decode_frame(&f));
        assert_eq!(
            (n, bytes),
            (0, 0),
            "portable decode of {:02x?}…",
            &body[..8.min(body.len())]
        );
    }
}

#[test]
fn portable_decode_allocation_is_bounded_on_hostile_input() {
    for body in hostile_bodies() {
        let f = frame_with_body(&body);
        let (_, bytes) = measure(|| codec::portable::decode_frame(&f));
        assert!(
            bytes <= portable_bound(),
            "portable decode of {:02x?}… allocated {bytes} bytes",
            &body[..8.min(body.len())]
        );
    }
}

#[test]
fn valid_messages_never_allocate_in_the_portable_codec() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for _ in 0..500 {
        let m = arbitrary::message()
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let mut buf = [0u8; MAX_FRAME_LEN];
        let (n, _) = measure(|| codec::portable::encode_frame(&m, &mut buf).unwrap());
        assert_eq!(n, 0, "portable encode of {m:?} allocated");
        let len = codec::portable::encode_frame(&m, &mut buf).unwrap();
        let (n, _) = measure(|| codec::portable::decode_frame(&buf[..len]).unwrap());
        assert_eq!(n, 0, "portable decode of {m:?} allocated");
    }
}

#[cfg(feature = "std")]
#[test]
fn rmp_decode_allocation_is_bounded_on_hostile_input() {
    for body in hostile_bodies() {
        let f = frame_with_body(&body);
        let (_, bytes) = measure(|| decode_frame(&f));
        assert!(
            bytes <= RMP_BOUND,
            "rmp-serde decode of {:02x?}… allocated {bytes} bytes",
            &body[..8.min(body.len())]
        );
    }
}

#[test]
fn frame_reader_refuses_oversized_frames_without_allocating() {
    // The reader is a fixed buffer: pushing and refusing an oversized frame is free.
    let mut r = FrameReader::new();
    let (n, _) = measure(|| {
        r.push(&[0xff, 0xff, 0xff, 0xff, 1, 0]);
        r.next_frame().is_err()
    });
    assert_eq!(n, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn random_frames_allocate_little(
        body in proptest::collection::vec(any::<u8>(), 0..=MAX_BODY_LEN),
        raw in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let f = frame_with_body(&body);
        #[cfg(feature = "std")]
        {
            let (_, bytes) = measure(|| decode_frame(&f));
            prop_assert!(bytes <= RMP_BOUND, "rmp-serde allocated {} bytes", bytes);
        }
        let (_, bytes) = measure(|| codec::portable::decode_frame(&f));
        prop_assert!(bytes <= portable_bound(), "portable decode allocated {} bytes", bytes);
        let (_, bytes) = measure(|| codec::portable::decode_frame(&raw));
        prop_assert!(bytes <= portable_bound());
    }

    #[test]
    fn valid_messages_decode_with_bounded_allocation(m in arbitrary::message()) {
        let mut buf = [0u8; MAX_FRAME_LEN];
        let len = encode_frame(&m, &mut buf).unwrap();
        let (_, bytes) = measure(|| decode_frame(&buf[..len]).unwrap());
        let bound = if cfg!(feature = "std") { RMP_BOUND } else { 0 };
        prop_assert!(bytes <= bound, "{} bytes for {:?}", bytes, m);
        let _: &Message = &m;
    }
}
