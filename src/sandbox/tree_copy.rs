//! Directories copied into and out of the guest as tar streams, with GNU
//! tar at both ends (it keeps owners, modes, symlinks, hard links, xattrs
//! and holes). This is the host's end: the tar archiving a directory for
//! the guest, and for a tree coming back, the tar extracting it into a
//! private staging directory beside the destination, the walk that drops
//! what a guest must not hand the user, and the rename to the destination.
//!
//! Extracting the guest's stream writes nothing outside the staging
//! directory: GNU tar strips leading `/` and refuses `..` in member names
//! and link targets, and creates a symlink that is absolute or holds `..`
//! only once every member is written (a placeholder file stands in until
//! then), so no member is ever written through one.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use rustix::fs::{RenameFlags, CWD};
use rustix::io::Errno;

use crate::sandbox::session::guest_text;
use crate::util::owned_dir::{self, OwnedDir};
use crate::util::process::{detach_and_tie, Guarded};
use crate::util::stream_tail::StreamTail;
use crate::util::tree::{self, Dropped};

/// Copy-outs in progress, beside their destinations: a file's temporary
/// file, a tree's staging directory.
pub const COPY_OUT_PREFIX: &str = ".kiln-copy-out-";

/// Options both ends share: numeric ids (user names differ between guest
/// and host), every xattr namespace.
const COMMON: &[&str] = &["--numeric-owner", "--xattrs", "--xattrs-include=*"];

/// How many of tar's last lines of complaint an error quotes.
const STDERR_LINES: usize = 20;

/// The host's GNU tar, in its own process group (a terminal's Ctrl-C is
/// kiln's to handle) and dying with kiln. `TAR_OPTIONS` is not passed on:
/// options such as `--absolute-names` must not reach the extraction.
fn tar_command() -> Command {
    let mut cmd = Command::new("tar");
    cmd.env_remove("TAR_OPTIONS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    detach_and_tie(&mut cmd);
    cmd
}

/// A running tar with its stderr read on a thread.
struct Tar {
    process: Guarded,
    stderr: StreamTail,
    reader: Option<JoinHandle<()>>,
}

impl Tar {
    fn spawn(mut cmd: Command) -> Result<Tar> {
        let child = cmd
            .spawn()
            .context("starting tar (GNU tar copies directories)")?;
        let mut process = Guarded::new(child);
        let stderr = StreamTail::new();
        let reader = process
            .child
            .stderr
            .take()
            .map(|pipe| stderr.capture(pipe, false));
        Ok(Tar {
            process,
            stderr,
            reader,
        })
    }

    /// Waits for tar to exit; returns its status and what it said, made
    /// safe to print (it names the guest's files).
    fn wait(&mut self) -> Result<(ExitStatus, String)> {
        let status = self.process.wait().context("waiting for tar")?;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let said = self.stderr.tail(STDERR_LINES).join("\n");
        Ok((status, guest_text(said.trim())))
    }
}

/// The host's tar archiving a directory's contents for the guest.
pub struct Outgoing {
    // Field order is drop order: the pipe closes before tar is stopped.
    stdout: ChildStdout,
    tar: Tar,
}

impl Outgoing {
    pub fn start(dir: &Path) -> Result<Outgoing> {
        let mut cmd = tar_command();
        cmd.arg("-c")
            .args(COMMON)
            .arg("--sparse")
            .arg("-C")
            .arg(dir)
            .args(["-f", "-", "."])
            .stdout(Stdio::piped());
        let mut tar = Tar::spawn(cmd)?;
        let stdout = tar
            .process
            .child
            .stdout
            .take()
            .context("tar has no stdout")?;
        Ok(Outgoing { stdout, tar })
    }

    /// The stream's next piece, filling `buf` unless the stream ends
    /// first; 0 at its end.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.stdout.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading tar's output"),
            }
        }
        Ok(n)
    }

    /// Waits for tar: the stream holds the whole directory only if tar
    /// succeeded (it goes on past a file it cannot read, and says so).
    pub fn finish(mut self) -> Result<()> {
        let (status, said) = self.tar.wait()?;
        if !status.success() {
            bail!("tar failed ({status}): {said}");
        }
        Ok(())
    }
}

/// A directory the guest is sending: its stream goes into the host's tar,
/// which extracts it into a private staging directory beside the
/// destination. Dropped before [`Incoming::publish`], it stops tar and
/// removes the staging directory.
pub struct Incoming {
    // Field order is drop order: tar is stopped before its directory goes.
    stdin: Option<ChildStdin>,
    tar: Tar,
    staging: Staging,
    host: PathBuf,
    keep_setuid: bool,
}

impl Incoming {
    /// Starts receiving into a staging directory for `host`, which must
    /// not exist: a tree is copied to a new path, never merged into one.
    pub fn start(host: &Path, keep_setuid: bool) -> Result<Incoming> {
        if fs::symlink_metadata(host).is_ok() {
            bail!(exists(host));
        }
        let parent = match host.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // What a kiln killed outright (SIGKILL) left here.
        owned_dir::sweep(parent, |name| name.starts_with(COPY_OUT_PREFIX));
        let staging = Staging {
            dir: OwnedDir::new_in(parent, COPY_OUT_PREFIX)
                .with_context(|| format!("creating a directory in {}", parent.display()))?,
        };
        let tree = staging.tree();
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tree)
            .with_context(|| format!("creating {}", tree.display()))?;
        let mut cmd = tar_command();
        // Directories' modes are set once they are filled: a guest's
        // read-only directory still gets its contents.
        cmd.args(["-x", "-p", "--delay-directory-restore"])
            .args(COMMON)
            .stdin(Stdio::piped());
        if !keep_setuid {
            // A file capability grants privilege as setuid does.
            cmd.arg("--xattrs-exclude=security.capability");
        }
        if !rustix::process::geteuid().is_root() {
            // Said outright: the files are the invoking user's.
            cmd.arg("--no-same-owner");
        }
        cmd.arg("-C").arg(&tree).args(["-f", "-"]);
        let mut tar = Tar::spawn(cmd)?;
        let stdin = tar.process.child.stdin.take();
        Ok(Incoming {
            stdin,
            tar,
            staging,
            host: host.to_path_buf(),
            keep_setuid,
        })
    }

    /// A piece of the stream.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        let Some(stdin) = self.stdin.as_mut() else {
            bail!("the stream went on after its end");
        };
        if stdin.write_all(data).is_ok() {
            return Ok(());
        }
        // tar stopped reading: the stream is broken, and tar says how.
        self.stdin = None;
        let (status, said) = self.tar.wait()?;
        bail!("the host's tar stopped reading the guest's stream ({status}): {said}")
    }

    /// Ends the stream: tar finishes extracting.
    pub fn close(&mut self) {
        self.stdin = None;
    }

    /// Ends the stream and waits for tar. Returns what tar said though it
    /// succeeded (xattrs it could not set, say).
    pub fn end(&mut self) -> Result<String> {
        self.close();
        let (status, said) = self.tar.wait()?;
        if !status.success() {
            bail!("the host's tar failed ({status}): {said}");
        }
        Ok(said)
    }

    /// Gives the extracted tree its name, unless that exists by now;
    /// without `keep_setuid` first drops what a guest must not hand the
    /// user (see [`tree::drop_special`]).
    pub fn publish(self) -> Result<Dropped> {
        let tree = self.staging.tree();
        let dropped = if self.keep_setuid {
            Dropped::default()
        } else {
            tree::drop_special(&tree)?
        };
        rename_new(&tree, &self.host)?;
        Ok(dropped)
    }
}

/// `from` renamed to `to`, which must not exist.
fn rename_new(from: &Path, to: &Path) -> Result<()> {
    match rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => bail!(exists(to)),
        // A filesystem without RENAME_NOREPLACE: checked, then renamed.
        Err(Errno::INVAL) => {
            if fs::symlink_metadata(to).is_ok() {
                bail!(exists(to));
            }
            fs::rename(from, to).with_context(|| format!("renaming to {}", to.display()))
        }
        Err(e) => Err(e).with_context(|| format!("renaming to {}", to.display())),
    }
}

fn exists(host: &Path) -> String {
    format!(
        "{} exists; kiln copies a guest directory to a new path",
        host.display()
    )
}

/// The staging directory: locked while kiln lives (see `owned_dir`), the
/// tree inside it removed with it whatever modes the guest gave it.
struct Staging {
    dir: OwnedDir,
}

impl Staging {
    fn tree(&self) -> PathBuf {
        self.dir.path().join("tree")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Gone already once published; the directory itself goes with
        // `dir`.
        let _ = tree::remove(&self.tree());
    }
}
