//! Framing of OSC over a TCP stream (sans-IO).
//!
//! Two framings exist. OSC 1.1 uses SLIP (RFC 1055) with an END byte (0xC0) at both ends of
//! every packet ("double-ended" SLIP); OSC 1.0 prefixes each packet with its length as a
//! big-endian int32. A connection's first byte tells which one the peer speaks: a length of at
//! most [`MAX_FRAME`] starts with 0x00, which SLIP never sends first (it starts with END or with
//! the packet's own first byte, `/` or `#`). Replies on the connection use its framing.

use super::DropReason;

/// Largest packet accepted in one frame (the same as the largest UDP datagram read).
pub const MAX_FRAME: usize = 65_536;

const END: u8 = 0xC0;
const ESC: u8 = 0xDB;
const ESC_END: u8 = 0xDC;
const ESC_ESC: u8 = 0xDD;

/// The framing of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// OSC 1.1: double-ended SLIP.
    Slip,
    /// OSC 1.0: int32 length prefix.
    LengthPrefixed,
}

/// Cuts a TCP byte stream into OSC packets.
#[derive(Debug, Default)]
pub struct Deframer {
    framing: Option<Framing>,
    buf: Vec<u8>,
    /// SLIP: the previous byte was ESC.
    escaped: bool,
    /// SLIP: the current frame grew past [`MAX_FRAME`]; its bytes are skipped until END.
    skipping: bool,
    /// Length prefix: an impossible length was read; the stream cannot be resynchronised.
    broken: bool,
}

impl Deframer {
    /// A deframer that learns the framing from the first byte.
    pub fn new() -> Self {
        Self::default()
    }

    /// The framing, once the first byte has arrived.
    pub fn framing(&self) -> Option<Framing> {
        self.framing
    }

    /// Whether the stream is beyond repair (the connection should be closed).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Feeds received bytes; complete packets (or the reason a frame was dropped) are appended
    /// to `out`, in order.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Result<Vec<u8>, DropReason>>) {
        if self.broken {
            return;
        }
        let Some(&first) = data.first() else { return };
        let framing = *self.framing.get_or_insert(if first == 0 {
            Framing::LengthPrefixed
        } else {
            Framing::Slip
        });
        match framing {
            Framing::Slip => self.feed_slip(data, out),
            Framing::LengthPrefixed => self.feed_length(data, out),
        }
    }

    fn feed_slip(&mut self, data: &[u8], out: &mut Vec<Result<Vec<u8>, DropReason>>) {
        for &b in data {
            if b == END {
                if self.skipping {
                    out.push(Err(DropReason::Oversize));
                } else if !self.buf.is_empty() {
                    out.push(Ok(std::mem::take(&mut self.buf)));
                }
                self.buf.clear();
                self.skipping = false;
                self.escaped = false;
                continue;
            }
            if self.skipping {
                continue;
            }
            let byte = if self.escaped {
                self.escaped = false;
                match b {
                    ESC_END => END,
                    ESC_ESC => ESC,
                    // A protocol violation: keep the byte, as RFC 1055 suggests.
                    other => other,
                }
            } else if b == ESC {
                self.escaped = true;
                continue;
            } else {
                b
            };
            if self.buf.len() == MAX_FRAME {
                self.skipping = true;
                self.buf = Vec::new();
                continue;
            }
            self.buf.push(byte);
        }
    }

    fn feed_length(&mut self, data: &[u8], out: &mut Vec<Result<Vec<u8>, DropReason>>) {
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        while let Some(h) = self.buf.get(pos..pos + 4) {
            let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            if len > MAX_FRAME {
                out.push(Err(DropReason::Oversize));
                self.broken = true;
                self.buf = Vec::new();
                return;
            }
            let Some(frame) = self.buf.get(pos + 4..pos + 4 + len) else {
                break;
            };
            if !frame.is_empty() {
                out.push(Ok(frame.to_vec()));
            }
            pos += 4 + len;
        }
        self.buf.drain(..pos);
    }
}

/// `packet` framed for a connection that speaks `framing`.
pub fn frame(framing: Framing, packet: &[u8]) -> Vec<u8> {
    match framing {
        Framing::LengthPrefixed => {
            let mut v = Vec::with_capacity(packet.len() + 4);
            v.extend_from_slice(&(packet.len() as u32).to_be_bytes());
            v.extend_from_slice(packet);
            v
        }
        Framing::Slip => {
            let mut v = Vec::with_capacity(packet.len() + 8);
            v.push(END);
            for &b in packet {
                match b {
                    END => v.extend_from_slice(&[ESC, ESC_END]),
                    ESC => v.extend_from_slice(&[ESC, ESC_ESC]),
                    b => v.push(b),
                }
            }
            v.push(END);
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(d: &mut Deframer, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, DropReason>> {
        let mut out = Vec::new();
        for c in chunks {
            d.feed(c, &mut out);
        }
        out
    }

    #[test]
    fn slip_frames_with_escapes_across_chunks() {
        let p1 = b"/a\0\0,i\0\0\xc0\xdb\0\x01".to_vec();
        let p2 = b"/b\0\0,\0\0\0".to_vec();
        let mut wire = frame(Framing::Slip, &p1);
        wire.extend(frame(Framing::Slip, &p2));
        for cut in 0..wire.len() {
            let mut d = Deframer::new();
            let out = run(&mut d, &[&wire[..cut], &wire[cut..]]);
            assert_eq!(out, vec![Ok(p1.clone()), Ok(p2.clone())], "cut at {cut}");
            assert_eq!(d.framing(), Some(Framing::Slip));
        }
        // Single-ended SLIP (no leading END) works too.
        let mut d = Deframer::new();
        assert_eq!(run(&mut d, &[b"/b\0\0,\0\0\0\xc0"]), vec![Ok(p2)]);
    }

    #[test]
    fn length_prefixed_frames_across_chunks() {
        let p1 = b"/a\0\0,i\0\0\0\0\0\x01".to_vec();
        let mut wire = frame(Framing::LengthPrefixed, &p1);
        wire.extend(frame(Framing::LengthPrefixed, &p1));
        for cut in 1..wire.len() {
            let mut d = Deframer::new();
            let out = run(&mut d, &[&wire[..cut], &wire[cut..]]);
            assert_eq!(out, vec![Ok(p1.clone()), Ok(p1.clone())], "cut at {cut}");
        }
    }

    #[test]
    fn oversize_frames_are_dropped_and_counted() {
        let mut d = Deframer::new();
        let big = vec![b'x'; MAX_FRAME + 10];
        let mut wire = frame(Framing::Slip, &big);
        wire.extend(frame(Framing::Slip, b"/ok\0,\0\0\0"));
        let out = run(&mut d, &[&wire]);
        assert_eq!(
            out,
            vec![Err(DropReason::Oversize), Ok(b"/ok\0,\0\0\0".to_vec())]
        );
        let mut d = Deframer::new();
        let out = run(&mut d, &[&[0, 0x10, 0, 0, 1, 2, 3]]);
        assert_eq!(out, vec![Err(DropReason::Oversize)]);
        assert!(d.is_broken());
    }

    proptest! {
        #[test]
        fn random_streams_never_panic_and_stay_bounded(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..512), 0..16)
        ) {
            let mut d = Deframer::new();
            let mut out = Vec::new();
            for c in &chunks {
                d.feed(c, &mut out);
                prop_assert!(d.buf.len() <= MAX_FRAME + 4 + 512);
            }
            for f in out.iter().flatten() {
                prop_assert!(f.len() <= MAX_FRAME);
            }
        }

        #[test]
        fn slip_round_trip(packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..64), 1..8)) {
            let wire: Vec<u8> = packets.iter().flat_map(|p| frame(Framing::Slip, p)).collect();
            let mut d = Deframer::new();
            let mut out = Vec::new();
            d.feed(&wire, &mut out);
            let got: Vec<Vec<u8>> = out.into_iter().map(|r| r.unwrap()).collect();
            prop_assert_eq!(got, packets);
        }
    }
}
