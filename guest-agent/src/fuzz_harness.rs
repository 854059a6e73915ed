//! Entry points for the fuzz targets in `guest-agent/fuzz` (cargo fuzz),
//! kept in the crate so the unit tests below run the same code on stable
//! Rust with generated inputs. Each takes arbitrary bytes and must never
//! panic, loop or allocate beyond the frame limit.
//!
//! Messages are generated from the input bytes by hand ([`Source`]) rather
//! than with a derived `Arbitrary`, so the protocol types need no extra
//! dependency.

use std::fmt::Debug;

use serde::{de::DeserializeOwned, Serialize};

use crate::frame::{encode, FrameError, FrameReader, MAX_FRAME};
use crate::protocol::{
    ExecRequest, ExitStatus, LimitsReport, MountRequest, Reply, Request, SpawnErrorKind, WindowSize,
};

/// The input is what a guest sent: the host decodes replies from it as
/// `kiln` does, with a reader that gives up at the first bad frame (it
/// does not trust the guest).
pub fn host_reads_replies(data: &[u8]) {
    read_stream::<Reply>(FrameReader::without_resync(data), data.len(), false);
}

/// The input is what a host sent: the agent decodes requests from it, and
/// answers a malformed or oversized frame with `Failed` and goes on.
pub fn agent_reads_requests(data: &[u8]) {
    read_stream::<Request>(FrameReader::new(data), data.len(), true);
}

/// Reads frames until the stream of `len` bytes ends (or, unless `go_on`,
/// until the first bad frame), and checks every message that decodes
/// re-encodes to itself.
fn read_stream<T: Serialize + DeserializeOwned + PartialEq + Debug>(
    mut reader: FrameReader<&[u8]>,
    len: usize,
    go_on: bool,
) {
    // Every frame consumes at least its 4-byte length prefix, so more
    // results than this would mean the reader stopped advancing.
    let most = len / 4 + 1;
    for _ in 0..=most {
        match reader.read::<T>() {
            Ok(msg) => {
                let frame = encode(&msg).expect("a decoded message re-encodes");
                // postcard's encoding is the shortest: never longer than
                // the payload the message came from.
                assert!(frame.len() - 4 <= MAX_FRAME);
                let back: T = FrameReader::new(&frame[..])
                    .read()
                    .expect("a re-encoded message decodes");
                assert_eq!(back, msg);
            }
            Err(e) if e.is_recoverable() && go_on => {}
            Err(e) if e.is_recoverable() => return,
            Err(FrameError::Closed | FrameError::Truncated { .. }) => return,
            Err(e) => panic!("reading from memory failed with {e:?}"),
        }
    }
    panic!("more than {most} frames read from {len} bytes");
}

/// The input describes a sequence of requests and replies: they are written
/// into one stream, which must read back as the same messages in order;
/// the stream cut short must give the messages before the cut, then
/// `Truncated`.
pub fn round_trip(data: &[u8]) {
    let mut src = Source::new(data);
    let cut = src.u32();
    let mut msgs = Vec::new();
    while !src.data.is_empty() && msgs.len() < 64 {
        msgs.push(if src.byte() & 1 == 0 {
            Msg::Request(request(&mut src))
        } else {
            Msg::Reply(reply(&mut src))
        });
    }
    let mut stream = Vec::new();
    let mut sent = Vec::new();
    let mut ends = Vec::new();
    for m in msgs {
        match m.encode() {
            Ok(frame) => {
                stream.extend(frame);
                ends.push(stream.len());
                sent.push(m);
            }
            // Only a message over the frame limit may be refused.
            Err(FrameError::Encode(_)) => assert!(m.payload_len() > MAX_FRAME),
            Err(e) => panic!("encoding failed with {e:?}"),
        }
    }
    read_back(&stream, &sent);

    // Cut anywhere inside the stream (not at its end).
    if !stream.is_empty() {
        let at = cut as usize % stream.len();
        let whole = ends.iter().filter(|&&e| e <= at).count();
        let mut reader = FrameReader::new(&stream[..at]);
        for m in &sent[..whole] {
            m.read_same(&mut reader);
        }
        let err = sent[whole].read_err(&mut reader);
        let at_boundary = whole == 0 && at == 0 || whole > 0 && ends[whole - 1] == at;
        if at_boundary {
            assert!(matches!(err, FrameError::Closed), "{err:?}");
        } else {
            assert!(matches!(err, FrameError::Truncated { .. }), "{err:?}");
        }
    }
}

fn read_back(stream: &[u8], sent: &[Msg]) {
    let mut reader = FrameReader::new(stream);
    for m in sent {
        m.read_same(&mut reader);
    }
    assert!(matches!(reader.read::<Request>(), Err(FrameError::Closed)));
}

enum Msg {
    Request(Request),
    Reply(Reply),
}

impl Msg {
    fn read_same(&self, reader: &mut FrameReader<&[u8]>) {
        match self {
            Msg::Request(r) => assert_eq!(&reader.read::<Request>().expect("request"), r),
            Msg::Reply(r) => assert_eq!(&reader.read::<Reply>().expect("reply"), r),
        }
    }

    fn read_err(&self, reader: &mut FrameReader<&[u8]>) -> FrameError {
        match self {
            Msg::Request(_) => reader.read::<Request>().expect_err("cut stream"),
            Msg::Reply(_) => reader.read::<Reply>().expect_err("cut stream"),
        }
    }

    fn encode(&self) -> Result<Vec<u8>, FrameError> {
        match self {
            Msg::Request(r) => encode(r),
            Msg::Reply(r) => encode(r),
        }
    }

    fn payload_len(&self) -> usize {
        let payload = match self {
            Msg::Request(r) => postcard::to_allocvec(r),
            Msg::Reply(r) => postcard::to_allocvec(r),
        };
        payload.expect("a message serializes").len()
    }
}

/// Values taken from the front of the fuzzer's bytes; zeros once they run
/// out, so every input describes some message.
struct Source<'a> {
    data: &'a [u8],
    /// Whether a chunk near the frame limit was made: one per input is
    /// enough, and each costs megabytes of copying.
    big: bool,
}

impl<'a> Source<'a> {
    fn new(data: &'a [u8]) -> Self {
        Source { data, big: false }
    }

    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        for b in &mut a {
            *b = self.byte();
        }
        a
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.array())
    }

    fn bool(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    fn bytes(&mut self) -> Vec<u8> {
        let len = self.byte();
        if len == 0xff && self.data.first() == Some(&0xff) && !self.big {
            // Rarely (0xff 0xff), a chunk near the frame limit, on either
            // side of it.
            self.big = true;
            self.byte();
            let size = MAX_FRAME - 64 + usize::from(self.byte());
            return vec![self.byte(); size];
        }
        let n = usize::from(len).min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head.to_vec()
    }

    fn string(&mut self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    fn option<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        self.bool().then(|| f(self))
    }

    fn vec<T>(&mut self, mut f: impl FnMut(&mut Self) -> T) -> Vec<T> {
        let n = self.byte() % 8;
        (0..n).map(|_| f(self)).collect()
    }
}

fn request(s: &mut Source) -> Request {
    match s.byte() % 12 {
        0 => Request::Hello {
            protocol: s.u32(),
            host_version: s.string(),
            unix_time_ms: s.u64(),
        },
        1 => Request::Exec(ExecRequest {
            id: s.u32(),
            argv: s.vec(Source::string),
            env: s.vec(|s| (s.string(), s.string())),
            cwd: s.option(Source::string),
            stdin: s.bool(),
            tty: s.option(|s| WindowSize {
                rows: s.u16(),
                cols: s.u16(),
            }),
        }),
        2 => Request::Stdin {
            id: s.u32(),
            data: s.bytes(),
        },
        3 => Request::Signal {
            id: s.u32(),
            signal: s.i32(),
        },
        4 => Request::Mount(MountRequest {
            id: s.u32(),
            fstype: s.string(),
            source: s.string(),
            target: s.string(),
            options: s.string(),
            readonly: s.bool(),
        }),
        5 => Request::PutFile {
            id: s.u32(),
            path: s.string(),
            mode: s.u32(),
        },
        6 => Request::FileData {
            id: s.u32(),
            data: s.bytes(),
        },
        7 => Request::GetFile {
            id: s.u32(),
            path: s.string(),
        },
        8 => Request::PutTree {
            id: s.u32(),
            path: s.string(),
        },
        9 => Request::Resize {
            id: s.u32(),
            rows: s.u16(),
            cols: s.u16(),
        },
        _ => Request::Poweroff,
    }
}

fn reply(s: &mut Source) -> Reply {
    match s.byte() % 13 {
        0 => Reply::Hello {
            protocol: s.u32(),
            agent_version: s.string(),
            boot_error: s.option(Source::string),
        },
        1 => Reply::Started {
            id: s.u32(),
            pid: s.u32(),
        },
        2 => Reply::SpawnFailed {
            id: s.u32(),
            kind: match s.byte() % 3 {
                0 => SpawnErrorKind::NotFound,
                1 => SpawnErrorKind::NotExecutable,
                _ => SpawnErrorKind::Other,
            },
            message: s.string(),
        },
        3 => Reply::Stdout {
            id: s.u32(),
            data: s.bytes(),
        },
        4 => Reply::Stderr {
            id: s.u32(),
            data: s.bytes(),
        },
        5 => Reply::Exited {
            id: s.u32(),
            status: if s.bool() {
                ExitStatus::Signal(s.i32())
            } else {
                ExitStatus::Code(s.i32())
            },
            limits: s.option(|s| LimitsReport {
                oom_kills: s.u64(),
                memory_peak: s.u64(),
                memory_max: s.u64(),
                pids_refused: s.u64(),
                pids_max: s.u64(),
                memory_stall_kill: s.bool(),
            }),
        },
        6 => Reply::FileHeader {
            id: s.u32(),
            mode: s.u32(),
            size: s.u64(),
        },
        7 => Reply::FileData {
            id: s.u32(),
            data: s.bytes(),
        },
        8 => Reply::Done { id: s.u32() },
        9 => Reply::Failed {
            id: s.option(Source::u32),
            message: s.string(),
        },
        10 => Reply::TreeHeader { id: s.u32() },
        _ => Reply::PoweringOff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic xorshift bytes, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    /// Streams a decoder meets: random bytes, and valid streams of
    /// generated messages with a few bytes changed (a length prefix now
    /// and then), so decoding gets past the first frame often enough to
    /// matter.
    fn streams(seed: u64, replies: bool) -> impl Iterator<Item = Vec<u8>> {
        let mut rng = Rng(seed);
        (0..3000usize).map(move |i| {
            let len = (i * 37) % 2000;
            let raw = rng.bytes(len);
            if i % 4 == 0 {
                return raw;
            }
            let mut src = Source::new(&raw);
            let mut stream = Vec::new();
            while !src.data.is_empty() {
                let frame = if replies {
                    encode(&reply(&mut src))
                } else {
                    encode(&request(&mut src))
                };
                // Near-limit chunks are refused by encode; leave them out.
                if let Ok(frame) = frame {
                    stream.extend(frame);
                }
            }
            for _ in 0..i % 5 {
                if stream.is_empty() {
                    break;
                }
                let at = rng.next() as usize % stream.len();
                stream[at] = rng.next() as u8;
            }
            stream
        })
    }

    #[test]
    fn agent_reads_generated_requests() {
        for data in streams(0x9e37_79b9_7f4a_7c15, false) {
            agent_reads_requests(&data);
        }
    }

    #[test]
    fn host_reads_generated_replies() {
        for data in streams(0x2545_f491_4f6c_dd1d, true) {
            host_reads_replies(&data);
        }
    }

    #[test]
    fn generated_messages_round_trip() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        for i in 0..3000usize {
            let mut data = Vec::new();
            if i % 500 == 0 {
                // A Stdin request with a chunk near the frame limit: the
                // first ones fit, the others are refused.
                let over = (i / 500 * 50) as u8;
                data.extend([0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0xff, 0xff, over, 0xab]);
            }
            data.extend(rng.bytes((i * 37) % 3000));
            round_trip(&data);
        }
    }

    #[test]
    fn oversized_messages_are_refused_whole() {
        // After the cut (4 bytes): a request (0), Stdin (2) with id 1 and a
        // chunk of MAX_FRAME + 191 bytes (0xff 0xff 0xff), then Poweroff.
        let mut data = vec![0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xab];
        data.extend([0, 9]);
        let big = request(&mut Source::new(&data[5..]));
        assert!(matches!(encode(&big), Err(FrameError::Encode(_))));
        round_trip(&data);
    }
}
