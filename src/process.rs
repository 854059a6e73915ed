//! Helper processes (qemu, virtiofsd, build scripts): started in their own
//! process group so a terminal's Ctrl-C reaches only kiln, which then stops
//! them in order; and tied to kiln's life so they die with it even if kiln
//! is killed outright.

use std::process::{Child, Command};

use std::os::unix::process::CommandExt;

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
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only prctl and
    // getppid, both async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("kiln exited while starting a helper"));
            }
            Ok(())
        })
    };
    cmd
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

    /// Asks the child's process group to stop with SIGTERM, so tools that
    /// clean up after themselves (mmdebstrap's temporary root) can, then
    /// SIGKILLs what is left after `grace` and reaps the child.
    pub fn terminate(&mut self, grace: std::time::Duration) {
        if self.reaped {
            return;
        }
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: plain syscall; the child is not reaped, so the group id
        // is still ours.
        unsafe {
            libc::kill(-pgid, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline && !self.has_exited() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.kill();
    }

    /// Whether the child has exited, leaving it unreaped (a zombie keeps
    /// its pid, and so the group id, from being reused before `kill`).
    fn has_exited(&self) -> bool {
        // SAFETY: an all-zero siginfo_t is a valid value to be overwritten.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`; WNOWAIT leaves the child
        // waitable for the reap in `kill`.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: waitid filled `info` (si_pid is 0 if nothing has exited).
        r == 0 && unsafe { info.si_pid() } != 0
    }

    /// SIGKILLs the child's process group and reaps the child.
    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: plain syscall; the group was created for this child and the
        // child is not yet reaped, so its id cannot have been reused.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
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
