//! Directories copied in and out as tar streams, by the guest's GNU tar: it
//! keeps owners, modes, symlinks, hard links, xattrs and holes, and refuses
//! member names that would leave the target.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use kiln_agent::frame::DATA_CHUNK;
use kiln_agent::Reply;

use crate::serve::Outbox;
use crate::{exec, reaper};

/// Options of both directions: numeric ids (the guest's user names mean
/// nothing on the host) and every xattr namespace.
const COMMON: &[&str] = &["--numeric-owner", "--xattrs", "--xattrs-include=*"];

/// How much of tar's stderr a `Failed` reply carries: its end, where tar
/// says why it failed.
const STDERR_KEPT: usize = 4096;

/// Chunks queued for one tree's tar: bounded, so a slow extraction holds
/// the host back instead of piling the stream up in guest memory.
const QUEUED_CHUNKS: usize = 16;

/// Trees being received, by request id: the sender feeding each one's tar,
/// or `None` once it failed (its `Failed` reply is sent; the rest of its
/// stream is dropped).
#[derive(Default)]
pub struct TreeUploads {
    open: HashMap<u32, Option<SyncSender<Vec<u8>>>>,
}

impl TreeUploads {
    pub fn begin(&mut self, id: u32, path: String, out: &Outbox) {
        let feed = match extract(id, path, out.clone()) {
            Ok(tx) => Some(tx),
            Err(message) => {
                out.send(&Reply::Failed {
                    id: Some(id),
                    message,
                });
                None
            }
        };
        self.open.insert(id, feed);
    }

    /// Whether `FileData` with this id belongs to a tree.
    pub fn has(&self, id: u32) -> bool {
        self.open.contains_key(&id)
    }

    /// One chunk of a tree's stream. An empty chunk ends it: its tar's
    /// thread answers once tar has extracted everything.
    pub fn data(&mut self, id: u32, data: Vec<u8>) {
        if data.is_empty() {
            // Dropping the sender closes tar's stdin.
            self.open.remove(&id);
            return;
        }
        let Some(slot) = self.open.get_mut(&id) else {
            return;
        };
        if slot.as_ref().is_some_and(|tx| tx.send(data).is_err()) {
            *slot = None;
        }
    }
}

/// Starts tar extracting into `path`; returns where its stream goes.
fn extract(id: u32, path: String, out: Outbox) -> Result<SyncSender<Vec<u8>>, String> {
    std::fs::create_dir_all(&path).map_err(|e| format!("{path}: {e}"))?;
    let mut cmd = tar_command()?;
    cmd.args(["-x", "-p"])
        .args(COMMON)
        .args(["-C", &path, "-f", "-"])
        .stdin(Stdio::piped());
    let mut tar = Tar::spawn(cmd, &path)?;
    let stdin = tar
        .child
        .stdin
        .take()
        .ok_or_else(|| format!("tar for {path} has no stdin"))?;
    let (tx, rx) = mpsc::sync_channel(QUEUED_CHUNKS);
    std::thread::Builder::new()
        .name(format!("put-tree-{id}"))
        .spawn(move || {
            feed(stdin, rx);
            out.send(&match tar.finish() {
                Ok(()) => Reply::Done { id },
                Err(message) => Reply::Failed {
                    id: Some(id),
                    message,
                },
            });
        })
        .map_err(|e| format!("starting a thread for {path}: {e}"))?;
    Ok(tx)
}

fn feed(mut stdin: ChildStdin, rx: Receiver<Vec<u8>>) {
    for chunk in rx {
        // A write error means tar stopped reading (a broken stream): it
        // says why when it is waited for, and the rest is dropped.
        if stdin.write_all(&chunk).is_err() {
            return;
        }
    }
}

/// Sends the directory `path` back as a tar stream of its contents, on the
/// caller's thread (a thread of its own, as for a file).
pub fn send(id: u32, path: &str, out: &Outbox) -> Result<(), String> {
    let mut cmd = tar_command()?;
    cmd.arg("-c")
        .args(COMMON)
        .args(["--sparse", "-C", path, "-f", "-", "."])
        .stdout(Stdio::piped());
    let mut tar = Tar::spawn(cmd, path)?;
    let mut stdout = tar
        .child
        .stdout
        .take()
        .ok_or_else(|| format!("tar for {path} has no stdout"))?;
    out.send(&Reply::TreeHeader { id });
    let mut buf = vec![0u8; DATA_CHUNK];
    loop {
        let n = read_full(&mut stdout, &mut buf)
            .map_err(|e| format!("reading tar's output for {path}: {e}"))?;
        if n == 0 {
            break;
        }
        if !out.send(&Reply::FileData {
            id,
            data: buf[..n].to_vec(),
        }) {
            // The host is gone; tar is killed with `tar`.
            return Ok(());
        }
    }
    out.send(&Reply::FileData { id, data: vec![] });
    drop(stdout);
    tar.finish()?;
    out.send(&Reply::Done { id });
    Ok(())
}

/// Fills `buf` unless the stream ends first: a pipe gives at most 64 KiB a
/// read, and fewer, fuller frames are cheaper to send.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// GNU tar from the tools image, with the agent's base environment (no
/// `TAR_OPTIONS` from anywhere).
fn tar_command() -> Result<Command, String> {
    let tar = exec::find_tool("tar").ok_or(
        "the guest has no tar, which copying a directory needs (a --tools image without \
         GNU tar?)",
    )?;
    let mut cmd = Command::new(tar);
    cmd.env_clear()
        .envs(exec::base_env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Ok(cmd)
}

/// A running tar, killed and reaped if dropped before [`Tar::finish`].
struct Tar {
    child: Child,
    stderr: Option<JoinHandle<String>>,
    path: String,
    waited: bool,
}

impl Tar {
    fn spawn(mut cmd: Command, path: &str) -> Result<Tar, String> {
        // Tracked, so the reaper (PID 1) leaves it to us.
        let mut guard = reaper::spawn_guard();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting tar for {path}: {e}"))?;
        guard.track(child.id());
        drop(guard);
        // Read on a thread: tar blocks on a full stderr pipe otherwise.
        // Without the thread the pipe is closed and tar's messages lost.
        let stderr = child.stderr.take().and_then(|pipe| {
            std::thread::Builder::new()
                .name("tar-stderr".into())
                .spawn(move || read_tail(pipe))
                .ok()
        });
        Ok(Tar {
            child,
            stderr,
            path: path.to_string(),
            waited: false,
        })
    }

    /// Waits for tar; an error carries the end of what it said.
    fn finish(mut self) -> Result<(), String> {
        let status = self.child.wait();
        self.waited = true;
        reaper::untrack(self.child.id());
        let said = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("tar failed on {} ({s}): {said}", self.path)),
            Err(e) => Err(format!("waiting for tar on {}: {e}", self.path)),
        }
    }
}

impl Drop for Tar {
    fn drop(&mut self) {
        if !self.waited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            reaper::untrack(self.child.id());
        }
    }
}

/// The last [`STDERR_KEPT`] bytes of `pipe`, from a line's start, trimmed.
fn read_tail(mut pipe: impl Read) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut cut = false;
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > STDERR_KEPT {
                    kept.drain(..kept.len() - STDERR_KEPT);
                    cut = true;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let mut text = String::from_utf8_lossy(&kept).into_owned();
    if cut {
        if let Some(at) = text.find('\n') {
            text.drain(..=at);
        }
        text.insert_str(0, "...\n");
    }
    text.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::read_tail;

    #[test]
    fn a_long_stderr_keeps_its_last_whole_lines() {
        let text: String = (0..2000).map(|i| format!("tar: line {i}\n")).collect();
        let tail = read_tail(text.as_bytes());
        assert!(tail.starts_with("...\ntar: line "), "{tail}");
        assert!(tail.ends_with("tar: line 1999"), "{tail}");
        assert!(tail.len() <= super::STDERR_KEPT + 4);
        assert_eq!(read_tail(&b"  tar: short\n"[..]), "tar: short");
    }
}
