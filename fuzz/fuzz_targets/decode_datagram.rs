//! MCU datagram soundness: header parsing, both frame codecs inside a datagram, and the
//! replay window.
//!
//! For any input: nothing panics; a datagram either decoder accepts re-encodes to exactly the
//! same bytes (header and frame, since both encoders are byte-identical) and decodes to the
//! same message; the two decoders agree whenever both accept; and a replay window fed the
//! input as a stream of (session, seq) headers never accepts a sequence number twice within
//! a session and keeps its counters consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;
use voicemesh_protocol::datagram::{
    DatagramHeader, MAX_DATAGRAM_LEN, ReplayWindow, decode_datagram_with, encode_datagram,
};
use voicemesh_protocol::{codec, decode_frame};

fuzz_target!(|data: &[u8]| {
    let rmp = decode_datagram_with(data, decode_frame);
    let portable = decode_datagram_with(data, codec::portable::decode_frame);
    for r in [&rmp, &portable] {
        if let Ok((h, f)) = r {
            let mut buf = [0u8; MAX_DATAGRAM_LEN];
            let n = encode_datagram(*h, &f.message, &mut buf).expect("a decoded message re-encodes");
            let (h2, f2) = decode_datagram_with(&buf[..n], codec::portable::decode_frame)
                .expect("a re-encoded datagram decodes");
            assert_eq!(h2, *h);
            assert_eq!(format!("{:?}", f2.message), format!("{:?}", f.message));
        }
    }
    if let (Ok(a), Ok(b)) = (&rmp, &portable) {
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "decoders disagree");
    }

    // Replay window: 3-byte records (session bit, seq u16).
    let mut w = ReplayWindow::new();
    let mut accepted: BTreeSet<(u32, u32)> = BTreeSet::new();
    let mut session = None;
    let mut n_accepted = 0u32;
    for rec in data.chunks_exact(3) {
        let h = DatagramHeader {
            session: u32::from(rec[0] & 1),
            seq: u32::from(u16::from_be_bytes([rec[1], rec[2]])),
        };
        if session != Some(h.session) {
            session = Some(h.session);
            accepted.clear();
        }
        if w.check(h).accept() {
            assert!(accepted.insert((h.session, h.seq)), "accepted twice: {h:?}");
            n_accepted += 1;
        }
    }
    assert_eq!(w.counters().accepted, n_accepted);
});
