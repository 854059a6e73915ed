//! Length-prefixed framing: `u32` little-endian payload length, then the
//! payload. Payloads are bounded by [`MAX_FRAME`] so neither side can be made
//! to allocate without limit.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

/// Largest payload either side sends or accepts.
pub const MAX_FRAME: usize = 1 << 20;

/// Size of the data chunks streamed in `Stdout`, `Stderr`, `FileData`, ...:
/// large enough to keep per-frame overhead small, well under [`MAX_FRAME`].
pub const DATA_CHUNK: usize = 256 * 1024;

#[derive(Debug, Error)]
pub enum FrameError {
    /// The stream ended cleanly between frames.
    #[error("connection closed")]
    Closed,
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    /// The length prefix exceeds [`MAX_FRAME`]; the frame's bytes were skipped
    /// so the stream stays usable.
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    Oversized(u64),
    /// The payload is not a valid message; the stream stays usable.
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame encoding failed: {0}")]
    Encode(String),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl FrameError {
    /// Whether the stream can still be read after this error (the bad frame
    /// was consumed whole).
    pub fn is_recoverable(&self) -> bool {
        matches!(self, FrameError::Oversized(_) | FrameError::Malformed(_))
    }
}

/// Encodes a message into one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    // Reserve the length prefix, then append the payload after it.
    let mut buf =
        postcard::to_extend(msg, vec![0u8; 4]).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::Encode(format!(
            "message of {len} bytes exceeds the {MAX_FRAME}-byte frame limit"
        )));
    }
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

/// Decodes one frame payload (without its length prefix).
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) =
        postcard::take_from_bytes(payload).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Reads frames from a byte stream.
pub struct FrameReader<R> {
    inner: R,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner }
    }

    /// Reads one frame's payload.
    pub fn read_payload(&mut self) -> Result<Vec<u8>, FrameError> {
        let mut len = [0u8; 4];
        match read_full(&mut self.inner, &mut len)? {
            0 => return Err(FrameError::Closed),
            4 => {}
            got => return Err(FrameError::Truncated { got, want: 4 }),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            // Skip the payload so the next frame starts where it should.
            let skipped = io::copy(&mut (&mut self.inner).take(len as u64), &mut io::sink())?;
            if skipped < len as u64 {
                return Err(FrameError::Truncated {
                    got: skipped as usize,
                    want: len,
                });
            }
            return Err(FrameError::Oversized(len as u64));
        }
        let mut payload = vec![0u8; len];
        let got = read_full(&mut self.inner, &mut payload)?;
        if got < len {
            return Err(FrameError::Truncated { got, want: len });
        }
        Ok(payload)
    }

    /// Reads and decodes one message.
    pub fn read<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        decode(&self.read_payload()?)
    }
}

/// Writes frames to a byte stream.
pub struct FrameWriter<W> {
    inner: W,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter { inner }
    }

    /// Encodes and writes one message, then flushes.
    pub fn write<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let frame = encode(msg)?;
        self.inner.write_all(&frame)?;
        self.inner.flush()?;
        Ok(())
    }
}

/// Fills `buf` unless the stream ends first; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
