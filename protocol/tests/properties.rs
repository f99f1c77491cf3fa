//! Property tests of the frame codecs: every message round-trips through both codecs and
//! across them, hostile bytes never panic a decoder, and a peer of another major version gets
//! a clear error.

mod arbitrary;

use proptest::prelude::*;
use voicemesh_protocol::{
    ClusterTime, DecodeError, FRAME_HEADER_LEN, FrameReader, Heartbeat, MAX_BODY_LEN,
    MAX_FRAME_LEN, Message, PROTOCOL_VERSION, codec, decode_frame, encode_frame,
};

fn encode_rmp(m: &Message) -> Vec<u8> {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let n = encode_frame(m, &mut buf).expect("every message fits a frame");
    buf[..n].to_vec()
}

fn encode_portable(m: &Message) -> Vec<u8> {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let n = codec::portable::encode_frame(m, &mut buf).expect("every message fits a frame");
    buf[..n].to_vec()
}

/// A valid frame header announcing `body.len()` bytes, followed by `body`.
fn frame_with_body(major: u8, minor: u8, body: &[u8]) -> Vec<u8> {
    let mut f = ((body.len() + 2) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&[major, minor]);
    f.extend_from_slice(body);
    f
}

/// Feeds `bytes` to a [`FrameReader`] in chunks of the given sizes (cycled), collecting frames
/// until the stream ends or errs. Must never panic.
fn read_chunked(bytes: &[u8], chunks: &[usize]) -> (Vec<Message>, Option<DecodeError>) {
    let mut r = FrameReader::new();
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut i = 0;
    loop {
        let want = chunks
            .get(i % chunks.len().max(1))
            .copied()
            .unwrap_or(1)
            .max(1);
        i += 1;
        let take = want.min(rest.len());
        let taken = r.push(&rest[..take]);
        rest = &rest[taken..];
        loop {
            match r.next_frame() {
                Ok(Some(f)) => out.push(f.message),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
        if rest.is_empty() || (taken == 0 && take > 0) {
            return (out, None);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Encode → decode gives the message back, with each codec and across them, and both
    /// codecs write the same bytes.
    #[test]
    fn round_trip_both_codecs_and_across(m in arbitrary::message()) {
        let a = encode_rmp(&m);
        let b = encode_portable(&m);
        prop_assert_eq!(&a, &b, "rmp-serde and messagepack-serde disagree on {:?}", m);
        prop_assert!(a.len() <= MAX_FRAME_LEN);

        for (name, bytes) in [("rmp", &a), ("portable", &b)] {
            let (f, used) = decode_frame(bytes).expect("rmp-serde decodes");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(&f.message, &m, "rmp-serde decoding {} bytes", name);
            let (f, used) = codec::portable::decode_frame(bytes).expect("portable decodes");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(&f.message, &m, "messagepack-serde decoding {} bytes", name);
        }
    }

    /// A stream of frames cut into arbitrary chunks comes out of a FrameReader whole and in
    /// order.
    #[test]
    fn frame_reader_reassembles_any_chunking(
        msgs in proptest::collection::vec(arbitrary::message(), 1..6),
        chunks in proptest::collection::vec(1usize..300, 1..8),
    ) {
        let wire: Vec<u8> = msgs.iter().flat_map(encode_rmp).collect();
        let (got, err) = read_chunked(&wire, &chunks);
        prop_assert_eq!(err, None);
        prop_assert_eq!(got, msgs);
    }

    /// Random bytes never panic any decoder.
    #[test]
    fn random_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..2 * MAX_FRAME_LEN),
        chunks in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let _ = decode_frame(&bytes);
        let _ = codec::portable::decode_frame(&bytes);
        let _ = read_chunked(&bytes, &chunks);
    }

    /// Random bodies behind a valid header reach the MessagePack decoders (instead of being
    /// refused by the header check) and never panic them; both decoders agree on which bodies
    /// are messages and on what they say.
    #[test]
    fn random_bodies_never_panic_and_decoders_agree(
        body in proptest::collection::vec(any::<u8>(), 0..=MAX_BODY_LEN),
    ) {
        let f = frame_with_body(PROTOCOL_VERSION, 0, &body);
        let a = decode_frame(&f).ok().map(|(f, _)| f.message);
        let b = codec::portable::decode_frame(&f).ok().map(|(f, _)| f.message);
        if let (Some(a), Some(b)) = (&a, &b) {
            prop_assert_eq!(a, b);
        }
    }

    /// Valid frames with bytes flipped, cut or inserted never panic; whatever still decodes
    /// re-encodes to a frame that decodes to the same message.
    #[test]
    fn mutated_frames_never_panic(
        m in arbitrary::message(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut f = encode_rmp(&m);
        for (at, byte, op) in edits {
            if f.len() <= FRAME_HEADER_LEN { break; }
            let i = at.index(f.len());
            match op {
                0 => f[i] = byte,
                1 => { f.remove(i); }
                _ => f.insert(i, byte),
            }
        }
        for (frame, _) in [decode_frame(&f), codec::portable::decode_frame(&f)]
            .into_iter()
            .flatten()
        {
            let again = encode_rmp(&frame.message);
            let (back, _) = decode_frame(&again).expect("re-encoded frame decodes");
            prop_assert_eq!(back.message, frame.message);
        }
    }

    /// Any major version but ours is refused before the body is looked at.
    #[test]
    fn other_major_versions_are_refused(major in any::<u8>(), minor in any::<u8>(), m in arbitrary::message()) {
        prop_assume!(major != PROTOCOL_VERSION);
        let mut f = encode_rmp(&m);
        f[4] = major;
        f[5] = minor;
        let want = DecodeError::VersionMismatch { theirs: major, ours: PROTOCOL_VERSION };
        prop_assert_eq!(decode_frame(&f).unwrap_err(), want);
        prop_assert_eq!(codec::portable::decode_frame(&f).unwrap_err(), want);
    }

    /// A newer minor version of the same major is accepted and reported.
    #[test]
    fn newer_minor_versions_are_accepted(minor in any::<u8>(), m in arbitrary::message()) {
        let mut f = encode_rmp(&m);
        f[5] = minor;
        let (frame, _) = decode_frame(&f).unwrap();
        prop_assert_eq!(frame.minor, minor);
        prop_assert_eq!(frame.message, m);
    }
}

#[test]
fn version_2_frame_is_refused_with_a_clear_error() {
    let m = Message::Heartbeat(Heartbeat {
        seq: 1,
        now: ClusterTime(5),
    });
    let mut f = encode_rmp(&m);
    f[4] = 2;
    let want = DecodeError::VersionMismatch { theirs: 2, ours: 1 };
    assert_eq!(decode_frame(&f).unwrap_err(), want);
    assert_eq!(codec::portable::decode_frame(&f).unwrap_err(), want);
    let mut r = FrameReader::new();
    r.push(&f);
    assert_eq!(r.next_frame().unwrap_err(), want);

    let text = want.to_string();
    assert!(text.contains("2.x"), "names their version: {text}");
    assert!(text.contains("1.x"), "names our version: {text}");
    assert!(text.contains("upgrade"), "says what to do: {text}");
}

/// A version-2 frame whose body is not even MessagePack is still reported as a version
/// mismatch, not as a bad body: the version is checked first.
#[test]
fn version_is_checked_before_the_body() {
    let f = frame_with_body(2, 0, &[0xc1, 0xc1, 0xc1]);
    assert_eq!(
        decode_frame(&f).unwrap_err(),
        DecodeError::VersionMismatch { theirs: 2, ours: 1 }
    );
    let f = frame_with_body(1, 0, &[0xc1, 0xc1, 0xc1]);
    assert_eq!(decode_frame(&f).unwrap_err(), DecodeError::BadBody);
    assert_eq!(
        codec::portable::decode_frame(&f).unwrap_err(),
        DecodeError::BadBody
    );
}

#[test]
fn header_bounds_are_enforced() {
    // Body one byte over the limit: refused from the header alone.
    let mut f = ((MAX_BODY_LEN + 3) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&[1, 0]);
    assert_eq!(
        decode_frame(&f).unwrap_err(),
        DecodeError::TooLong {
            len: MAX_BODY_LEN as u32 + 1
        }
    );
    // Length smaller than the version bytes.
    assert_eq!(
        decode_frame(&[0, 0, 0, 1, 1, 0]).unwrap_err(),
        DecodeError::TooShort
    );
    // Truncated frame: asks for the whole frame.
    let m = Message::Heartbeat(Heartbeat {
        seq: 1,
        now: ClusterTime(5),
    });
    let full = encode_rmp(&m);
    assert_eq!(
        decode_frame(&full[..full.len() - 1]).unwrap_err(),
        DecodeError::Incomplete { needed: full.len() }
    );
    // Trailing bytes inside the announced body.
    let mut body = full[FRAME_HEADER_LEN..].to_vec();
    body.push(0xc0);
    let f = frame_with_body(1, 0, &body);
    assert_eq!(decode_frame(&f).unwrap_err(), DecodeError::TrailingBytes);
    assert_eq!(
        codec::portable::decode_frame(&f).unwrap_err(),
        DecodeError::TrailingBytes
    );
}

/// Deeply nested input is refused without exhausting the stack.
#[test]
fn deep_nesting_is_refused() {
    let body: Vec<u8> = std::iter::repeat_n(0x91u8, MAX_BODY_LEN).collect();
    let f = frame_with_body(1, 0, &body);
    assert!(decode_frame(&f).is_err());
    assert!(codec::portable::decode_frame(&f).is_err());
    let body: Vec<u8> = [0x81, 0xa5]
        .into_iter()
        .chain(*b"Hello")
        .chain(std::iter::repeat_n(0x81u8, 900))
        .collect();
    let f = frame_with_body(1, 0, &body);
    assert!(decode_frame(&f).is_err());
    assert!(codec::portable::decode_frame(&f).is_err());
}
