//! The host's side of the agent protocol against a misbehaving guest: the
//! test thread plays the agent over a socket pair and sends what a hostile
//! or broken agent might. Every case must end in a clear error or a correct
//! result: never a panic, never a hang, never output or files mixed up.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use kiln_agent::frame::encode;
use kiln_agent::{
    ExecRequest, ExitStatus, FrameReader, MountRequest, Reply, Request, SpawnErrorKind, MAX_FRAME,
    PROTOCOL_VERSION,
};

use super::{ExecOutcome, Session, Watch, QUEUED_REPLIES};

/// How long the host side may take before the test fails as hung; well
/// beyond the watch's own limit, so a hang is told apart from a timeout.
const HOST_LIMIT: Duration = Duration::from_secs(30);
/// The watch's limit in most cases: no case should come near it.
const WATCH_LIMIT: Duration = Duration::from_secs(10);
const GAVE_UP: &str = "test watch: gave up waiting for the guest";

/// Stands for the VM: gives up at a deadline, as `--timeout` does.
struct TestWatch {
    deadline: Instant,
}

impl Watch for TestWatch {
    fn check(&mut self) -> Result<()> {
        if Instant::now() >= self.deadline {
            bail!(GAVE_UP);
        }
        Ok(())
    }

    fn connection_lost(&mut self, why: &str) -> anyhow::Error {
        anyhow!("lost the connection to the guest agent ({why})")
    }
}

/// The hostile agent's end of the channel.
struct Agent {
    stream: UnixStream,
    reader: FrameReader<UnixStream>,
}

impl Agent {
    /// The host's next request; `None` once it has gone.
    fn request(&mut self) -> Option<Request> {
        self.reader.read().ok()
    }

    fn send(&mut self, reply: &Reply) {
        self.raw(&encode(reply).expect("encode"));
    }

    /// Writes bytes as they are; the host may have hung up already, which
    /// is no failure of the test.
    fn raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// A frame with `payload` as it is.
    fn frame(&mut self, payload: &[u8]) {
        let mut f = (payload.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(payload);
        self.raw(&f);
    }

    /// Keeps the connection open without sending anything (until the host
    /// is done, in any case that passes).
    fn hold(self) {
        std::thread::sleep(HOST_LIMIT);
        drop(self);
    }
}

/// Runs `host` against a session whose agent is `agent`, each on a thread;
/// fails the test if the host side has not finished within [`HOST_LIMIT`].
fn against<T: Send + 'static>(
    watch_limit: Duration,
    agent: impl FnOnce(Agent) + Send + 'static,
    host: impl FnOnce(&mut Session, &mut TestWatch) -> T + Send + 'static,
) -> T {
    let (h, g) = UnixStream::pair().expect("socketpair");
    let reader = FrameReader::new(g.try_clone().expect("clone"));
    std::thread::spawn(move || agent(Agent { stream: g, reader }));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut watch = TestWatch {
            deadline: Instant::now() + watch_limit,
        };
        let mut session = Session::new(h).expect("session");
        let _ = tx.send(host(&mut session, &mut watch));
    });
    rx.recv_timeout(HOST_LIMIT)
        .expect("the host side hung or panicked")
}

fn exec_request() -> ExecRequest {
    ExecRequest {
        id: 0,
        argv: vec!["true".into()],
        env: vec![],
        cwd: None,
        stdin: false,
        tty: None,
    }
}

struct Ran {
    outcome: Result<ExecOutcome>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

fn exec(session: &mut Session, watch: &mut TestWatch) -> Ran {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let outcome = session.exec(exec_request(), &mut stdout, &mut stderr, watch);
    Ran {
        outcome,
        stdout,
        stderr,
    }
}

/// The id of an exec request.
fn exec_id(req: Option<Request>) -> u32 {
    match req {
        Some(Request::Exec(e)) => e.id,
        other => panic!("expected an exec request, got {other:?}"),
    }
}

/// An agent that starts the command, then does `then`.
fn started(then: impl FnOnce(&mut Agent, u32) + Send + 'static) -> impl FnOnce(Agent) + Send {
    move |mut a: Agent| {
        let id = exec_id(a.request());
        a.send(&Reply::Started { id, pid: 1 });
        then(&mut a, id);
        a.hold();
    }
}

/// Runs one command against `agent` and returns its error, in full.
fn exec_error(agent: impl FnOnce(&mut Agent, u32) + Send + 'static) -> String {
    let ran = against(WATCH_LIMIT, started(agent), exec);
    match ran.outcome {
        Ok(o) => panic!("expected an error, the command ended: {o:?}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn an_oversized_frame_is_a_clear_error() {
    let err = exec_error(|a, _| {
        let len = MAX_FRAME as u32 + 1;
        a.raw(&len.to_le_bytes());
        a.raw(&vec![0; len as usize]);
    });
    assert!(
        err.contains("the guest agent sent a frame of 1048577 bytes"),
        "{err}"
    );
}

#[test]
fn an_absurd_length_is_refused_at_once() {
    // Nothing follows the length: the host must not wait for 4 GiB.
    let err = exec_error(|a, _| a.raw(&u32::MAX.to_le_bytes()));
    assert!(
        err.contains("the guest agent sent a frame of 4294967295 bytes"),
        "{err}"
    );
}

#[test]
fn an_empty_frame_is_malformed() {
    let err = exec_error(|a, _| a.frame(&[]));
    assert!(
        err.contains("the guest agent sent a malformed frame"),
        "{err}"
    );
}

#[test]
fn a_garbage_frame_is_malformed() {
    let err = exec_error(|a, _| a.frame(&[0xFF; 9]));
    assert!(
        err.contains("the guest agent sent a malformed frame"),
        "{err}"
    );
}

#[test]
fn trailing_bytes_after_a_reply_are_malformed() {
    let err = exec_error(|a, id| {
        let mut payload = encode(&Reply::Done { id }).expect("encode")[4..].to_vec();
        payload.push(0);
        a.frame(&payload);
    });
    assert!(
        err.contains("the guest agent sent a malformed frame"),
        "{err}"
    );
}

#[test]
fn a_truncated_frame_is_a_lost_connection() {
    let err = exec_error(|a, _| {
        a.raw(&100u32.to_le_bytes());
        a.raw(&[1; 10]);
        a.stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    });
    assert!(
        err.contains("in the middle of a frame (10 of 100 bytes)"),
        "{err}"
    );
}

#[test]
fn a_truncated_length_is_a_lost_connection() {
    let err = exec_error(|a, _| {
        a.raw(&[5, 0]);
        a.stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    });
    assert!(
        err.contains("in the middle of a frame (2 of 4 bytes)"),
        "{err}"
    );
}

#[test]
fn replies_for_unknown_ids_are_ignored() {
    let ran = against(
        WATCH_LIMIT,
        |mut a: Agent| {
            let id = exec_id(a.request());
            let other = id + 41;
            // Before the command starts, and while it runs: none of this
            // is the command's.
            a.send(&Reply::Started { id: other, pid: 9 });
            a.send(&Reply::Exited {
                id: other,
                status: ExitStatus::Code(7),
                limits: None,
            });
            a.send(&Reply::Started { id, pid: 1 });
            for i in [other, u32::MAX, 0] {
                a.send(&Reply::Stdout {
                    id: i,
                    data: b"evil out".to_vec(),
                });
                a.send(&Reply::Stderr {
                    id: i,
                    data: b"evil err".to_vec(),
                });
                a.send(&Reply::FileData {
                    id: i,
                    data: b"evil file".to_vec(),
                });
                a.send(&Reply::Done { id: i });
                a.send(&Reply::Failed {
                    id: Some(i),
                    message: "evil".into(),
                });
                a.send(&Reply::SpawnFailed {
                    id: i,
                    kind: SpawnErrorKind::Other,
                    message: "evil".into(),
                });
                a.send(&Reply::Exited {
                    id: i,
                    status: ExitStatus::Code(7),
                    limits: None,
                });
            }
            a.send(&Reply::Stdout {
                id,
                data: b"good out".to_vec(),
            });
            a.send(&Reply::Stderr {
                id,
                data: b"good err".to_vec(),
            });
            a.send(&Reply::Exited {
                id,
                status: ExitStatus::Code(0),
                limits: None,
            });
            a.hold();
        },
        exec,
    );
    match ran.outcome {
        Ok(ExecOutcome::Exited {
            status: ExitStatus::Code(0),
            limits: None,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(ran.stdout, b"good out");
    assert_eq!(ran.stderr, b"good err");
}

/// `reply`'s frame with each byte of `marker` (in a string field) replaced
/// by 0xFF, which is never valid UTF-8.
fn with_invalid_utf8(reply: &Reply, marker: &str) -> Vec<u8> {
    let mut payload = encode(reply).expect("encode")[4..].to_vec();
    let at = payload
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())
        .expect("marker in the payload");
    payload[at..at + marker.len()].fill(0xFF);
    payload
}

#[test]
fn invalid_utf8_in_the_hello_is_an_error() {
    let err = against(
        WATCH_LIMIT,
        |mut a: Agent| {
            let hello = Reply::Hello {
                protocol: PROTOCOL_VERSION,
                agent_version: "@@@@".into(),
                boot_error: None,
            };
            a.frame(&with_invalid_utf8(&hello, "@@@@"));
            a.hold();
        },
        |s, w| {
            s.handshake(w, Instant::now() + WATCH_LIMIT, 10.0)
                .expect_err("a hello with invalid UTF-8")
        },
    );
    let err = format!("{err:#}");
    assert!(
        err.contains("the guest agent sent a malformed frame"),
        "{err}"
    );
}

#[test]
fn invalid_utf8_in_a_message_is_an_error() {
    let err = exec_error(|a, id| {
        let reply = Reply::SpawnFailed {
            id,
            kind: SpawnErrorKind::NotExecutable,
            message: "no @@@@ here".into(),
        };
        a.frame(&with_invalid_utf8(&reply, "@@@@"));
    });
    assert!(
        err.contains("the guest agent sent a malformed frame"),
        "{err}"
    );

    let err = against(
        WATCH_LIMIT,
        |mut a: Agent| {
            let id = match a.request() {
                Some(Request::Mount(m)) => m.id,
                other => panic!("expected a mount, got {other:?}"),
            };
            let reply = Reply::Failed {
                id: Some(id),
                message: "@@@@".into(),
            };
            a.frame(&with_invalid_utf8(&reply, "@@@@"));
            a.hold();
        },
        |s, w| s.mount(mount_request(), w).expect_err("invalid UTF-8"),
    );
    let err = format!("{err:#}");
    assert!(
        err.contains("the guest agent sent a malformed frame"),
        "{err}"
    );
}

fn mount_request() -> MountRequest {
    MountRequest {
        id: 0,
        fstype: "tmpfs".into(),
        source: "tmpfs".into(),
        target: "/mnt".into(),
        options: String::new(),
        readonly: false,
    }
}

#[test]
fn control_characters_in_guest_messages_are_escaped() {
    // An agent's message goes to the user's terminal: it must not be able
    // to drive it (set the title, write the clipboard, ...).
    let err = against(
        WATCH_LIMIT,
        |mut a: Agent| {
            let id = match a.request() {
                Some(Request::Mount(m)) => m.id,
                other => panic!("expected a mount, got {other:?}"),
            };
            a.send(&Reply::Failed {
                id: Some(id),
                message: "bad\u{1b}]52;c;cGF3bmVk\u{7}\r\u{9b}31m".into(),
            });
            a.hold();
        },
        |s, w| s.mount(mount_request(), w).expect_err("a failed mount"),
    );
    let err = format!("{err:#}");
    assert!(!err.chars().any(|c| c.is_control()), "{err:?}");
    assert!(
        err.contains(r"bad\u{1b}]52;c;cGF3bmVk\u{7}\r\u{9b}31m"),
        "{err}"
    );
}

#[test]
fn a_first_reply_other_than_hello_is_told_briefly() {
    let err = against(
        WATCH_LIMIT,
        |mut a: Agent| {
            a.send(&Reply::Stdout {
                id: 1,
                data: vec![b'x'; MAX_FRAME - 16],
            });
            a.hold();
        },
        |s, w| {
            s.handshake(w, Instant::now() + WATCH_LIMIT, 10.0)
                .expect_err("not a hello")
        },
    );
    let err = format!("{err:#}");
    assert!(err.len() < 200, "{} bytes: {:.300}", err.len(), err);
    assert!(
        err.contains("did not start with a hello (it sent Stdout)"),
        "{err}"
    );
}

#[test]
fn a_silent_agent_ends_with_the_watch() {
    let started = Instant::now();
    let ran = against(
        Duration::from_secs(1),
        |mut a: Agent| {
            let _ = a.request();
            a.hold();
        },
        exec,
    );
    let err = format!("{:#}", ran.outcome.expect_err("no reply"));
    assert_eq!(err, GAVE_UP);
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// What a copy-out against `agent` left: its result and the names in the
/// destination directory.
fn get_file(agent: impl FnOnce(&mut Agent, u32) + Send + 'static) -> (Result<()>, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("out");
    let result = against(
        WATCH_LIMIT,
        move |mut a: Agent| {
            let id = match a.request() {
                Some(Request::GetFile { id, .. }) => id,
                other => panic!("expected a get-file request, got {other:?}"),
            };
            agent(&mut a, id);
            a.hold();
        },
        move |s, w| s.get_file("/guest/file", &dest, false, w),
    );
    (result, names(dir.path()))
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn data(id: u32, bytes: &[u8]) -> Reply {
    Reply::FileData {
        id,
        data: bytes.to_vec(),
    }
}

#[test]
fn get_file_writes_what_was_announced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("out");
    let d = dest.clone();
    against(
        WATCH_LIMIT,
        |mut a: Agent| {
            let Some(Request::GetFile { id, .. }) = a.request() else {
                panic!("expected a get-file request");
            };
            a.send(&Reply::FileHeader {
                id,
                mode: 0o4750,
                size: 11,
            });
            a.send(&data(id, b"hello "));
            // Another request's data is not this file's.
            a.send(&data(id + 1, b"evil"));
            a.send(&data(id, b"world"));
            a.send(&data(id, b""));
            a.hold();
        },
        move |s, w| s.get_file("/guest/file", &d, false, w),
    )
    .expect("copy out");
    assert_eq!(std::fs::read(&dest).expect("read"), b"hello world");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dest).expect("stat").permissions().mode();
    assert_eq!(mode & 0o7777, 0o750);
    assert_eq!(names(dir.path()), ["out"]);
}

#[test]
fn get_file_refuses_more_data_than_announced() {
    let (result, left) = get_file(|a, id| {
        a.send(&Reply::FileHeader {
            id,
            mode: 0o644,
            size: 3,
        });
        a.send(&data(id, b"ab"));
        a.send(&data(id, b"cdef"));
        a.send(&data(id, b""));
    });
    let err = format!("{:#}", result.expect_err("more than announced"));
    assert!(
        err.contains("the guest agent sent more than the 3 bytes it announced for /guest/file"),
        "{err}"
    );
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn get_file_refuses_less_data_than_announced() {
    let (result, left) = get_file(|a, id| {
        a.send(&Reply::FileHeader {
            id,
            mode: 0o644,
            size: u64::MAX,
        });
        a.send(&data(id, b"abc"));
        a.send(&data(id, b""));
    });
    let err = format!("{:#}", result.expect_err("less than announced"));
    assert!(
        err.contains(
            "the guest agent ended /guest/file after 3 of the 18446744073709551615 bytes \
             it announced"
        ),
        "{err}"
    );
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn get_file_refuses_data_before_the_header() {
    let (result, left) = get_file(|a, id| {
        a.send(&data(id, b"abc"));
        a.send(&data(id, b""));
    });
    let err = format!("{:#}", result.expect_err("no header"));
    assert!(
        err.contains("the guest agent sent data of /guest/file before its header"),
        "{err}"
    );
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn get_file_refuses_a_second_header() {
    let (result, left) = get_file(|a, id| {
        for size in [3, 6] {
            a.send(&Reply::FileHeader {
                id,
                mode: 0o644,
                size,
            });
            a.send(&data(id, b"abc"));
        }
        a.send(&data(id, b""));
    });
    let err = format!("{:#}", result.expect_err("two headers"));
    assert!(
        err.contains("the guest agent sent a second header for /guest/file"),
        "{err}"
    );
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn get_file_failing_midway_leaves_nothing() {
    let (result, left) = get_file(|a, id| {
        a.send(&Reply::FileHeader {
            id,
            mode: 0o644,
            size: 10,
        });
        a.send(&data(id, b"abc"));
        a.send(&Reply::Failed {
            id: Some(id),
            message: "read error".into(),
        });
    });
    let err = format!("{:#}", result.expect_err("failed"));
    assert!(err.contains("read error"), "{err}");
    assert!(left.is_empty(), "{left:?}");

    let (result, left) = get_file(|a, id| {
        a.send(&Reply::FileHeader {
            id,
            mode: 0o644,
            size: 10,
        });
        a.send(&data(id, b"abc"));
        a.stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    });
    let err = format!("{:#}", result.expect_err("connection lost"));
    assert!(err.contains("lost the connection"), "{err}");
    assert!(left.is_empty(), "{left:?}");
}

/// A writer that blocks until `gate` opens, then counts what it is given,
/// slowly.
struct SlowWriter {
    gate: Option<mpsc::Receiver<()>>,
    got: u64,
}

impl Write for SlowWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(gate) = self.gate.take() {
            let _ = gate.recv();
        }
        std::thread::sleep(Duration::from_micros(200));
        self.got += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_stdout_flood_is_held_back_by_a_slow_reader() {
    // The largest chunks a frame can carry, far more of them than kiln may
    // hold: kiln must stop reading (and so hold the guest back) while its
    // own output is stuck, and still deliver every byte in the end.
    const CHUNK: usize = MAX_FRAME - 16;
    const CHUNKS: u64 = 48;
    let sent = Arc::new(AtomicU64::new(0));
    let (open, gate) = mpsc::channel();
    let s = sent.clone();
    let agent = started(move |a, id| {
        let reply = encode(&Reply::Stdout {
            id,
            data: vec![b'x'; CHUNK],
        })
        .expect("encode");
        for _ in 0..CHUNKS {
            a.raw(&reply);
            s.fetch_add(CHUNK as u64, Ordering::SeqCst);
        }
        a.send(&Reply::Exited {
            id,
            status: ExitStatus::Code(0),
            limits: None,
        });
    });
    // Opens the gate once the agent can write no more.
    let s = sent.clone();
    let stalled = std::thread::spawn(move || {
        let mut last = u64::MAX;
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = s.load(Ordering::SeqCst);
            if now == last {
                let _ = open.send(());
                return now;
            }
            last = now;
        }
    });
    let (outcome, got) = against(WATCH_LIMIT * 3, agent, move |s, w| {
        let mut out = SlowWriter {
            gate: Some(gate),
            got: 0,
        };
        let outcome = s.exec(exec_request(), &mut out, &mut Vec::new(), w);
        (outcome, out.got)
    });
    let stalled = stalled.join().expect("join");
    // What kiln holds is the chunk being written out, the queue, the one
    // waiting to enter it and the one being read: 16 MiB of kiln's 64 MiB
    // budget at most. The socket's buffers hold some more.
    let held = (QUEUED_REPLIES as u64 + 3) * MAX_FRAME as u64;
    assert!(held <= 16 << 20, "kiln may hold {held} bytes of output");
    let bound = held + (4 << 20);
    assert!(
        stalled <= bound,
        "the agent wrote {stalled} bytes while kiln's output was stuck (at most {bound})"
    );
    assert!(matches!(
        outcome.expect("the command ends"),
        ExecOutcome::Exited {
            status: ExitStatus::Code(0),
            ..
        }
    ));
    assert_eq!(got, CHUNKS * CHUNK as u64);
}

mod trees;

#[test]
fn a_terminal_command_gets_resizes_and_replies_for_others_are_ignored() {
    use kiln_agent::WindowSize;
    let size = WindowSize {
        rows: 40,
        cols: 120,
    };
    let agent = started(move |a, id| {
        // The host sends the new size for this command.
        match a.request() {
            Some(Request::Resize { id: i, rows, cols }) => {
                assert_eq!((i, rows, cols), (id, 40, 120));
            }
            other => panic!("expected Resize, got {other:?}"),
        }
        // Noise for other ids, and a failed resize, change nothing.
        a.send(&Reply::Stdout {
            id: id + 1,
            data: b"not ours".to_vec(),
        });
        a.send(&Reply::Failed {
            id: Some(id),
            message: "no such size".into(),
        });
        a.send(&Reply::Stdout {
            id,
            data: b"screen\r\n".to_vec(),
        });
        a.send(&Reply::Exited {
            id,
            status: ExitStatus::Code(0),
            limits: None,
        });
    });
    let (outcome, screen) = against(WATCH_LIMIT, agent, move |session, watch| {
        let mut screen = Vec::new();
        let mut pending = Some(size);
        let req = ExecRequest {
            tty: Some(WindowSize::DEFAULT),
            ..exec_request()
        };
        let outcome = session.exec_tty(req, &mut screen, &mut || pending.take(), watch);
        (outcome, screen)
    });
    assert!(
        matches!(
            outcome,
            Ok(ExecOutcome::Exited {
                status: ExitStatus::Code(0),
                ..
            })
        ),
        "{outcome:?}"
    );
    assert_eq!(screen, b"screen\r\n");
}
