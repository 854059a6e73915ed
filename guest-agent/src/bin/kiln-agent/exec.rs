//! Runs one command for the host and streams its output back.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use kiln_agent::frame::DATA_CHUNK;
use kiln_agent::{ExecRequest, ExitStatus, Reply, SpawnErrorKind};

use crate::reaper;
use crate::serve::Outbox;

const BASE_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("USER", "root"),
    ("LOGNAME", "root"),
    ("SHELL", "/bin/bash"),
    ("LANG", "C.UTF-8"),
    ("TERM", "dumb"),
];

/// How long output may stay silent after the command exited before the agent
/// stops waiting for EOF (a background process may hold the pipes open).
const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// Starts the command. Returns the sender for its stdin if it has one.
pub fn start(req: ExecRequest, out: Outbox) -> Option<Sender<Vec<u8>>> {
    let id = req.id;
    let Some(program) = req.argv.first() else {
        out.send(&Reply::SpawnFailed {
            id,
            kind: SpawnErrorKind::Other,
            message: "empty command line".into(),
        });
        return None;
    };
    if let Some(cwd) = &req.cwd {
        if !std::path::Path::new(cwd).is_dir() {
            out.send(&Reply::SpawnFailed {
                id,
                kind: SpawnErrorKind::Other,
                message: format!("working directory {cwd} does not exist in the guest"),
            });
            return None;
        }
    }
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..])
        .env_clear()
        .envs(BASE_ENV.iter().copied())
        .envs(req.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(req.cwd.as_deref().unwrap_or("/"))
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let mut guard = reaper::spawn_guard();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            drop(guard);
            let kind = match e.kind() {
                ErrorKind::NotFound => SpawnErrorKind::NotFound,
                ErrorKind::PermissionDenied => SpawnErrorKind::PermissionDenied,
                _ => SpawnErrorKind::Other,
            };
            let message = format!("{program}: {e}");
            out.send(&Reply::SpawnFailed { id, kind, message });
            return None;
        }
    };
    let pid = child.id();
    guard.track(pid);
    drop(guard);
    out.send(&Reply::Started { id, pid });

    let progress = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    if let Some(stdout) = child.stdout.take() {
        pump(
            stdout,
            out.clone(),
            id,
            false,
            progress.clone(),
            done_tx.clone(),
        );
    }
    if let Some(stderr) = child.stderr.take() {
        pump(
            stderr,
            out.clone(),
            id,
            true,
            progress.clone(),
            done_tx.clone(),
        );
    }
    drop(done_tx);
    let stdin_tx = child.stdin.take().map(feed_stdin);

    let _ = std::thread::Builder::new()
        .name(format!("exec-{id}"))
        .spawn(move || {
            let status = match child.wait() {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(c), _) => ExitStatus::Code(c),
                    (None, Some(sig)) => ExitStatus::Signal(sig),
                    (None, None) => ExitStatus::Code(-1),
                },
                Err(_) => ExitStatus::Code(-1),
            };
            reaper::untrack(pid);
            wait_for_output(&done_rx, &progress);
            out.send(&Reply::Exited { id, status });
        });
    stdin_tx
}

/// Waits until both output pipes reached EOF, or output went quiet for
/// [`DRAIN_IDLE`] after the command exited.
fn wait_for_output(done: &Receiver<()>, progress: &AtomicU64) {
    let mut last = progress.load(Ordering::Relaxed);
    loop {
        match done.recv_timeout(DRAIN_IDLE) {
            Ok(()) => {}
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                let now = progress.load(Ordering::Relaxed);
                if now == last {
                    return;
                }
                last = now;
            }
        }
    }
}

fn pump<R: Read + Send + 'static>(
    mut pipe: R,
    out: Outbox,
    id: u32,
    is_stderr: bool,
    progress: Arc<AtomicU64>,
    done: Sender<()>,
) {
    let _ = std::thread::Builder::new()
        .name(format!("out-{id}"))
        .spawn(move || {
            let mut buf = vec![0u8; DATA_CHUNK];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        progress.fetch_add(n as u64, Ordering::Relaxed);
                        let data = buf[..n].to_vec();
                        let msg = if is_stderr {
                            Reply::Stderr { id, data }
                        } else {
                            Reply::Stdout { id, data }
                        };
                        if !out.send(&msg) {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = done.send(());
        });
}

fn feed_stdin(mut stdin: ChildStdin) -> Sender<Vec<u8>> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            for chunk in rx {
                // An empty chunk is EOF; a write error means the command
                // stopped reading, and the rest of its input is dropped.
                if chunk.is_empty() || stdin.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
    tx
}
