//! MCU datagrams: golden bytes of the header, round trips through both codecs, hostile input,
//! and the replay window checked against a naive model on random arrival orders.

mod arbitrary;

use proptest::prelude::*;
use std::collections::BTreeSet;
use voicemesh_protocol::datagram::{
    DATAGRAM_HEADER_LEN, DatagramError, DatagramHeader, MAX_DATAGRAM_LEN, REPLAY_WINDOW,
    ReplayWindow, SeqVerdict, decode_datagram, decode_datagram_with, encode_datagram, parse_header,
};
use voicemesh_protocol::{ClusterTime, Heartbeat, Message, codec, decode_frame};

fn hex(s: &str) -> Vec<u8> {
    let d: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..d.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&d[i..i + 2], 16).unwrap())
        .collect()
}

/// The coordinator's opening datagram: session 0x01020304, seq 0, `Heartbeat { seq: 0, now:
/// 1 000 000 000 }` (docs/wire-protocol.md "MCU datagrams" shows it byte by byte).
const GOLDEN_HEARTBEAT: &str = "
    56 4d 01 00  01 02 03 04  00 00 00 00
    00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
    00 00 00 1c 01 02
    81 a9 48 65 61 72 74 62 65 61 74 82 a3 73 65 71 00 a3 6e 6f 77 ce 3b 9a ca 00";

#[test]
fn golden_datagram_both_codecs() {
    let golden = hex(GOLDEN_HEARTBEAT);
    let hd = DatagramHeader {
        session: 0x0102_0304,
        seq: 0,
    };
    let msg = Message::Heartbeat(Heartbeat {
        seq: 0,
        now: ClusterTime(1_000_000_000),
    });
    let mut buf = [0u8; MAX_DATAGRAM_LEN];
    let n = encode_datagram(hd, &msg, &mut buf).unwrap();
    assert_eq!(&buf[..n], &golden[..]);
    for decode in [decode_frame, codec::portable::decode_frame] {
        let (h, f) = decode_datagram_with(&golden, decode).unwrap();
        assert_eq!((h, f.message.clone()), (hd, msg.clone()));
    }
}

#[test]
fn other_protocol_major_inside_a_datagram_is_a_clear_error() {
    let mut d = hex(GOLDEN_HEARTBEAT);
    d[DATAGRAM_HEADER_LEN + 4] = 2;
    let e = decode_datagram(&d).unwrap_err();
    assert!(e.to_string().contains("upgrade the older side"), "{e}");
    d[2] = 9;
    assert_eq!(
        decode_datagram(&d).unwrap_err(),
        DatagramError::UnsupportedVersion(9)
    );
}

/// The reference: a set of every (seq) accepted in the current session and the top.
#[derive(Default)]
struct Model {
    session: Option<u32>,
    seen: BTreeSet<u32>,
}

impl Model {
    fn check(&mut self, h: DatagramHeader) -> SeqVerdict {
        if self.session != Some(h.session) {
            self.session = Some(h.session);
            self.seen = BTreeSet::from([h.seq]);
            return SeqVerdict::Fresh;
        }
        let top = *self.seen.last().unwrap();
        if h.seq > top {
            self.seen.insert(h.seq);
            SeqVerdict::Fresh
        } else if top - h.seq >= REPLAY_WINDOW {
            SeqVerdict::TooOld
        } else if !self.seen.insert(h.seq) {
            SeqVerdict::Duplicate
        } else {
            SeqVerdict::Reordered
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn datagrams_round_trip_with_both_codecs(
        m in arbitrary::message(), session in any::<u32>(), seq in any::<u32>()
    ) {
        let hd = DatagramHeader { session, seq };
        let mut buf = [0u8; MAX_DATAGRAM_LEN];
        let n = encode_datagram(hd, &m, &mut buf).expect("every message fits a datagram");
        for decode in [decode_frame, codec::portable::decode_frame] {
            let (h, f) = decode_datagram_with(&buf[..n], decode).unwrap();
            prop_assert_eq!(h, hd);
            prop_assert_eq!(&f.message, &m);
        }
    }

    #[test]
    fn hostile_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200), valid_head in any::<bool>()) {
        let mut b = bytes;
        if valid_head && b.len() >= DATAGRAM_HEADER_LEN {
            b[..4].copy_from_slice(&[b'V', b'M', 1, 0]);
            b[12..DATAGRAM_HEADER_LEN].fill(0);
        }
        let _ = parse_header(&b);
        let a = decode_datagram_with(&b, decode_frame);
        let p = decode_datagram_with(&b, codec::portable::decode_frame);
        if let (Ok(a), Ok(p)) = (&a, &p) {
            prop_assert_eq!(a, p);
        }
    }

    /// Random arrival orders with duplicates, losses, jumps and a peer restart: the window
    /// agrees with the model on every datagram, and its counters add up.
    #[test]
    fn replay_window_matches_the_model(
        ops in proptest::collection::vec((0u32..200, 0u8..20), 1..300)
    ) {
        let mut w = ReplayWindow::new();
        let mut m = Model::default();
        let (mut fresh, mut reordered, mut dup, mut old) = (0u32, 0u32, 0u32, 0u32);
        for (seq, r) in ops {
            let session = if r == 0 { 2 } else { 1 };
            let h = DatagramHeader { session, seq };
            let v = w.check(h);
            prop_assert_eq!(v, m.check(h), "seq {} session {}", seq, session);
            match v {
                SeqVerdict::Fresh => fresh += 1,
                SeqVerdict::Reordered => reordered += 1,
                SeqVerdict::Duplicate => dup += 1,
                SeqVerdict::TooOld => old += 1,
            }
        }
        let c = w.counters();
        prop_assert_eq!(c.accepted, fresh + reordered);
        prop_assert_eq!(c.reordered, reordered);
        prop_assert_eq!(c.duplicates, dup);
        prop_assert_eq!(c.replays, old);
    }
}
