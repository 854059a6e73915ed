//! The agent binary served over stdin/stdout (`--stdio`), driven frame by
//! frame: the protocol's behaviour outside a VM, including bad input.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use kiln_agent::frame::encode;
use kiln_agent::{
    ExecRequest, ExitStatus, FrameReader, Reply, Request, SpawnErrorKind, WindowSize, MAX_FRAME,
    PROTOCOL_VERSION,
};

struct Agent {
    child: Child,
    stdin: ChildStdin,
    replies: Receiver<Reply>,
}

impl Agent {
    fn start() -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
            .arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn agent");
        let stdin = child.stdin.take().expect("stdin");
        let mut reader = FrameReader::new(child.stdout.take().expect("stdout"));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            while let Ok(r) = reader.read::<Reply>() {
                if tx.send(r).is_err() {
                    return;
                }
            }
        });
        let mut a = Agent {
            child,
            stdin,
            replies: rx,
        };
        match a.recv() {
            Reply::Hello {
                protocol,
                boot_error,
                ..
            } => {
                assert_eq!(protocol, PROTOCOL_VERSION);
                assert_eq!(boot_error, None);
            }
            other => panic!("expected hello, got {other:?}"),
        }
        a.send(&Request::Hello {
            protocol: PROTOCOL_VERSION,
            host_version: "test".into(),
            unix_time_ms: 0,
        });
        a
    }

    fn send(&mut self, req: &Request) {
        self.raw(&encode(req).expect("encode"));
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).expect("write");
        self.stdin.flush().expect("flush");
    }

    fn recv(&self) -> Reply {
        self.replies
            .recv_timeout(Duration::from_secs(20))
            .expect("the agent did not answer (hang?)")
    }

    /// Runs a command; returns (stdout, stderr, status).
    fn exec(
        &mut self,
        id: u32,
        argv: &[&str],
        stdin: Option<&[u8]>,
    ) -> (Vec<u8>, Vec<u8>, ExitStatus) {
        self.send(&Request::Exec(ExecRequest {
            id,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("KILN_TEST".into(), "yes".into())],
            cwd: None,
            stdin: stdin.is_some(),
            tty: None,
        }));
        match self.recv() {
            Reply::Started { id: i, .. } => assert_eq!(i, id),
            other => panic!("expected Started, got {other:?}"),
        }
        if let Some(data) = stdin {
            self.send(&Request::Stdin {
                id,
                data: data.to_vec(),
            });
            self.send(&Request::Stdin { id, data: vec![] });
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match self.recv() {
                Reply::Stdout { id: i, data } if i == id => out.extend(data),
                Reply::Stderr { id: i, data } if i == id => err.extend(data),
                Reply::Exited { id: i, status, .. } if i == id => return (out, err, status),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn poweroff(mut self) {
        self.send(&Request::Poweroff);
        // Output of a command that has exited may still come (a background
        // process kept its stdout; outside a VM no cgroup ends it), before
        // the answer.
        loop {
            match self.recv() {
                Reply::PoweringOff => break,
                Reply::Stdout { .. } | Reply::Stderr { .. } => {}
                other => panic!("expected PoweringOff, got {other:?}"),
            }
        }
        let status = self.child.wait().expect("wait");
        assert!(status.success());
    }
}

#[test]
fn several_commands_run_one_after_another() {
    let mut a = Agent::start();
    let (out, err, status) = a.exec(
        1,
        &["sh", "-c", "echo out; echo err >&2; echo $KILN_TEST"],
        None,
    );
    assert_eq!(out, b"out\nyes\n");
    assert_eq!(err, b"err\n");
    assert_eq!(status, ExitStatus::Code(0));
    let (_, _, status) = a.exec(2, &["sh", "-c", "exit 7"], None);
    assert_eq!(status, ExitStatus::Code(7));
    let (_, _, status) = a.exec(3, &["sh", "-c", "kill -TERM $$"], None);
    assert_eq!(status, ExitStatus::Signal(15));
    let (out, _, _) = a.exec(4, &["tr", "a-z", "A-Z"], Some(b"stdin works"));
    assert_eq!(out, b"STDIN WORKS");
    a.poweroff();
}

#[test]
fn missing_program_is_reported_not_run() {
    let mut a = Agent::start();
    a.send(&Request::Exec(ExecRequest {
        id: 9,
        argv: vec!["/no/such/program".into()],
        env: vec![],
        cwd: None,
        stdin: false,
        tty: None,
    }));
    match a.recv() {
        Reply::SpawnFailed { id, kind, .. } => {
            assert_eq!(id, 9);
            assert_eq!(kind, SpawnErrorKind::NotFound);
        }
        other => panic!("expected SpawnFailed, got {other:?}"),
    }
    a.send(&Request::Exec(ExecRequest {
        id: 10,
        argv: vec![],
        env: vec![],
        cwd: None,
        stdin: false,
        tty: None,
    }));
    assert!(matches!(a.recv(), Reply::SpawnFailed { id: 10, .. }));
    a.poweroff();
}

#[test]
fn bad_frames_get_errors_and_the_agent_keeps_serving() {
    let mut a = Agent::start();
    // Garbage payload.
    a.raw(&[3, 0, 0, 0, 0xFF, 0xFF, 0xFF]);
    assert!(matches!(a.recv(), Reply::Failed { id: None, .. }));
    // An oversized frame, skipped whole.
    let big = MAX_FRAME + 10;
    let mut frame = (big as u32).to_le_bytes().to_vec();
    frame.resize(4 + big, 0xAA);
    a.raw(&frame);
    match a.recv() {
        Reply::Failed { id: None, message } => assert!(message.contains("exceeds"), "{message}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    // Data for an upload that was never started.
    a.send(&Request::FileData {
        id: 77,
        data: vec![1],
    });
    assert!(matches!(a.recv(), Reply::Failed { id: Some(77), .. }));
    // Still serving.
    let (out, _, status) = a.exec(1, &["echo", "alive"], None);
    assert_eq!(
        (out.as_slice(), status),
        (&b"alive\n"[..], ExitStatus::Code(0))
    );
    a.poweroff();
}

#[test]
fn truncated_stream_ends_the_agent_cleanly() {
    let mut a = Agent::start();
    a.raw(&[100, 0, 0, 0, 1, 2]);
    drop(a.stdin);
    let status = a.child.wait().expect("wait");
    // A cut-off frame is an error exit, never a hang or a panic (101).
    assert_ne!(status.code(), Some(101));
    assert!(!status.success());
}

#[test]
fn files_round_trip_with_their_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub/dir/file.bin");
    let path_s = path.to_str().expect("utf8").to_string();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut a = Agent::start();
    a.send(&Request::PutFile {
        id: 1,
        path: path_s.clone(),
        mode: 0o750,
    });
    for chunk in data.chunks(100_000) {
        a.send(&Request::FileData {
            id: 1,
            data: chunk.to_vec(),
        });
    }
    a.send(&Request::FileData {
        id: 1,
        data: vec![],
    });
    assert_eq!(a.recv(), Reply::Done { id: 1 });
    let meta = std::fs::metadata(&path).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
    assert_eq!(std::fs::read(&path).expect("read"), data);

    a.send(&Request::GetFile {
        id: 2,
        path: path_s,
    });
    let mut back = Vec::new();
    match a.recv() {
        Reply::FileHeader { id: 2, mode, size } => {
            assert_eq!(mode, 0o750);
            assert_eq!(size, data.len() as u64);
        }
        other => panic!("expected FileHeader, got {other:?}"),
    }
    loop {
        match a.recv() {
            Reply::FileData { id: 2, data } if data.is_empty() => break,
            Reply::FileData { id: 2, data } => back.extend(data),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(back, data);

    a.send(&Request::GetFile {
        id: 3,
        path: "/no/such/file".into(),
    });
    assert!(matches!(a.recv(), Reply::Failed { id: Some(3), .. }));
    a.send(&Request::GetFile {
        id: 4,
        path: "/dev/null".into(),
    });
    match a.recv() {
        Reply::Failed {
            id: Some(4),
            message,
        } => assert!(
            message.contains("not a regular file or directory"),
            "{message}"
        ),
        other => panic!("expected Failed, got {other:?}"),
    }
    a.poweroff();
}

/// Runs a host program; panics with its stderr if it fails.
fn host(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(data).expect("write");
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A directory back from `GetFile`: its tar stream, and how it ended.
fn get_tree(a: &mut Agent, id: u32, path: &str) -> (Vec<u8>, Reply) {
    a.send(&Request::GetFile {
        id,
        path: path.into(),
    });
    match a.recv() {
        Reply::TreeHeader { id: i } if i == id => {}
        other => panic!("expected TreeHeader, got {other:?}"),
    }
    let mut stream = Vec::new();
    loop {
        match a.recv() {
            Reply::FileData { id: i, data } if i == id && data.is_empty() => break,
            Reply::FileData { id: i, data } if i == id => stream.extend(data),
            other => panic!("unexpected {other:?}"),
        }
    }
    (stream, a.recv())
}

/// Sends `stream` as a tree for `path`, in pieces; returns the answer.
fn put_tree(a: &mut Agent, id: u32, path: &str, stream: &[u8]) -> Reply {
    a.send(&Request::PutTree {
        id,
        path: path.into(),
    });
    for chunk in stream.chunks(100_000) {
        a.send(&Request::FileData {
            id,
            data: chunk.to_vec(),
        });
    }
    a.send(&Request::FileData { id, data: vec![] });
    a.recv()
}

#[test]
fn trees_round_trip_as_tar_streams() {
    use std::os::unix::fs::{symlink, MetadataExt};
    let top = tempfile::tempdir().expect("tempdir");
    let src = top.path().join("src");
    std::fs::create_dir_all(src.join("sub/empty")).expect("mkdir");
    std::fs::write(src.join("sub/file"), b"some data").expect("write");
    std::fs::set_permissions(src.join("sub/file"), std::fs::Permissions::from_mode(0o640))
        .expect("chmod");
    std::fs::hard_link(src.join("sub/file"), src.join("hard")).expect("link");
    symlink("sub/file", src.join("link")).expect("symlink");
    symlink("/etc", src.join("etc")).expect("symlink");
    let stream = host(
        "tar",
        &["-c", "-C", src.to_str().expect("utf8"), "-f", "-", "."],
        None,
    );

    let mut a = Agent::start();
    // Into a directory that does not exist yet, parents and all.
    let guest = top.path().join("in/the/guest");
    let guest_s = guest.to_str().expect("utf8");
    assert_eq!(put_tree(&mut a, 1, guest_s, &stream), Reply::Done { id: 1 });
    assert_eq!(
        std::fs::read(guest.join("sub/file")).expect("read"),
        b"some data"
    );
    let meta = std::fs::metadata(guest.join("sub/file")).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(meta.nlink(), 2);
    assert_eq!(
        std::fs::read_link(guest.join("etc")).expect("readlink"),
        Path::new("/etc")
    );
    assert!(guest.join("sub/empty").is_dir());

    let (back, end) = get_tree(&mut a, 2, guest_s);
    assert_eq!(end, Reply::Done { id: 2 });
    let listing =
        String::from_utf8(host("tar", &["-t", "-v", "-f", "-"], Some(&back))).expect("utf8");
    for want in [
        "./sub/file",
        "./hard link to ./sub/file",
        "./link -> sub/file",
        "./etc -> /etc",
        "./sub/empty/",
    ] {
        assert!(listing.contains(want), "{want} missing from:\n{listing}");
    }
    a.poweroff();
}

#[test]
fn a_broken_tree_stream_is_a_failure_and_the_agent_goes_on() {
    let top = tempfile::tempdir().expect("tempdir");
    let target = top.path().join("t");
    let mut a = Agent::start();
    let garbage = vec![0x5Au8; 300_000];
    match put_tree(&mut a, 1, target.to_str().expect("utf8"), &garbage) {
        Reply::Failed {
            id: Some(1),
            message,
        } => assert!(message.contains("tar failed"), "{message}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    // A directory that cannot be created.
    std::fs::write(top.path().join("file"), b"x").expect("write");
    let under_a_file = top.path().join("file/t");
    match put_tree(&mut a, 2, under_a_file.to_str().expect("utf8"), b"") {
        Reply::Failed {
            id: Some(2),
            message,
        } => assert!(message.contains("file/t"), "{message}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    // One answer each, and the agent still serves.
    let (out, _, status) = a.exec(3, &["echo", "alive"], None);
    assert_eq!(
        (out.as_slice(), status),
        (&b"alive\n"[..], ExitStatus::Code(0))
    );
    a.poweroff();
}

#[test]
fn a_background_writer_does_not_hold_back_the_exit_status() {
    // The command exits at once but leaves a process writing to its stdout
    // every 0.2 s (for 8 s, so the test cleans up after itself).
    let mut a = Agent::start();
    let start = std::time::Instant::now();
    let (out, _, status) = a.exec(
        1,
        &[
            "sh",
            "-c",
            "timeout 8 sh -c 'while sleep 0.2; do echo .; done' & echo fg",
        ],
        None,
    );
    assert_eq!(status, ExitStatus::Code(0));
    assert!(
        out.starts_with(b"fg\n"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(
        start.elapsed() < Duration::from_secs(7),
        "Exited waited for the background writer: {:?}",
        start.elapsed()
    );
    a.poweroff();
}

/// Starts `argv` on a terminal of `rows` x `cols`, with the host's input.
fn exec_tty(a: &mut Agent, id: u32, argv: &[&str], rows: u16, cols: u16) {
    a.send(&Request::Exec(ExecRequest {
        id,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: None,
        stdin: true,
        tty: Some(WindowSize { rows, cols }),
    }));
    match a.recv() {
        Reply::Started { id: i, .. } => assert_eq!(i, id),
        other => panic!("expected Started, got {other:?}"),
    }
}

/// Collects the terminal's output until it contains `want` (or the command
/// exits: then its status).
fn screen_until(a: &Agent, id: u32, screen: &mut Vec<u8>, want: &str) -> Option<ExitStatus> {
    while !String::from_utf8_lossy(screen).contains(want) {
        match a.recv() {
            Reply::Stdout { id: i, data } if i == id => screen.extend(data),
            Reply::Exited { id: i, status, .. } if i == id => return Some(status),
            Reply::Stderr { id: i, .. } if i == id => panic!("a terminal has no stderr"),
            other => panic!("unexpected {other:?}"),
        }
    }
    None
}

#[test]
fn a_command_on_a_terminal_sees_its_size_and_resizes() {
    let mut a = Agent::start();
    // `tty -s` fails without a controlling terminal; stty reads the size.
    exec_tty(
        &mut a,
        1,
        &[
            "sh",
            "-c",
            "tty -s && stty size; read x; stty size; echo got-$x",
        ],
        30,
        100,
    );
    let mut screen = Vec::new();
    assert_eq!(screen_until(&a, 1, &mut screen, "30 100\r\n"), None);
    a.send(&Request::Resize {
        id: 1,
        rows: 40,
        cols: 120,
    });
    a.send(&Request::Stdin {
        id: 1,
        data: b"ok\r".to_vec(),
    });
    assert_eq!(screen_until(&a, 1, &mut screen, "got-ok\r\n"), None);
    let text = String::from_utf8_lossy(&screen).into_owned();
    assert!(text.contains("40 120\r\n"), "{text:?}");
    // The line discipline echoed what was typed.
    assert!(text.contains("ok\r\n"), "{text:?}");
    let status = screen_until(&a, 1, &mut screen, "never printed");
    assert_eq!(status, Some(ExitStatus::Code(0)));
    a.poweroff();
}

#[test]
fn ctrl_c_on_a_terminal_interrupts_its_foreground_job() {
    let mut a = Agent::start();
    exec_tty(
        &mut a,
        2,
        &["sh", "-c", "echo ready; exec sleep 100"],
        24,
        80,
    );
    let mut screen = Vec::new();
    assert_eq!(screen_until(&a, 2, &mut screen, "ready"), None);
    let started = std::time::Instant::now();
    // Typed, not signalled: the terminal turns ^C into SIGINT.
    a.send(&Request::Stdin {
        id: 2,
        data: vec![0x03],
    });
    let status = screen_until(&a, 2, &mut screen, "never printed");
    assert_eq!(status, Some(ExitStatus::Signal(2)));
    assert!(started.elapsed() < Duration::from_secs(15));
    a.poweroff();
}

#[test]
fn the_end_of_input_ends_a_terminal_reader() {
    let mut a = Agent::start();
    exec_tty(&mut a, 3, &["cat"], 24, 80);
    a.send(&Request::Stdin {
        id: 3,
        data: b"line\r".to_vec(),
    });
    a.send(&Request::Stdin {
        id: 3,
        data: vec![],
    });
    let mut screen = Vec::new();
    let status = screen_until(&a, 3, &mut screen, "never printed");
    assert_eq!(status, Some(ExitStatus::Code(0)));
    // Echoed by the terminal, then printed by cat.
    assert_eq!(String::from_utf8_lossy(&screen), "line\r\nline\r\n");
    a.poweroff();
}

#[test]
fn impossible_window_sizes_are_refused() {
    let mut a = Agent::start();
    a.send(&Request::Exec(ExecRequest {
        id: 4,
        argv: vec!["true".into()],
        env: vec![],
        cwd: None,
        stdin: false,
        tty: Some(WindowSize { rows: 0, cols: 80 }),
    }));
    match a.recv() {
        Reply::SpawnFailed { id, kind, message } => {
            assert_eq!((id, kind), (4, SpawnErrorKind::Other));
            assert!(message.contains("impossible"), "{message}");
        }
        other => panic!("expected SpawnFailed, got {other:?}"),
    }
    exec_tty(&mut a, 5, &["sh", "-c", "read x; stty size"], 24, 80);
    a.send(&Request::Resize {
        id: 5,
        rows: 50,
        cols: 0,
    });
    match a.recv() {
        Reply::Failed { id, message } => {
            assert_eq!(id, Some(5));
            assert!(message.contains("impossible"), "{message}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    // Resizing an unknown command, or one without a terminal, is ignored.
    a.send(&Request::Resize {
        id: 99,
        rows: 10,
        cols: 10,
    });
    a.send(&Request::Stdin {
        id: 5,
        data: b"\r".to_vec(),
    });
    let mut screen = Vec::new();
    assert_eq!(screen_until(&a, 5, &mut screen, "24 80\r\n"), None);
    let status = screen_until(&a, 5, &mut screen, "never printed");
    assert_eq!(status, Some(ExitStatus::Code(0)));
    a.poweroff();
}
