//! Decode → encode → decode round-trip soundness of the frame codecs.
//!
//! For any input: no decoder panics; whatever `decode_frame` (rmp-serde) or
//! `codec::portable::decode_frame` (messagepack-serde) accepts re-encodes, with both encoders,
//! to the same bytes, which decode to the same message again; the two decoders agree on the
//! message whenever both accept; and a `FrameReader` fed the input in random chunks yields the
//! same frames, and the same error, as decoding the bytes in one piece.
//!
//! Messages are compared through their `Debug` text so that an f32 NaN equals itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voicemesh_protocol::{
    DecodeError, Frame, FrameReader, MAX_FRAME_LEN, Message, codec, decode_frame, encode_frame,
};

fn same(a: &Message, b: &Message) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

fn check_round_trip(frame: &Frame) {
    let mut a = [0u8; MAX_FRAME_LEN];
    let mut b = [0u8; MAX_FRAME_LEN];
    let na = encode_frame(&frame.message, &mut a).expect("a decoded message re-encodes");
    let nb = codec::portable::encode_frame(&frame.message, &mut b).expect("portable re-encodes");
    assert_eq!(&a[..na], &b[..nb], "encoders disagree on {:?}", frame.message);
    for decode in [decode_frame, codec::portable::decode_frame] {
        let (again, used) = decode(&a[..na]).expect("a re-encoded message decodes");
        assert_eq!(used, na);
        assert!(same(&again.message, &frame.message), "{:?} != {:?}", again.message, frame.message);
    }
}

/// Frames and the final error from decoding `data` in one piece, frame after frame.
fn decode_stream(data: &[u8]) -> (Vec<Message>, Option<DecodeError>) {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        match decode_frame(&data[pos..]) {
            Ok((f, used)) => {
                out.push(f.message);
                pos += used;
            }
            Err(DecodeError::Incomplete { .. }) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

fuzz_target!(|input: &[u8]| {
    // The first byte seeds the chunking of the stream test; the rest is the wire.
    let (seed, data) = match input.split_first() {
        Some((s, d)) => (*s, d),
        None => (0, input),
    };

    let rmp = decode_frame(data);
    let portable = codec::portable::decode_frame(data);
    if let Ok((frame, used)) = &rmp {
        assert!(*used <= data.len());
        check_round_trip(frame);
    }
    if let Ok((frame, used)) = &portable {
        assert!(*used <= data.len());
        check_round_trip(frame);
    }
    if let (Ok((a, ua)), Ok((b, ub))) = (&rmp, &portable) {
        assert_eq!(ua, ub);
        assert!(same(&a.message, &b.message), "decoders disagree: {a:?} vs {b:?}");
    }

    // Stream reassembly with random chunk sizes (xorshift from the seed).
    let (want, want_err) = decode_stream(data);
    let mut state = u32::from(seed) | 0x9e37_0000;
    let mut reader = FrameReader::new();
    let mut got = Vec::new();
    let mut got_err = None;
    let mut rest = data;
    'feed: while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let chunk = (state as usize % 97 + 1).min(rest.len());
        let taken = reader.push(&rest[..chunk]);
        rest = &rest[taken..];
        loop {
            match reader.next_frame() {
                Ok(Some(f)) => got.push(f.message),
                Ok(None) => break,
                Err(e) => {
                    got_err = Some(e);
                    break 'feed;
                }
            }
        }
        assert!(taken > 0, "reader full without a frame or an error");
    }
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!(same(g, w));
    }
    assert_eq!(got_err, want_err);
});
