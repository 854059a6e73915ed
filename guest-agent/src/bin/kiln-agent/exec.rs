//! Runs one command for the host and streams its output back.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_agent::frame::DATA_CHUNK;
use kiln_agent::{ExecRequest, ExitStatus, Reply, SpawnErrorKind, WindowSize};

use crate::pty::{self, Pty};
use crate::serve::Outbox;
use crate::{limits, reaper};

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

/// After the command exits, its output pipes normally reach EOF at once; a
/// background process it left may hold them open. The agent stops waiting
/// once output has been quiet this long...
const DRAIN_IDLE: Duration = Duration::from_secs(1);
/// ...or, if it keeps coming, this long after the exit. A send the host is
/// still taking (backpressure) is always waited for, so no output the
/// command wrote before it exited is cut off.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Shared between a command's output pumps and its waiter.
#[derive(Default)]
struct Drain {
    /// Chunks sent so far.
    sent: AtomicU64,
    /// Pumps in the middle of a send.
    sending: AtomicU32,
}

/// A started command, as the request loop tracks it.
pub struct Running {
    pid: u32,
    exited: Arc<AtomicBool>,
    /// Its stdin, if the host sends one.
    pub stdin: Option<SyncSender<Vec<u8>>>,
    /// The master side of its terminal, if it runs on one.
    terminal: Option<std::fs::File>,
}

impl Running {
    pub fn has_exited(&self) -> bool {
        self.exited.load(Ordering::Relaxed)
    }

    /// Signals the command's process group, unless it is gone (its pid may be reused).
    pub fn signal(&self, signal: i32) -> Result<(), String> {
        let sig = nix::sys::signal::Signal::try_from(signal)
            .map_err(|_| format!("{signal} is not a signal number"))?;
        if !self.has_exited() {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid as i32), sig);
        }
        Ok(())
    }

    /// Resizes the command's terminal; nothing to do for a command
    /// without one, or one that has ended.
    pub fn resize(&self, size: WindowSize) -> Result<(), String> {
        match &self.terminal {
            Some(master) if !self.has_exited() => pty::set_size(master, size),
            _ => Ok(()),
        }
    }
}

/// Starts the command; `None` if it could not be started (already reported).
pub fn start(req: ExecRequest, out: Outbox) -> Option<Running> {
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
    // Resolved here rather than by std: with a program path, std can start
    // the command with posix_spawn (vfork) instead of fork, which under
    // emulation is much cheaper for a multi-threaded agent.
    let path_var = req
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .or_else(|| BASE_ENV.iter().find(|(k, _)| *k == "PATH").map(|(_, v)| *v))
        .unwrap_or_default();
    let Some(resolved) = resolve(program, path_var) else {
        out.send(&Reply::SpawnFailed {
            id,
            kind: SpawnErrorKind::NotFound,
            message: format!("{program}: not found"),
        });
        return None;
    };
    let terminal = match req.tty.map(Pty::open).transpose() {
        Ok(t) => t,
        Err(message) => {
            out.send(&Reply::SpawnFailed {
                id,
                kind: SpawnErrorKind::Other,
                message,
            });
            return None;
        }
    };
    let mut cmd = Command::new(resolved);
    cmd.arg0(program)
        .args(&req.argv[1..])
        .env_clear()
        .envs(BASE_ENV.iter().copied())
        .envs(req.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if let Some(t) = &terminal {
        let [stdin, stdout, stderr] = match t.slave_stdio() {
            Ok(stdio) => stdio,
            Err(e) => {
                out.send(&Reply::SpawnFailed {
                    id,
                    kind: SpawnErrorKind::Other,
                    message: format!("opening the command's terminal: {e}"),
                });
                return None;
            }
        };
        cmd.stdin(stdin).stdout(stdout).stderr(stderr);
        // Its own session (hence process group, for `signal`) with the
        // terminal as controlling terminal. No process_group(0): setsid
        // fails in a process that already leads a group.
        // SAFETY: `become_session_leader` makes only async-signal-safe
        // calls (setsid, ioctl) and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(pty::become_session_leader);
        }
    } else {
        cmd.stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a signal reaches its whole pipeline.
        .process_group(0);
    }
    // The agent's own directory is already `/`; setting it only when asked
    // keeps the posix_spawn path open.
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let group = limits::Group::create(id).map(Arc::new);
    if let Some(g) = &group {
        let g = g.clone();
        // SAFETY: `enter` makes only async-signal-safe calls (open, write,
        // close) on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || g.enter());
        }
    }

    let mut guard = reaper::spawn_guard();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            drop(guard);
            let kind = match e.kind() {
                ErrorKind::NotFound => SpawnErrorKind::NotFound,
                ErrorKind::PermissionDenied => SpawnErrorKind::NotExecutable,
                _ if e.raw_os_error() == Some(nix::errno::Errno::ENOEXEC as i32) => {
                    SpawnErrorKind::NotExecutable
                }
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
    // The command holds a reference to the group (for the child's hook);
    // without it, the waiter's is the last and its drop ends the group.
    // It also holds copies of the terminal's slave side, closed here (and
    // the agent's own with `Pty`) so the master ends when the command's do.
    drop(cmd);
    let master = terminal.map(|t| t.master);
    out.send(&Reply::Started { id, pid });

    let drain = Arc::new(Drain::default());
    let (done_tx, done_rx) = mpsc::channel::<()>();
    if let Some(stdout) = child.stdout.take() {
        pump(
            stdout,
            out.clone(),
            id,
            false,
            drain.clone(),
            done_tx.clone(),
        );
    }
    if let Some(stderr) = child.stderr.take() {
        pump(
            stderr,
            out.clone(),
            id,
            true,
            drain.clone(),
            done_tx.clone(),
        );
    }
    let exited = Arc::new(AtomicBool::new(false));
    let mut stdin_tx = child.stdin.take().map(feed_stdin);
    if let Some(m) = &master {
        // Failing to duplicate the master leaves the command without
        // output or input, not without its exit status.
        if let Ok(reader) = m.try_clone() {
            pump(
                reader,
                out.clone(),
                id,
                false,
                drain.clone(),
                done_tx.clone(),
            );
        }
        if req.stdin {
            stdin_tx = m.try_clone().ok().map(|m| pty::feed(m, exited.clone()));
        }
    }
    drop(done_tx);

    let waiter_exited = exited.clone();
    let waiter_out = out.clone();
    let waiter = std::thread::Builder::new()
        .name(format!("exec-{id}"))
        .spawn(move || {
            let waited = child.wait();
            waiter_exited.store(true, Ordering::Relaxed);
            let status = match waited {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(c), _) => ExitStatus::Code(c),
                    (None, Some(sig)) => ExitStatus::Signal(sig),
                    (None, None) => ExitStatus::Code(-1),
                },
                Err(_) => ExitStatus::Code(-1),
            };
            reaper::untrack(pid);
            wait_for_output(&done_rx, &drain, Instant::now());
            let limits = group.map(|g| {
                let report = g.report();
                // Ends what the command left running, and the group.
                drop(g);
                report
            });
            waiter_out.send(&Reply::Exited { id, status, limits });
        });
    if waiter.is_err() {
        // No thread to wait for it (the guest is out of resources): stop the
        // command rather than leave it unwaited and tracked forever.
        let child_pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(child_pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(child_pid, None);
        reaper::untrack(pid);
        exited.store(true, Ordering::Relaxed);
        out.send(&Reply::Exited {
            id,
            status: ExitStatus::Signal(nix::libc::SIGKILL),
            limits: None,
        });
    }
    Some(Running {
        pid,
        exited,
        stdin: stdin_tx,
        terminal: master,
    })
}

/// `program` in the base environment's PATH: where the agent finds the
/// tools it runs itself (tar).
pub fn find_tool(program: &str) -> Option<PathBuf> {
    let path_var = BASE_ENV
        .iter()
        .find(|(k, _)| *k == "PATH")
        .map(|(_, v)| *v)
        .unwrap_or_default();
    resolve(program, path_var)
}

/// The environment the agent's own tools run with.
pub fn base_env() -> impl Iterator<Item = (&'static str, &'static str)> {
    BASE_ENV.iter().copied()
}

/// Finds `program` as execvp would: as given if it contains a slash, else in
/// the directories of `path_var`.
fn resolve(program: &str, path_var: &str) -> Option<PathBuf> {
    if program.is_empty() {
        return None;
    }
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    path_var
        .split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Waits until both output pipes reached EOF, within the limits above.
fn wait_for_output(done: &Receiver<()>, drain: &Drain, exited: Instant) {
    let mut last = drain.sent.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    loop {
        match done.recv_timeout(Duration::from_millis(100)) {
            Ok(()) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = drain.sent.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        if drain.sending.load(Ordering::Relaxed) > 0 {
            continue;
        }
        if last_change.elapsed() >= DRAIN_IDLE || exited.elapsed() >= DRAIN_LIMIT {
            return;
        }
    }
}

fn pump<R: Read + Send + 'static>(
    mut pipe: R,
    out: Outbox,
    id: u32,
    is_stderr: bool,
    drain: Arc<Drain>,
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
                        let data = buf[..n].to_vec();
                        let msg = if is_stderr {
                            Reply::Stderr { id, data }
                        } else {
                            Reply::Stdout { id, data }
                        };
                        drain.sending.fetch_add(1, Ordering::Relaxed);
                        let sent = out.send(&msg);
                        drain.sending.fetch_sub(1, Ordering::Relaxed);
                        drain.sent.fetch_add(1, Ordering::Relaxed);
                        if !sent {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    // EIO on a terminal's master: every slave is closed.
                    Err(_) => break,
                }
            }
            let _ = done.send(());
        });
}

fn feed_stdin(mut stdin: ChildStdin) -> SyncSender<Vec<u8>> {
    // Bounded, so a command that does not read its stdin holds the host back
    // instead of piling the input up in guest memory.
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(16);
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
