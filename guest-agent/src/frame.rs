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
    /// so the stream stays usable (unless the reader was made
    /// [`FrameReader::without_resync`]).
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
    /// Whether an oversized frame's payload is read and dropped so that the
    /// next frame can be read.
    resync: bool,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            resync: true,
        }
    }

    /// A reader for a side that gives up at the first bad frame (the host,
    /// which does not trust the guest): an oversized length is reported as
    /// soon as it is read, instead of after reading the up to 4 GiB it
    /// announces. The stream is not usable after [`FrameError::Oversized`].
    pub fn without_resync(inner: R) -> Self {
        FrameReader {
            inner,
            resync: false,
        }
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
        if len > MAX_FRAME && !self.resync {
            return Err(FrameError::Oversized(len as u64));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails the test if read: nothing past the length prefix may be.
    struct Tripwire;

    impl Read for Tripwire {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            panic!("read past an oversized frame's length prefix");
        }
    }

    #[test]
    fn without_resync_an_oversized_length_is_reported_at_once() {
        for len in [MAX_FRAME as u32 + 1, u32::MAX] {
            let prefix = len.to_le_bytes();
            let mut r = FrameReader::without_resync((&prefix[..]).chain(Tripwire));
            assert!(matches!(
                r.read_payload(),
                Err(FrameError::Oversized(n)) if n == u64::from(len)
            ));
        }
    }

    #[test]
    fn without_resync_frames_up_to_the_limit_are_read() {
        let mut stream = (MAX_FRAME as u32).to_le_bytes().to_vec();
        stream.resize(4 + MAX_FRAME, 7);
        let mut r = FrameReader::without_resync(&stream[..]);
        assert_eq!(r.read_payload().expect("payload").len(), MAX_FRAME);
        assert!(matches!(r.read_payload(), Err(FrameError::Closed)));
    }
}
