//! The frame stream: Ethernet frames each preceded by its length (32-bit,
//! big-endian) on a connected, non-blocking Unix stream socket.
//!
//! [`FrameDecoder`] keeps what was read in one fixed buffer and hands out
//! one whole frame at a time; [`FrameEncoder`] queues whole frames and
//! writes them out as far as the peer takes them, so a partial write never
//! tears a frame. Neither allocates by what the peer or the guest claims: a
//! length outside `1..=MAX_FRAME` is a protocol error.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

/// The length prefix.
pub const PREFIX_LEN: usize = 4;
/// The longest frame, Ethernet header included: passt's own limit for its
/// socket mode (`L2_MAX_LEN_PASST`), in both directions.
pub const MAX_FRAME: usize = 65535;
/// Room for one frame of the largest size being assembled while the end
/// of the previous read (part of the next frame) waits.
const RX_BUFFER: usize = 2 * (PREFIX_LEN + MAX_FRAME);
/// Output queued for the peer at most: a few frames of the largest size,
/// or well over a hundred MTU-sized ones.
const TX_BUFFER: usize = 4 * (PREFIX_LEN + MAX_FRAME);

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the peer announced a frame of {0} bytes; frames are 1 to {MAX_FRAME} bytes")]
    FrameLength(u32),
    #[error("the peer closed the connection")]
    Closed,
    #[error("reading from the peer: {0}")]
    Read(io::Error),
    #[error("writing to the peer: {0}")]
    Write(io::Error),
}

/// Whole frames out of a byte stream read in arbitrary pieces.
pub struct FrameDecoder {
    buf: Box<[u8]>,
    /// `buf[start..end]` is read and not yet consumed.
    start: usize,
    end: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder {
            buf: vec![0u8; RX_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
}

impl FrameDecoder {
    fn buffered(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or_default()
    }

    /// The length of the next frame, once its prefix is complete.
    fn next_len(&self) -> Result<Option<usize>, StreamError> {
        let Some(prefix) = self
            .buffered()
            .get(..PREFIX_LEN)
            .and_then(|p| <[u8; PREFIX_LEN]>::try_from(p).ok())
        else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(prefix);
        match usize::try_from(len) {
            Ok(n) if (1..=MAX_FRAME).contains(&n) => Ok(Some(n)),
            _ => Err(StreamError::FrameLength(len)),
        }
    }

    /// The next frame if all of it has arrived; an error if its prefix is
    /// not a valid length (the stream cannot be resynchronised after that).
    pub fn frame(&self) -> Result<Option<&[u8]>, StreamError> {
        let Some(len) = self.next_len()? else {
            return Ok(None);
        };
        Ok(self.buffered().get(PREFIX_LEN..PREFIX_LEN + len))
    }

    /// Whether a whole frame waits to be taken.
    pub fn has_frame(&self) -> bool {
        matches!(self.frame(), Ok(Some(_)))
    }

    /// Drops the frame [`Self::frame`] returns (nothing if there is none).
    pub fn consume(&mut self) {
        if let Ok(Some(len)) = self.next_len() {
            if PREFIX_LEN + len <= self.end - self.start {
                self.start += PREFIX_LEN + len;
            }
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// The free end of the buffer, after moving what is buffered to the
    /// front: with no whole frame buffered it holds the rest of the
    /// longest frame.
    fn space(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        self.buf.get_mut(self.end..).unwrap_or_default()
    }

    /// Appends what fits of `data`; returns how much did.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let space = self.space();
        let n = space.len().min(data.len());
        space[..n].copy_from_slice(&data[..n]);
        self.end += n;
        n
    }

    /// Reads once from `src`: the byte count, 0 when it would block (or
    /// the buffer is full), [`StreamError::Closed`] at its end.
    pub fn read_from(&mut self, src: &mut impl Read) -> Result<usize, StreamError> {
        loop {
            let space = self.space();
            if space.is_empty() {
                return Ok(0);
            }
            match src.read(space) {
                Ok(0) => return Err(StreamError::Closed),
                Ok(n) => {
                    self.end = (self.end + n).min(self.buf.len());
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) => return Err(StreamError::Read(e)),
            }
        }
    }

    /// Bytes read and not consumed.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buffer's fixed size (what the peer can make the decoder hold).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }
}

/// Whole frames, length-prefixed, waiting for the peer to take them.
pub struct FrameEncoder {
    buf: Vec<u8>,
    /// `buf[sent..]` is still to be written.
    sent: usize,
}

impl Default for FrameEncoder {
    fn default() -> Self {
        FrameEncoder {
            buf: Vec::with_capacity(TX_BUFFER),
            sent: 0,
        }
    }
}

impl FrameEncoder {
    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }

    pub fn is_empty(&self) -> bool {
        self.pending() == 0
    }

    /// Whether a frame of the largest size still fits the bound.
    pub fn has_room(&self) -> bool {
        self.pending() + PREFIX_LEN + MAX_FRAME <= TX_BUFFER
    }

    /// Queues a frame of `len` bytes that `fill` writes in place (straight
    /// from guest memory); if `fill` fails, or `len` is not a valid frame
    /// length, nothing is queued.
    pub fn push_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let prefix = u32::try_from(len)
            .ok()
            .filter(|_| (1..=MAX_FRAME).contains(&len))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if self.sent > 0 {
            self.buf.drain(..self.sent);
            self.sent = 0;
        }
        let at = self.buf.len();
        self.buf.extend_from_slice(&prefix.to_be_bytes());
        self.buf.resize(at + PREFIX_LEN + len, 0);
        let filled = match self.buf.get_mut(at + PREFIX_LEN..) {
            Some(frame) => fill(frame),
            None => Err(io::Error::from(io::ErrorKind::InvalidInput)),
        };
        if filled.is_err() {
            self.buf.truncate(at);
        }
        filled
    }

    /// Queues a copy of `frame`.
    pub fn push(&mut self, frame: &[u8]) -> io::Result<()> {
        self.push_with(frame.len(), |b| {
            b.copy_from_slice(frame);
            Ok(())
        })
    }

    /// Writes queued output until `dst` would block: true when all of it
    /// went out.
    pub fn flush_to(&mut self, dst: &mut impl Write) -> Result<bool, StreamError> {
        while self.sent < self.buf.len() {
            match dst.write(self.buf.get(self.sent..).unwrap_or_default()) {
                Ok(0) => return Err(StreamError::Write(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(StreamError::Write(e)),
            }
        }
        self.buf.clear();
        self.sent = 0;
        Ok(true)
    }
}

/// Writes with MSG_NOSIGNAL: a peer that went away is an EPIPE for the
/// device to handle, not a SIGPIPE for the whole process (a library cannot
/// count on its host program ignoring the signal).
struct NoSigPipe<'a>(&'a UnixStream);

impl Write for NoSigPipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the
        // duration of the call, and the descriptor is a socket we hold.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connected socket with a decoder for what it brings and an encoder for
/// what it takes.
pub struct FrameStream {
    socket: UnixStream,
    pub rx: FrameDecoder,
    pub tx: FrameEncoder,
}

impl FrameStream {
    /// Takes `socket` over and makes it non-blocking.
    pub fn new(socket: UnixStream) -> io::Result<FrameStream> {
        socket.set_nonblocking(true)?;
        Ok(FrameStream {
            socket,
            rx: FrameDecoder::default(),
            tx: FrameEncoder::default(),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// One read from the socket into the decoder (see
    /// [`FrameDecoder::read_from`]).
    pub fn fill(&mut self) -> Result<usize, StreamError> {
        self.rx.read_from(&mut &self.socket)
    }

    /// Writes pending output until the socket would block (see
    /// [`FrameEncoder::flush_to`]).
    pub fn flush(&mut self) -> Result<bool, StreamError> {
        self.tx.flush_to(&mut NoSigPipe(&self.socket))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(frame: &[u8]) -> Vec<u8> {
        let mut v = (frame.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(frame);
        v
    }

    /// Every frame the decoder yields, consuming them.
    fn drain(d: &mut FrameDecoder) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(f) = d.frame().expect("valid stream") {
            out.push(f.to_vec());
            d.consume();
        }
        out
    }

    #[test]
    fn decoder_assembles_frames_from_arbitrary_chunks() {
        let frames: Vec<Vec<u8>> = vec![vec![1; 60], vec![2; 1514], vec![3], vec![4; MAX_FRAME]];
        let stream: Vec<u8> = frames.iter().flat_map(|f| framed(f)).collect();
        // Byte by byte, in odd-sized chunks and in one piece.
        for chunk in [1, 3, 7, 1000, stream.len()] {
            let mut d = FrameDecoder::default();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                let mut rest = piece;
                while !rest.is_empty() {
                    let n = d.push(rest);
                    rest = &rest[n..];
                    got.extend(drain(&mut d));
                }
            }
            assert_eq!(got, frames, "chunks of {chunk}");
            assert!(d.is_empty());
        }
    }

    #[test]
    fn decoder_rejects_zero_and_oversized_lengths_without_allocating() {
        for bad in [0u32, MAX_FRAME as u32 + 1, u32::MAX] {
            let mut d = FrameDecoder::default();
            let capacity = d.capacity();
            // A prefix split across two reads is judged once complete.
            d.push(&bad.to_be_bytes()[..3]);
            assert!(matches!(d.frame(), Ok(None)));
            d.push(&bad.to_be_bytes()[3..]);
            assert!(
                matches!(d.frame(), Err(StreamError::FrameLength(n)) if n == bad),
                "length {bad} accepted"
            );
            assert!(!d.has_frame());
            assert_eq!(d.capacity(), capacity);
        }
    }

    #[test]
    fn decoder_reads_a_socket_and_reports_its_end() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let mut d = FrameDecoder::default();
        assert_eq!(d.read_from(&mut &a).expect("would block"), 0);
        b.write_all(&framed(b"abc")).expect("write");
        assert_eq!(d.read_from(&mut &a).expect("read"), 7);
        assert_eq!(d.frame().expect("frame"), Some(&b"abc"[..]));
        drop(b);
        assert!(matches!(d.read_from(&mut &a), Err(StreamError::Closed)));
    }

    /// Takes at most `room` bytes, then would block until given more room.
    struct Trickle {
        room: usize,
        got: Vec<u8>,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room).min(3);
            self.room -= n;
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn encoder_keeps_frames_whole_across_partial_writes() {
        let mut e = FrameEncoder::default();
        let mut peer = Trickle {
            room: 5,
            got: Vec::new(),
        };
        e.push(b"first frame").expect("push");
        assert!(!e.flush_to(&mut peer).expect("flush"));
        assert_eq!(peer.got, [0, 0, 0, 11, b'f']);
        // Queued while the first is half out: it goes after, not into it.
        e.push(b"second").expect("push");
        peer.room = 1000;
        assert!(e.flush_to(&mut peer).expect("flush"));
        let mut want = framed(b"first frame");
        want.extend(framed(b"second"));
        assert_eq!(peer.got, want);
        assert!(e.is_empty());
    }

    #[test]
    fn encoder_refuses_bad_lengths_and_failed_fills_and_stays_bounded() {
        let mut e = FrameEncoder::default();
        assert!(e.push(&[]).is_err());
        assert!(e.push_with(MAX_FRAME + 1, |_| Ok(())).is_err());
        assert!(e
            .push_with(100, |_| Err(io::ErrorKind::UnexpectedEof.into()))
            .is_err());
        assert!(e.is_empty(), "a refused frame left bytes behind");
        let mut frames = 0;
        while e.has_room() {
            e.push(&[7; MAX_FRAME]).expect("push");
            frames += 1;
        }
        assert!(frames >= 2, "room for {frames} frames");
        assert!(e.pending() <= TX_BUFFER);
    }

    #[test]
    fn a_write_to_a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().expect("pair");
        let mut s = FrameStream::new(a).expect("stream");
        drop(b);
        s.tx.push(b"lost").expect("push");
        assert!(matches!(s.flush(), Err(StreamError::Write(_))));
    }
}
