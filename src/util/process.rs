//! Helper processes (qemu, virtiofsd, build scripts): started in their own
//! process group so a terminal's Ctrl-C reaches only kiln, which then stops
//! them in order; and tied to kiln's life so they die with it even if kiln
//! is killed outright.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_agent::poll::poll_until;
use rustix::process::{self, Pid, Signal, WaitId, WaitIdOptions};

/// Runs a short host tool (qemu-img, mkfs.fat, tar…) to completion with no
/// input and returns its stdout; a failure carries the tool's stderr.
pub fn run_tool(cmd: &mut Command, what: &str) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    let out = tie(cmd)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Makes `cmd` start in its own process group and receive SIGKILL when the
/// thread that spawned it (kiln's main thread) ends.
pub fn detach_and_tie(cmd: &mut Command) -> &mut Command {
    cmd.process_group(0);
    tie(cmd)
}

/// Makes `cmd` receive SIGKILL when the thread that spawns it ends, so it
/// does not outlive a kiln killed outright (kiln waits for it otherwise).
pub fn tie(cmd: &mut Command) -> &mut Command {
    let parent = Pid::from_raw(std::process::id() as i32);
    // SAFETY: the closure runs between fork and exec and makes only the
    // prctl and getppid system calls, both async-signal-safe; it touches no
    // memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // The parent may have died before prctl took effect.
            if process::getppid() != parent {
                return Err(std::io::Error::other("kiln exited while starting a helper"));
            }
            Ok(())
        })
    };
    cmd
}

/// Lets `cmd`'s program inherit `fd`, at its own number, which is
/// returned for the program's arguments. kiln's descriptors are
/// close-on-exec; this clears the flag in the child alone. `cmd` keeps
/// `fd` open until it is dropped.
pub fn inherit_fd(cmd: &mut Command, fd: Arc<OwnedFd>) -> RawFd {
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and makes one fcntl
    // call, async-signal-safe, on a descriptor the closure keeps open.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    };
    raw
}

/// A child that is killed (whole process group) and reaped when dropped.
pub struct Guarded {
    pub child: Child,
    reaped: bool,
}

impl Guarded {
    pub fn new(child: Child) -> Guarded {
        Guarded {
            child,
            reaped: false,
        }
    }

    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        let r = self.child.try_wait();
        if let Ok(Some(_)) = r {
            self.reaped = true;
        }
        r
    }

    /// Waits for the child to exit (for one that ends on its own, as tar
    /// does at the end of its input).
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let r = self.child.wait();
        if r.is_ok() {
            self.reaped = true;
        }
        r
    }

    /// Asks the child's process group to stop with SIGTERM, so tools that
    /// clean up after themselves (mmdebstrap's temporary root) can, then
    /// SIGKILLs what is left after `grace` and reaps the child.
    pub fn terminate(&mut self, grace: Duration) {
        if self.reaped {
            return;
        }
        // The child is not reaped, so the group id is still ours.
        let _ = process::kill_process_group(self.pid(), Signal::TERM);
        poll_until(Instant::now() + grace, Duration::from_millis(50), || {
            self.has_exited().then_some(())
        });
        self.kill();
    }

    /// Whether the child has exited, leaving it unreaped (a zombie keeps
    /// its pid, and so the group id, from being reused before `kill`).
    fn has_exited(&self) -> bool {
        // WNOWAIT leaves the child waitable for the reap in `kill`.
        let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
        matches!(
            process::waitid(WaitId::Pid(self.pid()), options),
            Ok(Some(_))
        )
    }

    /// The child's pid, which is also its process group's id.
    fn pid(&self) -> Pid {
        Pid::from_child(&self.child)
    }

    /// SIGKILLs the child's process group and reaps the child.
    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        // The group was created for this child and the child is not yet
        // reaped, so its id cannot have been reused.
        let _ = process::kill_process_group(self.pid(), Signal::KILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// The child writes to the descriptor it inherited; a sibling spawned
    /// without it does not get it. (Through /proc: a shell's `>&N` takes
    /// one digit, and the descriptor may have two.)
    #[test]
    fn an_inherited_descriptor_reaches_that_child_only() {
        let (mut ours, theirs) = std::io::pipe().expect("pipe");
        let theirs = Arc::new(OwnedFd::from(theirs));
        let script = "echo through > /proc/self/fd/$0";
        let mut cmd = Command::new("sh");
        let n = inherit_fd(&mut cmd, theirs.clone());
        let ok = cmd
            .args(["-c", script, &n.to_string()])
            .status()
            .expect("sh");
        assert!(ok.success());
        // Whatever this one has at that number, it is not our pipe.
        let _ = Command::new("sh")
            .args(["-c", script, &n.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("sh");
        drop(cmd);
        drop(theirs);
        let mut got = String::new();
        ours.read_to_string(&mut got).expect("read");
        assert_eq!(got, "through\n", "the pipe reached another child");
    }
}
