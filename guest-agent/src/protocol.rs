//! Every message kiln and its guest agent exchange.
//!
//! The agent speaks first with [`Reply::Hello`]; the host answers with
//! [`Request::Hello`]. After that the host sends requests, each tagged with an
//! `id` it chose, and the agent answers with replies carrying the same `id`.
//! Replies to different requests may interleave (an exec streams output while
//! a file is being sent, for example).

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to the messages below.
pub const PROTOCOL_VERSION: u32 = 5;

/// The agent's version, sent in its hello.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Name of the virtio-console port that carries the agent channel.
pub const AGENT_PORT_NAME: &str = "kiln.agent";

/// Serial number of the virtio-blk disk holding the tools image.
pub const TOOLS_DISK_SERIAL: &str = "kiln-tools";

/// Prefix of the serial numbers kiln gives user disks (`kiln0`, `kiln1`, ...),
/// which the agent also exposes as `/dev/disk/by-id/virtio-<serial>`.
pub const USER_DISK_SERIAL_PREFIX: &str = "kiln";

/// Host-to-guest messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The host's half of the handshake. The guest has no clock of its own
    /// worth trusting, so the host's time comes along.
    Hello {
        protocol: u32,
        host_version: String,
        unix_time_ms: u64,
    },
    /// Run a command. Output comes back as `Stdout`/`Stderr`, then `Exited`.
    Exec(ExecRequest),
    /// Bytes for a running command's stdin; an empty chunk closes it.
    Stdin {
        id: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Send a signal to a running command (e.g. SIGPIPE when the host's end of
    /// its output is gone). Unknown or finished ids are ignored.
    Signal { id: u32, signal: i32 },
    /// Mount a filesystem (creating the mount point), answered by `Done`.
    Mount(MountRequest),
    /// Create or replace a file; its contents follow as `FileData` with the
    /// same id, ended by an empty chunk. Answered by `Done` once written.
    PutFile { id: u32, path: String, mode: u32 },
    /// A chunk of a file being put; empty means end of file.
    FileData {
        id: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Send a file back: `FileHeader`, then `FileData` chunks, ended by an
    /// empty chunk. A directory comes back as a tar stream of its contents
    /// instead: `TreeHeader`, the stream as `FileData` chunks, an empty
    /// chunk, then `Done` if the guest's tar succeeded (else `Failed`).
    GetFile { id: u32, path: String },
    /// Flush every filesystem and block device, then power the VM off.
    /// Answered by `PoweringOff` once the data is on the host's disks.
    Poweroff,
    /// Extract a tar stream into the directory `path` (created, with its
    /// parents, if missing); the stream follows as `FileData` with the same
    /// id, ended by an empty chunk. Answered by `Done` once extracted, or
    /// `Failed` with what tar said.
    PutTree { id: u32, path: String },
    /// A command run with a terminal (`ExecRequest::tty`) has a new window
    /// size; its foreground process group gets SIGWINCH. Ignored for
    /// unknown, finished or terminal-less commands; a zero size is refused.
    Resize { id: u32, rows: u16, cols: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub id: u32,
    /// Program and arguments; the program is looked up in PATH.
    pub argv: Vec<String>,
    /// Added to (or overriding) the agent's base environment.
    pub env: Vec<(String, String)>,
    /// Working directory; `/` if unset.
    pub cwd: Option<String>,
    /// Whether `Stdin` messages follow; if false the command's stdin is /dev/null.
    pub stdin: bool,
    /// Run the command on a pseudo-terminal of this size instead of pipes:
    /// it leads its own session with the terminal as controlling terminal,
    /// `Stdin` bytes are typed into it (an empty chunk types the EOF
    /// character) and everything it prints comes back as `Stdout`.
    pub tty: Option<WindowSize>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

impl WindowSize {
    /// What a terminal that cannot tell its size is taken to be.
    pub const DEFAULT: WindowSize = WindowSize { rows: 24, cols: 80 };

    /// A size a terminal can have: neither side zero.
    pub fn is_valid(self) -> bool {
        self.rows > 0 && self.cols > 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRequest {
    pub id: u32,
    pub fstype: String,
    pub source: String,
    pub target: String,
    pub options: String,
    pub readonly: bool,
}

/// Guest-to-host messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The agent's half of the handshake. `boot_error` says why the guest's
    /// root (tools image) could not be set up, if it could not.
    Hello {
        protocol: u32,
        agent_version: String,
        boot_error: Option<String>,
    },
    /// The command was started.
    Started { id: u32, pid: u32 },
    /// The command could not be started.
    SpawnFailed {
        id: u32,
        kind: SpawnErrorKind,
        message: String,
    },
    Stdout {
        id: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Stderr {
        id: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The command ended; sent after all of its output. `limits` is what
    /// its cgroup saw, where the agent runs commands in one.
    Exited {
        id: u32,
        status: ExitStatus,
        limits: Option<LimitsReport>,
    },
    /// Metadata of a file requested with `GetFile`.
    FileHeader { id: u32, mode: u32, size: u64 },
    /// A chunk of a requested file; empty means end of file.
    FileData {
        id: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A `Mount`, `PutFile` or `PutTree` request completed, or a directory
    /// sent for `GetFile` was read whole.
    Done { id: u32 },
    /// A request failed. `id` is `None` when the request itself could not be
    /// read (malformed or oversized frame).
    Failed { id: Option<u32>, message: String },
    /// Filesystems are synced; the VM powers off next.
    PoweringOff,
    /// The path requested with `GetFile` is a directory: a tar stream of
    /// its contents follows as `FileData`, then `Done` or `Failed`.
    TreeHeader { id: u32 },
}

/// The limits a command ran into: the guest's commands share memory and
/// process limits set below the guest's own (see the agent's limits.rs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsReport {
    /// The command's processes the OOM killer ended.
    pub oom_kills: u64,
    /// The most memory the command used at once, in bytes.
    pub memory_peak: u64,
    /// What commands may use, in bytes.
    pub memory_max: u64,
    /// Forks and clones refused because commands had `pids_max` tasks.
    pub pids_refused: u64,
    pub pids_max: u64,
    /// The agent ended the command because it stalled on memory at the
    /// limit (thrashing) before the OOM killer acted.
    pub memory_stall_kill: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpawnErrorKind {
    NotFound,
    /// The file exists but cannot be run: no permission (EACCES), or not a
    /// program the kernel can load (ENOEXEC). A shell exits 126 for both.
    NotExecutable,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The status a shell reports: the code, or 128 + the signal number;
    /// `None` if that is not a valid exit status (0..=255).
    pub fn shell_code(self) -> Option<u8> {
        let code = match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) if (1..=127).contains(&s) => 128 + s,
            ExitStatus::Signal(_) => return None,
        };
        u8::try_from(code).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode, encode, FrameError, FrameReader, MAX_FRAME};

    fn requests() -> Vec<Request> {
        vec![
            Request::Hello {
                protocol: PROTOCOL_VERSION,
                host_version: "0.1.0".into(),
                unix_time_ms: 1_700_000_000_000,
            },
            Request::Exec(ExecRequest {
                id: 7,
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec![("A".into(), "b=c".into())],
                cwd: Some("/tmp".into()),
                stdin: true,
                tty: None,
            }),
            Request::Exec(ExecRequest {
                id: 8,
                argv: vec!["bash".into(), "-l".into()],
                env: vec![("TERM".into(), "xterm-256color".into())],
                cwd: None,
                stdin: true,
                tty: Some(WindowSize {
                    rows: 30,
                    cols: 100,
                }),
            }),
            Request::Resize {
                id: 8,
                rows: u16::MAX,
                cols: 1,
            },
            Request::Stdin {
                id: 7,
                data: vec![0, 1, 2, 255],
            },
            Request::Stdin {
                id: 7,
                data: vec![],
            },
            Request::Signal { id: 7, signal: 13 },
            Request::Mount(MountRequest {
                id: 3,
                fstype: "virtiofs".into(),
                source: "share0".into(),
                target: "/mnt/x".into(),
                options: String::new(),
                readonly: true,
            }),
            Request::PutFile {
                id: 9,
                path: "/tmp/f".into(),
                mode: 0o755,
            },
            Request::FileData {
                id: 9,
                data: vec![42; 1000],
            },
            Request::GetFile {
                id: 10,
                path: "/etc/os-release".into(),
            },
            Request::Poweroff,
            Request::PutTree {
                id: 11,
                path: "/tmp/tree".into(),
            },
            Request::FileData {
                id: 11,
                data: vec![],
            },
        ]
    }

    fn replies() -> Vec<Reply> {
        vec![
            Reply::Hello {
                protocol: PROTOCOL_VERSION,
                agent_version: AGENT_VERSION.into(),
                boot_error: Some("no tools disk".into()),
            },
            Reply::Started { id: 1, pid: 42 },
            Reply::SpawnFailed {
                id: 1,
                kind: SpawnErrorKind::NotFound,
                message: "nope".into(),
            },
            Reply::Stdout {
                id: 1,
                data: b"out".to_vec(),
            },
            Reply::Stderr {
                id: 1,
                data: b"err".to_vec(),
            },
            Reply::Exited {
                id: 1,
                status: ExitStatus::Signal(9),
                limits: Some(LimitsReport {
                    oom_kills: 2,
                    memory_peak: 80 << 20,
                    memory_max: 80 << 20,
                    pids_refused: 0,
                    pids_max: 700,
                    memory_stall_kill: true,
                }),
            },
            Reply::Exited {
                id: 1,
                status: ExitStatus::Code(-1),
                limits: None,
            },
            Reply::FileHeader {
                id: 2,
                mode: 0o644,
                size: u64::MAX,
            },
            Reply::FileData {
                id: 2,
                data: vec![],
            },
            Reply::Done { id: 3 },
            Reply::Failed {
                id: None,
                message: "bad".into(),
            },
            Reply::PoweringOff,
            Reply::TreeHeader { id: 4 },
            Reply::FileData {
                id: 4,
                data: b"./\0".to_vec(),
            },
            Reply::Done { id: 4 },
        ]
    }

    #[test]
    fn every_request_round_trips() {
        for msg in requests() {
            let frame = encode(&msg).expect("encode");
            let mut r = FrameReader::new(&frame[..]);
            let back: Request = r.read().expect("decode");
            assert_eq!(back, msg);
            assert!(matches!(r.read::<Request>(), Err(FrameError::Closed)));
        }
    }

    #[test]
    fn every_reply_round_trips() {
        for msg in replies() {
            let frame = encode(&msg).expect("encode");
            let back: Reply = FrameReader::new(&frame[..]).read().expect("decode");
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn new_messages_leave_the_old_ones_encoded_as_before() {
        // New variants go last: the hellos must decode across versions, so
        // a mismatch is reported as one, not as a malformed frame.
        let payload = |frame: Vec<u8>| frame[4..].to_vec();
        let hello = encode(&Reply::Hello {
            protocol: 3,
            agent_version: String::new(),
            boot_error: None,
        })
        .expect("encode");
        assert_eq!(payload(hello), [0, 3, 0, 0]);
        assert_eq!(payload(encode(&Request::Poweroff).expect("encode")), [8]);
        assert_eq!(payload(encode(&Reply::PoweringOff).expect("encode")), [10]);
    }

    #[test]
    fn largest_data_chunk_fits_a_frame() {
        let msg = Reply::Stdout {
            id: u32::MAX,
            data: vec![0xAB; crate::frame::DATA_CHUNK],
        };
        let frame = encode(&msg).expect("encode");
        assert!(frame.len() - 4 <= MAX_FRAME);
    }

    #[test]
    fn message_over_the_limit_is_refused_when_encoding() {
        let msg = Reply::Stdout {
            id: 1,
            data: vec![0; MAX_FRAME + 1],
        };
        assert!(matches!(encode(&msg), Err(FrameError::Encode(_))));
    }

    #[test]
    fn truncated_frames_are_errors() {
        let frame = encode(&requests()[1]).expect("encode");
        for cut in 1..frame.len() {
            let mut r = FrameReader::new(&frame[..cut]);
            match r.read::<Request>() {
                Err(FrameError::Truncated { got, want }) => assert!(got < want),
                other => panic!("cut at {cut}: expected Truncated, got {other:?}"),
            }
        }
    }

    #[test]
    fn oversized_frame_is_skipped_and_the_stream_goes_on() {
        let big = (MAX_FRAME + 1) as u32;
        let mut stream = big.to_le_bytes().to_vec();
        stream.extend(std::iter::repeat(0x55).take(big as usize));
        stream.extend(encode(&Request::Poweroff).expect("encode"));
        let mut r = FrameReader::new(&stream[..]);
        let err = r.read::<Request>().expect_err("oversized");
        assert!(matches!(err, FrameError::Oversized(n) if n == big as u64));
        assert!(err.is_recoverable());
        assert_eq!(r.read::<Request>().expect("next frame"), Request::Poweroff);
    }

    #[test]
    fn oversized_length_without_payload_is_truncation() {
        let stream = u32::MAX.to_le_bytes();
        let mut r = FrameReader::new(&stream[..]);
        assert!(matches!(
            r.read::<Request>(),
            Err(FrameError::Truncated { got: 0, .. })
        ));
    }

    #[test]
    fn garbage_payload_is_malformed_and_the_stream_goes_on() {
        let mut stream = Vec::new();
        for garbage in [&[0xFFu8, 0xFF, 0xFF, 0xFF, 0xFF][..], &[200], &[]] {
            stream.extend((garbage.len() as u32).to_le_bytes());
            stream.extend_from_slice(garbage);
        }
        stream.extend(encode(&Request::Poweroff).expect("encode"));
        let mut r = FrameReader::new(&stream[..]);
        for _ in 0..3 {
            let err = r.read::<Request>().expect_err("garbage");
            assert!(matches!(err, FrameError::Malformed(_)), "{err:?}");
            assert!(err.is_recoverable());
        }
        assert_eq!(r.read::<Request>().expect("next"), Request::Poweroff);
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let frame = encode(&Request::Poweroff).expect("encode");
        let mut payload = frame[4..].to_vec();
        payload.push(0);
        assert!(matches!(
            decode::<Request>(&payload),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn huge_inner_length_does_not_allocate() {
        // A data field claiming 2^60 bytes inside a small frame must fail
        // cleanly rather than try to allocate.
        let mut payload = vec![2u8, 7]; // Stdin variant, id 7
        payload.extend([0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]);
        assert!(matches!(
            decode::<Request>(&payload),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A cheap deterministic fuzz: xorshift bytes as payloads.
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for len in 0..2000usize {
            let payload: Vec<u8> = (0..len % 64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode::<Request>(&payload);
            let _ = decode::<Reply>(&payload);
        }
    }

    #[test]
    fn window_sizes_with_a_zero_side_are_invalid() {
        assert!(WindowSize::DEFAULT.is_valid());
        assert!(WindowSize { rows: 1, cols: 1 }.is_valid());
        assert!(!WindowSize { rows: 0, cols: 80 }.is_valid());
        assert!(!WindowSize { rows: 24, cols: 0 }.is_valid());
    }

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Code(3).shell_code(), Some(3));
        assert_eq!(ExitStatus::Signal(9).shell_code(), Some(137));
        assert_eq!(ExitStatus::Code(-1).shell_code(), None);
        assert_eq!(ExitStatus::Code(256).shell_code(), None);
        assert_eq!(ExitStatus::Signal(i32::MAX).shell_code(), None);
        assert_eq!(ExitStatus::Signal(0).shell_code(), None);
    }
}
