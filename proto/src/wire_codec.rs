//! Framing: a `u32` big-endian length, then that many bytes of postcard.
//! Also version negotiation and the module's error type.

use super::{Message, VersionRange};

/// Size of the length prefix in front of every frame.
pub const LEN_PREFIX: usize = 4;

/// Largest payload a frame may carry (the prefix not included). Checked from
/// the prefix alone, before anything is allocated for the payload.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// A decoder keeps a buffer this large between frames and drops larger ones,
/// so an idle connection does not pin a megabyte.
pub(super) const KEEP_BUFFER: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: u64, max: usize },
    #[error("malformed frame: {source}")]
    Malformed {
        #[source]
        source: postcard::Error,
    },
    #[error("malformed frame: {extra} bytes left over after the message")]
    TrailingBytes { extra: usize },
    #[error(
        "stream ended in the middle of a frame: {buffered} of {} bytes received",
        .expected.map_or_else(|| "at least 4".to_owned(), |n| n.to_string())
    )]
    Truncated {
        buffered: usize,
        expected: Option<usize>,
    },
    #[error("cannot encode {message} message: {source}")]
    Encode {
        message: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("{what} has {count} entries, more than the {max} allowed")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("invalid protocol version range {min}..={max}: versions start at 1 and min must not exceed max")]
    InvalidVersionRange { min: u16, max: u16 },
    #[error("no common protocol version: we speak {ours}, the peer speaks {theirs}")]
    NoCommonVersion {
        ours: VersionRange,
        theirs: VersionRange,
    },
    #[error("the peer chose protocol version {chosen}, but we speak {ours}")]
    UnsupportedVersion { chosen: u16, ours: VersionRange },
}

/// The version two peers use: the highest both speak.
pub fn negotiate(ours: VersionRange, theirs: VersionRange) -> Result<u16, WireError> {
    let low = ours.min().max(theirs.min());
    let high = ours.max().min(theirs.max());
    if low > high {
        return Err(WireError::NoCommonVersion { ours, theirs });
    }
    Ok(high)
}

/// Checks the version a peer chose for us (the cell's view of
/// [`HelloAck::version`](super::HelloAck::version)).
pub fn check_chosen_version(ours: VersionRange, chosen: u16) -> Result<u16, WireError> {
    if ours.contains(chosen) {
        Ok(chosen)
    } else {
        Err(WireError::UnsupportedVersion { chosen, ours })
    }
}

/// Encodes one message as a complete frame.
pub fn encode(msg: &Message) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Appends one message as a complete frame to `out`. On error `out` is left
/// as it was.
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    msg.check_limits()?;
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    let mut sink = Append {
        out,
        start: start + LEN_PREFIX,
        overflow: false,
    };
    let result = postcard::serialize_with_flavor(msg, &mut sink);
    let overflow = sink.overflow;
    let len = out.len() - start - LEN_PREFIX;
    let err = match result {
        Ok(()) => match u32::try_from(len) {
            Ok(prefix) => {
                out[start..start + LEN_PREFIX].copy_from_slice(&prefix.to_be_bytes());
                return Ok(());
            }
            Err(_) => WireError::FrameTooLarge {
                len: len as u64,
                max: MAX_FRAME_LEN,
            },
        },
        Err(_) if overflow => WireError::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME_LEN,
        },
        Err(source) => WireError::Encode {
            message: msg.name(),
            source,
        },
    };
    out.truncate(start);
    Err(err)
}

/// A postcard output appending to a `Vec` that stops a payload from growing
/// past [`MAX_FRAME_LEN`], so encoding an oversized message costs no more
/// memory than the largest valid frame.
struct Append<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
    overflow: bool,
}

impl Append<'_> {
    fn room(&mut self, n: usize) -> postcard::Result<()> {
        if self.out.len() - self.start + n > MAX_FRAME_LEN {
            self.overflow = true;
            return Err(postcard::Error::SerializeBufferFull);
        }
        Ok(())
    }
}

impl postcard::ser_flavors::Flavor for &mut Append<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.room(data.len())?;
        self.out.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.room(1)?;
        self.out.push(byte);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Decodes one payload: exactly one message, nothing left over.
fn decode_payload(payload: &[u8]) -> Result<Message, WireError> {
    let (msg, rest) = postcard::take_from_bytes::<Message>(payload)
        .map_err(|source| WireError::Malformed { source })?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes { extra: rest.len() });
    }
    Ok(msg)
}

/// Turns a byte stream, in chunks of any size, into messages.
///
/// ```
/// # use corral_proto::wire::*;
/// let frame = encode(&Message::Ping { seq: 7 }).unwrap();
/// let mut dec = FrameDecoder::new();
/// let (a, b) = frame.split_at(3);
/// let mut input = a;
/// assert_eq!(dec.decode(&mut input).unwrap(), None); // not yet complete
/// let mut input = b;
/// assert_eq!(dec.decode(&mut input).unwrap(), Some(Message::Ping { seq: 7 }));
/// assert!(input.is_empty());
/// dec.finish().unwrap(); // the stream may end here
/// ```
///
/// Memory: the decoder holds at most one partial frame, grown as its bytes
/// arrive (never on the word of the length prefix alone) and never beyond
/// the maximum frame length. A frame whose prefix exceeds the maximum is
/// refused before any of it is buffered, and leaves the decoder failed: the
/// stream cannot be resynchronised and the connection should be closed. A
/// malformed frame is consumed whole, so decoding could continue after it,
/// but the protocol's answer is to close the connection too
/// ([`CloseCode::Protocol`](super::CloseCode::Protocol)).
#[derive(Debug)]
pub struct FrameDecoder {
    max: usize,
    header: [u8; LEN_PREFIX],
    header_len: usize,
    body: Vec<u8>,
    failed: Option<u64>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::with_max_frame_len(MAX_FRAME_LEN)
    }

    /// A decoder with a smaller (or, up to `u32::MAX`, larger) frame limit.
    pub fn with_max_frame_len(max: usize) -> Self {
        Self {
            max,
            header: [0; LEN_PREFIX],
            header_len: 0,
            body: Vec::new(),
            failed: None,
        }
    }

    pub fn max_frame_len(&self) -> usize {
        self.max
    }

    /// Bytes of an incomplete frame held (prefix included).
    pub fn buffered(&self) -> usize {
        self.header_len + self.body.len()
    }

    /// Bytes allocated for incomplete frames.
    pub fn allocated(&self) -> usize {
        self.body.capacity()
    }

    /// Takes bytes from the front of `input` and returns the next complete
    /// message, if there is one. Returns `Ok(None)` only once all of `input`
    /// has been taken in; call it again while it returns messages. On error,
    /// `input` has advanced past the offending frame (or its prefix).
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Message>, WireError> {
        if let Some(len) = self.failed {
            return Err(self.too_large(len));
        }
        // Fast path: a whole frame in `input` and nothing buffered needs no copy.
        if self.header_len == 0 {
            if let Some((prefix, rest)) = input.split_first_chunk::<LEN_PREFIX>() {
                let len = self.check_len(*prefix)?;
                if let Some((payload, rest)) = rest.split_at_checked(len) {
                    *input = rest;
                    return decode_payload(payload).map(Some);
                }
            }
        }
        while self.header_len < LEN_PREFIX {
            let Some((&byte, rest)) = input.split_first() else {
                return Ok(None);
            };
            self.header[self.header_len] = byte;
            self.header_len += 1;
            *input = rest;
        }
        let len = self.check_len(self.header)?;
        let take = (len - self.body.len()).min(input.len());
        let (now, rest) = input.split_at(take);
        self.grow(len, take);
        self.body.extend_from_slice(now);
        *input = rest;
        if self.body.len() < len {
            return Ok(None);
        }
        self.header_len = 0;
        let result = decode_payload(&self.body);
        self.body.clear();
        if self.body.capacity() > KEEP_BUFFER {
            self.body = Vec::new();
        }
        result.map(Some)
    }

    /// Call when the stream has ended: fails if it ended inside a frame.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.header_len == 0 {
            return Ok(());
        }
        let expected = (self.header_len == LEN_PREFIX)
            .then(|| LEN_PREFIX + u32::from_be_bytes(self.header) as usize);
        Err(WireError::Truncated {
            buffered: self.buffered(),
            expected,
        })
    }

    fn check_len(&mut self, prefix: [u8; LEN_PREFIX]) -> Result<usize, WireError> {
        let len = u32::from_be_bytes(prefix);
        match usize::try_from(len) {
            Ok(len) if len <= self.max => Ok(len),
            _ => {
                self.failed = Some(u64::from(len));
                Err(self.too_large(u64::from(len)))
            }
        }
    }

    fn too_large(&self, len: u64) -> WireError {
        WireError::FrameTooLarge { len, max: self.max }
    }

    /// Makes room for `take` more bytes of a `len`-byte payload: doubling, as
    /// `Vec` would, but never past `len`.
    fn grow(&mut self, len: usize, take: usize) {
        let need = self.body.len() + take;
        if need > self.body.capacity() {
            let target = (self.body.capacity() * 2).clamp(need, len);
            self.body.reserve_exact(target - self.body.len());
        }
    }
}
