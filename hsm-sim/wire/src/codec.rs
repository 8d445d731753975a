//! Primitive encoding: big-endian integers, length-prefixed byte strings and lists, whole frames on
//! a stream, and the zeroizing buffer types.
//!
//! Owns every bounds check of the format. Must never allocate a length read from the wire before
//! checking it against both its field limit and the bytes actually left in the frame, and never
//! panic on any input.

use std::fmt;
use std::io::{self, Read, Write};

use zeroize::Zeroize;

use crate::MAX_FRAME;

/// Why a frame could not be decoded. Carries only static names and numbers, never frame contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// The frame ended inside `field`.
    Truncated { field: &'static str },
    /// `field` declared `len` items or bytes, more than its limit `max`.
    TooLong { field: &'static str, len: u64, max: u64 },
    /// `field` carried a tag this version does not define.
    BadTag { field: &'static str, tag: u8 },
    /// The header's version byte is not [`crate::VERSION`].
    BadVersion { version: u8 },
    /// The header's kind byte is neither request nor response.
    BadKind { kind: u8 },
    /// The header names no known operation.
    UnknownOp { op: u16 },
    /// A response answered another operation than the request it claims to answer.
    OpMismatch { expected: u16, got: u16 },
    /// The frame has bytes after its last field.
    TrailingBytes { count: usize },
    /// A nested template inside a nested template.
    NestingTooDeep,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated { field } => write!(f, "frame ends inside {field}"),
            WireError::TooLong { field, len, max } => write!(f, "{field} of {len} is over the limit of {max}"),
            WireError::BadTag { field, tag } => write!(f, "unknown tag {tag} in {field}"),
            WireError::BadVersion { version } => {
                write!(f, "protocol version {version}, expected {}", crate::VERSION)
            }
            WireError::BadKind { kind } => write!(f, "unknown frame kind {kind}"),
            WireError::UnknownOp { op } => write!(f, "unknown operation {op}"),
            WireError::OpMismatch { expected, got } => {
                write!(f, "response for operation {got} to a request for operation {expected}")
            }
            WireError::TrailingBytes { count } => write!(f, "{count} bytes after the last field"),
            WireError::NestingTooDeep => f.write_str("a nested template inside a nested template"),
        }
    }
}

impl std::error::Error for WireError {}

/// A byte string from or for the wire: zeroized when dropped, shown in `Debug` by length only.
/// PINs, key values, plaintexts and ciphertexts all travel as `Blob`s.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Blob(Vec<u8>);

impl Blob {
    pub fn new(bytes: Vec<u8>) -> Blob {
        Blob(bytes)
    }

    pub fn from_slice(bytes: &[u8]) -> Blob {
        Blob(bytes.to_vec())
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Mutable access (cryptoki's GCM parameters take the IV mutably).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl From<Vec<u8>> for Blob {
    fn from(v: Vec<u8>) -> Blob {
        Blob(v)
    }
}

impl std::ops::Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Blob {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

/// An encoded frame (length prefix included), zeroized when dropped.
pub struct Frame(Vec<u8>);

impl Frame {
    /// The whole frame, length prefix first, ready to write.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The body (after the 4-byte length prefix).
    pub fn body(&self) -> &[u8] {
        self.0.get(4..).unwrap_or(&[])
    }

    /// A frame around a body read from a stream.
    pub fn from_body(body: &[u8]) -> Result<Frame, WireError> {
        if body.len() > MAX_FRAME {
            return Err(WireError::TooLong { field: "frame", len: body.len() as u64, max: MAX_FRAME as u64 });
        }
        let mut v = Vec::with_capacity(body.len() + 4);
        // Lossless: checked against MAX_FRAME (16 MiB) above.
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(body);
        Ok(Frame(v))
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frame(<{} bytes>)", self.0.len())
    }
}

/// Builds one frame. The length prefix is filled in by [`Encoder::finish`].
pub struct Encoder {
    buf: Vec<u8>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    pub fn new() -> Encoder {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&[0, 0, 0, 0]);
        Encoder { buf }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// A length-prefixed byte string. Lengths beyond `u32` cannot pass the decoder's limits, so
    /// they are clamped here (the frame is then refused by the peer, never misread).
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.buf.extend_from_slice(v);
        self
    }

    pub fn opt_bytes(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            Some(b) => self.u8(1).bytes(b),
            None => self.u8(0),
        }
    }

    /// A list count (see [`Encoder::bytes`] on clamping).
    pub fn count(&mut self, n: usize) -> &mut Self {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX))
    }

    pub fn u64_list(&mut self, v: &[u64]) -> &mut Self {
        self.count(v.len());
        for x in v {
            self.u64(*x);
        }
        self
    }

    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// Bytes written so far, the length prefix excluded.
    pub fn body_len(&self) -> usize {
        self.buf.len() - 4
    }

    /// Fills in the length prefix. A body over [`MAX_FRAME`] gets a prefix the peer refuses.
    pub fn finish(mut self) -> Frame {
        let len = u32::try_from(self.body_len()).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&len.to_be_bytes());
        Frame(std::mem::take(&mut self.buf))
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

/// Reads one frame body, field by field, with every length checked.
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(body: &'a [u8]) -> Decoder<'a> {
        Decoder { buf: body, pos: 0 }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated { field })?;
        let s = self.buf.get(self.pos..end).ok_or(WireError::Truncated { field })?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let s = self.take(N, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    pub fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(WireError::BadTag { field, tag }),
        }
    }

    pub fn fixed<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        self.array(field)
    }

    /// A length-prefixed byte string of at most `max` bytes.
    pub fn bytes(&mut self, field: &'static str, max: usize) -> Result<Blob, WireError> {
        let len = self.u32(field)? as usize;
        if len > max {
            return Err(WireError::TooLong { field, len: len as u64, max: max as u64 });
        }
        Ok(Blob(self.take(len, field)?.to_vec()))
    }

    pub fn opt_bytes(&mut self, field: &'static str, max: usize) -> Result<Option<Blob>, WireError> {
        if self.bool(field)? {
            Ok(Some(self.bytes(field, max)?))
        } else {
            Ok(None)
        }
    }

    /// A list count of at most `max`, also checked against the bytes left (each item is at least
    /// `min_item` bytes), so that no count can make the reader allocate more than the frame holds.
    pub fn count(&mut self, field: &'static str, max: usize, min_item: usize) -> Result<usize, WireError> {
        let n = self.u32(field)? as usize;
        if n > max {
            return Err(WireError::TooLong { field, len: n as u64, max: max as u64 });
        }
        if n.saturating_mul(min_item.max(1)) > self.remaining() {
            return Err(WireError::Truncated { field });
        }
        Ok(n)
    }

    pub fn u64_list(&mut self, field: &'static str, max: usize) -> Result<Vec<u64>, WireError> {
        let n = self.count(field, max, 8)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.u64(field)?);
        }
        Ok(v)
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Refuses trailing bytes: a frame is exactly its fields.
    pub fn finish(self) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(WireError::TrailingBytes { count }),
        }
    }
}

/// Reads one frame body from a blocking stream: `Ok(None)` on a clean end of stream before a frame
/// starts. A declared length over [`MAX_FRAME`] is an `InvalidData` error (nothing is allocated).
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<Blob>> {
    read_frame_up_to(r, MAX_FRAME)
}

/// [`read_frame`] with another size limit (for a link that adds its own fields to each frame).
pub fn read_frame_up_to(r: &mut impl Read, max: usize) -> io::Result<Option<Blob>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame over the size limit"));
    }
    let mut body = Blob(vec![0u8; len]);
    r.read_exact(&mut body.0)?;
    Ok(Some(body))
}

/// Writes one frame and flushes.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> io::Result<()> {
    w.write_all(frame.as_bytes())?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_checked_before_allocation() {
        let mut e = Encoder::new();
        e.u32(u32::MAX);
        let f = e.finish();
        let mut d = Decoder::new(f.body());
        assert!(matches!(d.bytes("x", 10), Err(WireError::TooLong { .. })));
        let mut d = Decoder::new(f.body());
        assert!(matches!(d.count("x", usize::MAX, 8), Err(WireError::Truncated { .. })));
    }

    #[test]
    fn blob_debug_shows_only_the_length() {
        assert_eq!(format!("{:?}", Blob::from_slice(b"secret")), "<6 bytes>");
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_unread() {
        let mut stream: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        assert_eq!(read_frame(&mut stream).unwrap_err().kind(), io::ErrorKind::InvalidData);
        let mut empty: &[u8] = &[];
        assert!(read_frame(&mut empty).unwrap().is_none());
    }
}
