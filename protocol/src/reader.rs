//! Reassembly of frames from a byte stream (a QUIC stream, a TCP connection).

use crate::codec::{DecodeError, Frame, MAX_FRAME_LEN, decode_frame, frame_len};

/// Collects bytes from a stream and hands out whole frames.
///
/// Call order: [`FrameReader::push`] whatever the stream delivered, then call
/// [`FrameReader::next_frame`] until it returns `Ok(None)`. The buffer is fixed at
/// [`MAX_FRAME_LEN`] bytes; a frame that announces more is an error, and after any error the
/// stream is out of step and must be closed.
#[derive(Debug)]
pub struct FrameReader {
    buf: [u8; MAX_FRAME_LEN],
    len: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    /// An empty reader.
    pub const fn new() -> Self {
        FrameReader {
            buf: [0; MAX_FRAME_LEN],
            len: 0,
        }
    }

    /// The free space to read the stream into; report what was written with [`Self::filled`].
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    /// Marks `n` bytes of [`Self::spare`] as filled.
    pub fn filled(&mut self, n: usize) {
        self.len = (self.len + n).min(MAX_FRAME_LEN);
    }

    /// Copies as much of `bytes` as fits; returns how many were taken.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(MAX_FRAME_LEN - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        n
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        match frame_len(&self.buf[..self.len]) {
            Err(DecodeError::Incomplete { .. }) => return Ok(None),
            Err(e) => return Err(e),
            Ok(total) if total > self.len => return Ok(None),
            Ok(_) => {}
        }
        let (frame, used) = decode_frame(&self.buf[..self.len])?;
        self.buf.copy_within(used..self.len, 0);
        self.len -= used;
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Heartbeat, Message, codec::encode_frame, time::ClusterTime};

    #[test]
    fn reassembles_frames_split_anywhere() {
        let mut wire = [0u8; 256];
        let mut n = 0;
        for seq in 0..3 {
            let m = Message::Heartbeat(Heartbeat {
                seq,
                now: ClusterTime(1_000 + seq as u64),
            });
            n += encode_frame(&m, &mut wire[n..]).unwrap();
        }
        for split in 1..n {
            let mut r = FrameReader::new();
            let mut got = 0u32;
            for chunk in [&wire[..split], &wire[split..n]] {
                assert_eq!(r.push(chunk), chunk.len());
                while let Some(f) = r.next_frame().unwrap() {
                    assert_eq!(
                        f.message,
                        Message::Heartbeat(Heartbeat {
                            seq: got,
                            now: ClusterTime(1_000 + got as u64)
                        })
                    );
                    got += 1;
                }
            }
            assert_eq!(got, 3, "split at {split}");
        }
    }

    #[test]
    fn oversized_frame_is_an_error() {
        let mut r = FrameReader::new();
        r.push(&[0, 1, 0, 0, 1, 0]);
        assert!(matches!(r.next_frame(), Err(DecodeError::TooLong { .. })));
    }
}
