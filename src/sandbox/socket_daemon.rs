//! A helper process that serves the VM on a Unix socket (virtiofsd for a
//! share, passt for the network): started in its own process group, tied
//! to kiln, its stderr always drained and kept for the error that reports
//! its end.

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_agent::poll::poll_until;

use crate::util::process::{detach_and_tie, Guarded};
use crate::util::stream_tail::StreamTail;

/// How long a daemon may take to create its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// A running daemon and what it has said on stderr.
pub struct SocketDaemon {
    pub process: Guarded,
    pub log: StreamTail,
    /// The thread reading its stderr into `log`.
    pub reader: Option<JoinHandle<()>>,
}

impl SocketDaemon {
    /// Starts `cmd`, which serves a socket it was given; `what` names it
    /// in the errors.
    pub fn spawn(mut cmd: Command, what: &str) -> Result<SocketDaemon> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        detach_and_tie(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let mut process = Guarded::new(child);
        // Always drained, so the daemon never blocks on a full stderr pipe.
        let log = StreamTail::new();
        let reader = process.child.stderr.take().map(|e| log.capture(e, false));
        Ok(SocketDaemon {
            process,
            log,
            reader,
        })
    }

    /// Starts `cmd` and waits for it to create `socket`; `what` names it
    /// in the errors.
    pub fn start(cmd: Command, socket: &Path, what: &str) -> Result<SocketDaemon> {
        let SocketDaemon {
            mut process,
            log,
            reader,
        } = SocketDaemon::spawn(cmd, what)?;
        let started = poll_until(
            Instant::now() + SOCKET_WAIT,
            Duration::from_millis(5),
            || {
                if socket.exists() {
                    return Some(Ok(()));
                }
                match process.try_wait() {
                    Ok(Some(status)) => Some(Err(status)),
                    _ => None,
                }
            },
        );
        match started {
            Some(Ok(())) => Ok(SocketDaemon {
                process,
                log,
                reader,
            }),
            Some(Err(status)) => {
                if let Some(r) = reader {
                    let _ = r.join();
                }
                bail!("{what} exited ({status}): {}", log.tail(10).join("\n"))
            }
            None => bail!(
                "{what} did not create its socket in {} s",
                SOCKET_WAIT.as_secs()
            ),
        }
    }
}
