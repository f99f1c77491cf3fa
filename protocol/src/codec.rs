//! Length-prefixed frames: `[len: u32 BE][major][minor][MessagePack body]`.

use crate::msg::Message;
use crate::{PROTOCOL_MINOR, PROTOCOL_VERSION};
use core::fmt;

/// Bytes before the MessagePack body: length (4) and version (2).
pub const FRAME_HEADER_LEN: usize = 6;
/// Largest body a frame may carry. Larger frames are refused before anything is read.
pub const MAX_BODY_LEN: usize = 1024;
/// Largest whole frame.
pub const MAX_FRAME_LEN: usize = FRAME_HEADER_LEN + MAX_BODY_LEN;

/// A decoded frame: the sender's version and the message.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// Sender's minor version (the major version matched ours).
    pub minor: u8,
    /// The message.
    pub message: Message,
}

/// Why a frame could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the header or the announced length; read more and try again.
    Incomplete {
        /// Bytes the whole frame needs (the header's size while the length is unknown).
        needed: usize,
    },
    /// The length field announces a body larger than [`MAX_BODY_LEN`].
    TooLong {
        /// The announced body length.
        len: u32,
    },
    /// The length field is smaller than the version bytes it must cover.
    TooShort,
    /// The sender speaks another major version.
    VersionMismatch {
        /// The sender's major version.
        theirs: u8,
        /// Ours.
        ours: u8,
    },
    /// The body is not a valid message of this version.
    BadBody,
    /// The body decoded but bytes were left over after the message.
    TrailingBytes,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Incomplete { needed } => {
                write!(f, "incomplete frame: {needed} bytes needed")
            }
            DecodeError::TooLong { len } => {
                write!(
                    f,
                    "frame body of {len} bytes exceeds the limit of {MAX_BODY_LEN}"
                )
            }
            DecodeError::TooShort => write!(f, "frame length is shorter than its version header"),
            DecodeError::VersionMismatch { theirs, ours } => write!(
                f,
                "peer speaks VoiceMesh protocol {theirs}.x, this build speaks {ours}.x: upgrade the older side"
            ),
            DecodeError::BadBody => write!(f, "frame body is not a valid VoiceMesh message"),
            DecodeError::TrailingBytes => write!(f, "frame body has bytes after the message"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// Why a message could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// The output buffer is too small, or the body would exceed [`MAX_BODY_LEN`].
    BufferTooSmall,
    /// The serializer failed.
    Serialize,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::BufferTooSmall => write!(f, "message does not fit the frame buffer"),
            EncodeError::Serialize => write!(f, "message could not be serialized"),
        }
    }
}

impl core::error::Error for EncodeError {}

/// Length of the whole frame at the start of `buf`, once its header is there.
///
/// Stream readers use it to know how many bytes to wait for. Checks the length bound, not the
/// version.
pub fn frame_len(buf: &[u8]) -> Result<usize, DecodeError> {
    if buf.len() < 4 {
        return Err(DecodeError::Incomplete {
            needed: FRAME_HEADER_LEN,
        });
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 2 {
        return Err(DecodeError::TooShort);
    }
    if len as usize - 2 > MAX_BODY_LEN {
        return Err(DecodeError::TooLong { len: len - 2 });
    }
    Ok(4 + len as usize)
}

/// Decodes the frame at the start of `buf`; returns it and the number of bytes it took.
///
/// Uses `rmp-serde` with the `std` feature and `messagepack-serde` without; [`portable`] always
/// uses the latter.
pub fn decode_frame(buf: &[u8]) -> Result<(Frame, usize), DecodeError> {
    #[cfg(feature = "std")]
    return decode_frame_with(buf, decode_body_rmp);
    #[cfg(not(feature = "std"))]
    return decode_frame_with(buf, portable::decode_body);
}

fn decode_frame_with(
    buf: &[u8],
    decode_body: fn(&[u8]) -> Result<Message, DecodeError>,
) -> Result<(Frame, usize), DecodeError> {
    let total = frame_len(buf)?;
    if buf.len() < FRAME_HEADER_LEN.max(total) {
        return Err(DecodeError::Incomplete { needed: total });
    }
    let (major, minor) = (buf[4], buf[5]);
    if major != PROTOCOL_VERSION {
        return Err(DecodeError::VersionMismatch {
            theirs: major,
            ours: PROTOCOL_VERSION,
        });
    }
    let message = decode_body(&buf[FRAME_HEADER_LEN..total])?;
    Ok((Frame { minor, message }, total))
}

#[cfg(feature = "std")]
fn decode_body_rmp(body: &[u8]) -> Result<Message, DecodeError> {
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(body));
    // Messages nest four levels at most; refuse deeper input before it costs stack.
    de.set_max_depth(8);
    let msg =
        <Message as serde::Deserialize>::deserialize(&mut de).map_err(|_| DecodeError::BadBody)?;
    if de.position() as usize == body.len() {
        Ok(msg)
    } else {
        Err(DecodeError::TrailingBytes)
    }
}

/// The `messagepack-serde` codec, the one the firmware uses, available on every build so
/// tests can prove it and `rmp-serde` agree byte for byte.
pub mod portable {
    use super::*;

    /// [`decode_frame`](super::decode_frame) through `messagepack-serde`.
    pub fn decode_frame(buf: &[u8]) -> Result<(Frame, usize), DecodeError> {
        decode_frame_with(buf, decode_body)
    }

    /// [`encode_frame`](super::encode_frame) through `messagepack-serde`.
    pub fn encode_frame(msg: &Message, out: &mut [u8]) -> Result<usize, EncodeError> {
        encode_frame_with(msg, out, encode_body)
    }

    pub(super) fn decode_body(body: &[u8]) -> Result<Message, DecodeError> {
        use messagepack_serde::messagepack_core::io::{IoRead, RError, Reference, SliceReader};

        /// A slice reader that leaves behind how much it consumed, to detect trailing bytes.
        struct Counting<'de, 'c> {
            inner: SliceReader<'de>,
            consumed: &'c core::cell::Cell<usize>,
        }
        impl<'de> IoRead<'de> for Counting<'de, '_> {
            type Error = RError;
            fn read_slice<'a>(&'a mut self, len: usize) -> Result<Reference<'de, 'a>, RError> {
                let r = self.inner.read_slice(len)?;
                self.consumed.set(self.consumed.get() + len);
                Ok(r)
            }
        }

        let consumed = core::cell::Cell::new(0);
        let reader = Counting {
            inner: SliceReader::new(body),
            consumed: &consumed,
        };
        let msg =
            messagepack_serde::de::from_core_reader(reader).map_err(|_| DecodeError::BadBody)?;
        if consumed.get() == body.len() {
            Ok(msg)
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }

    pub(super) fn encode_body(msg: &Message, out: &mut [u8]) -> Result<usize, EncodeError> {
        use messagepack_serde::ser::Error;
        messagepack_serde::to_slice(msg, out).map_err(|e| match e {
            Error::Encode(_) => EncodeError::BufferTooSmall,
            _ => EncodeError::Serialize,
        })
    }
}

/// Encodes `msg` as a frame into `out`; returns the frame's length.
pub fn encode_frame(msg: &Message, out: &mut [u8]) -> Result<usize, EncodeError> {
    #[cfg(feature = "std")]
    return encode_frame_with(msg, out, encode_body_rmp);
    #[cfg(not(feature = "std"))]
    return encode_frame_with(msg, out, portable::encode_body);
}

fn encode_frame_with(
    msg: &Message,
    out: &mut [u8],
    encode_body: fn(&Message, &mut [u8]) -> Result<usize, EncodeError>,
) -> Result<usize, EncodeError> {
    if out.len() < FRAME_HEADER_LEN {
        return Err(EncodeError::BufferTooSmall);
    }
    let cap = (out.len() - FRAME_HEADER_LEN).min(MAX_BODY_LEN);
    let body_len = encode_body(msg, &mut out[FRAME_HEADER_LEN..FRAME_HEADER_LEN + cap])?;
    let len = (body_len + 2) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out[4] = PROTOCOL_VERSION;
    out[5] = PROTOCOL_MINOR;
    Ok(FRAME_HEADER_LEN + body_len)
}

#[cfg(feature = "std")]
fn encode_body_rmp(msg: &Message, out: &mut [u8]) -> Result<usize, EncodeError> {
    let cap = out.len();
    let mut cursor = std::io::Cursor::new(out);
    let mut ser = rmp_serde::Serializer::new(&mut cursor).with_struct_map();
    serde::Serialize::serialize(msg, &mut ser).map_err(|e| match e {
        rmp_serde::encode::Error::InvalidValueWrite(_) => EncodeError::BufferTooSmall,
        _ => EncodeError::Serialize,
    })?;
    let n = cursor.position() as usize;
    debug_assert!(n <= cap);
    Ok(n)
}

/// Encodes `msg` as a frame into a new vector.
#[cfg(feature = "std")]
pub fn encode_frame_vec(msg: &Message) -> Result<std::vec::Vec<u8>, EncodeError> {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let n = encode_frame(msg, &mut buf)?;
    Ok(buf[..n].to_vec())
}
