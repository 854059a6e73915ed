//! The cgroup2 groups commands run in. Every command gets its own group
//! under one parent that caps memory and processes below what the guest
//! has, so a command that runs out of either is ended (the OOM killer acts
//! inside the group, at once) or refused more processes, while the kernel
//! and the agent keep room to answer the host. Without the parent's limits
//! a guest out of memory thrashed the tools image's page cache for minutes
//! instead of killing anything.
//!
//! The memory limit alone is not always a prompt answer: a group at its
//! limit with many processes (a fork bomb) can spend minutes in reclaim,
//! every task stalled, before the OOM killer acts (measured under nested
//! KVM: 9 s of full stall in 8 s, then no progress for over two minutes).
//! Each group therefore has a watchdog on its memory pressure (PSI), as
//! systemd-oomd has: a group stalled on memory for most of a window while
//! commands are at their limit is ended, and the report says so.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kiln_agent::poll::poll_until;
use kiln_agent::LimitsReport;

use crate::mount::mount_on;

const ROOT: &str = "/sys/fs/cgroup";
/// The parent of every command's group; it carries the limits.
const COMMANDS: &str = "/sys/fs/cgroup/commands";

/// Memory kept out of the commands' reach, as a share of the guest's and
/// within these bounds: the agent, its buffers and the kernel's own needs.
const RESERVE_SHARE: u64 = 8;
const RESERVE_MIN: u64 = 32 << 20;
const RESERVE_MAX: u64 = 256 << 20;

/// The watchdog's PSI trigger: all of a group's tasks stalled on memory
/// for this long within the window (in microseconds; the kernel allows
/// windows of 0.5-10 s). Half of ten seconds is thrashing, not a phase of
/// heavy but progressing work (systemd-oomd's default limit is 60%).
const STALL_US: u64 = 5_000_000;
const WINDOW_US: u64 = 10_000_000;
/// How often the watchdog looks at its stop flag.
const WATCH_TICK: Duration = Duration::from_millis(100);

/// The limits the commands' parent group was given, once set up.
#[derive(Debug, Clone, Copy)]
struct Limits {
    memory_max: u64,
    pids_max: u64,
}

static LIMITS: OnceLock<Limits> = OnceLock::new();

/// Mounts cgroup2 and creates the commands' parent group with its limits.
/// Commands run without a group (and without these limits) if it fails.
pub fn setup() -> io::Result<()> {
    let flags = nix::mount::MsFlags::MS_NOSUID
        | nix::mount::MsFlags::MS_NODEV
        | nix::mount::MsFlags::MS_NOEXEC;
    mount_on("cgroup2", ROOT, "cgroup2", flags, None)?;
    fs::write(
        Path::new(ROOT).join("cgroup.subtree_control"),
        "+memory +pids",
    )?;
    fs::create_dir_all(COMMANDS)?;
    fs::write(
        Path::new(COMMANDS).join("cgroup.subtree_control"),
        "+memory +pids",
    )?;
    let total = mem_total(&fs::read_to_string("/proc/meminfo")?)
        .ok_or_else(|| io::Error::other("no MemTotal in /proc/meminfo"))?;
    let threads_max: u64 = fs::read_to_string("/proc/sys/kernel/threads-max")?
        .trim()
        .parse()
        .map_err(io::Error::other)?;
    let limits = Limits {
        memory_max: memory_max(total),
        // The kernel sizes threads-max from RAM; a quarter stays free so a
        // fork bomb cannot take the agent's last threads.
        pids_max: (threads_max * 3 / 4).max(64),
    };
    fs::write(
        Path::new(COMMANDS).join("memory.max"),
        limits.memory_max.to_string(),
    )?;
    // No swap in the guest, but say so: the limit is the whole answer.
    let _ = fs::write(Path::new(COMMANDS).join("memory.swap.max"), "0");
    fs::write(
        Path::new(COMMANDS).join("pids.max"),
        limits.pids_max.to_string(),
    )?;
    let _ = LIMITS.set(limits);
    Ok(())
}

/// MemTotal from /proc/meminfo, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// What commands together may use of `total` bytes of guest memory.
fn memory_max(total: u64) -> u64 {
    let reserve = (total / RESERVE_SHARE).clamp(RESERVE_MIN, RESERVE_MAX);
    total.saturating_sub(reserve).max(RESERVE_MIN)
}

/// One command's group.
pub struct Group {
    path: PathBuf,
    /// `cgroup.procs`, ready for the child to write itself into between
    /// fork and exec, where nothing may allocate.
    procs: CString,
    limits: Limits,
    /// Set by the memory watchdog when it ended the command.
    stall_killed: Arc<AtomicBool>,
    /// Tells the watchdog the group is going away.
    stop_watch: Arc<AtomicBool>,
}

impl Group {
    /// A fresh group for command `id`; `None` where groups are not set up
    /// (the agent outside a VM, or a kernel without cgroup2).
    pub fn create(id: u32) -> Option<Group> {
        let limits = *LIMITS.get()?;
        let path = Path::new(COMMANDS).join(format!("exec-{id}"));
        // A group left by an earlier command with this id: empty it first.
        if path.exists() {
            remove(&path);
        }
        fs::create_dir(&path).ok()?;
        // The OOM killer ends the whole command, not one of its processes,
        // which would leave the rest of a pipeline half-done.
        let _ = fs::write(path.join("memory.oom.group"), "1");
        let procs = CString::new(path.join("cgroup.procs").as_os_str().as_bytes()).ok()?;
        let group = Group {
            path,
            procs,
            limits,
            stall_killed: Arc::new(AtomicBool::new(false)),
            stop_watch: Arc::new(AtomicBool::new(false)),
        };
        // Without a watchdog (no PSI, or no thread to spare) the command
        // still runs under its limits; only the OOM killer answers then.
        let _ = group.watch_memory_stalls();
        Some(group)
    }

    /// Starts the group's memory watchdog: a thread that waits on a PSI
    /// trigger on the group's `memory.pressure` and, when it fires while
    /// commands are at their memory limit, kills the group.
    fn watch_memory_stalls(&self) -> io::Result<()> {
        let mut pressure = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(self.path.join("memory.pressure"))?;
        // The trigger must be written in one write(2) and lives as long
        // as this descriptor.
        pressure.write_all(format!("full {STALL_US} {WINDOW_US}\0").as_bytes())?;
        let kill = self.path.join("cgroup.kill");
        let limit = self.limits.memory_max;
        let fired = self.stall_killed.clone();
        let stop = self.stop_watch.clone();
        std::thread::Builder::new()
            .name("memory-watch".into())
            .spawn(move || {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                let tick = PollTimeout::try_from(WATCH_TICK).unwrap_or(PollTimeout::MAX);
                while !stop.load(Ordering::Relaxed) {
                    let mut fds = [PollFd::new(pressure.as_fd(), PollFlags::POLLPRI)];
                    match poll(&mut fds, tick) {
                        Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                        Ok(_) => {}
                        Err(_) => return,
                    }
                    let revents = fds[0].revents().unwrap_or(PollFlags::empty());
                    if revents.contains(PollFlags::POLLERR) {
                        // The group is gone.
                        return;
                    }
                    // Stalls from memory pressure elsewhere in the guest
                    // are not this command's doing: act only at the limit.
                    if revents.contains(PollFlags::POLLPRI) && at_limit(limit) {
                        fired.store(true, Ordering::Relaxed);
                        let _ = fs::write(&kill, "1");
                        return;
                    }
                }
            })?;
        Ok(())
    }

    /// Moves the calling process into the group. Runs in the child between
    /// fork and exec: only async-signal-safe calls.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: open/write/close on a NUL-terminated path and a static
        // buffer; no allocation, no locks.
        unsafe {
            let fd = nix::libc::open(
                self.procs.as_ptr(),
                nix::libc::O_WRONLY | nix::libc::O_CLOEXEC,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = nix::libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            nix::libc::close(fd);
            if n != 1 {
                return Err(err);
            }
        }
        Ok(())
    }

    /// The limits the command ran into.
    pub fn report(&self) -> LimitsReport {
        let events = |file: &str, key: &str| {
            fs::read_to_string(self.path.join(file))
                .ok()
                .and_then(|t| field(&t, key))
                .unwrap_or(0)
        };
        LimitsReport {
            oom_kills: events("memory.events", "oom_kill"),
            memory_peak: fs::read_to_string(self.path.join("memory.peak"))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0),
            memory_max: self.limits.memory_max,
            pids_refused: events("pids.events", "max"),
            pids_max: self.limits.pids_max,
            memory_stall_kill: self.stall_killed.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Group {
    /// Whatever the command left running (background processes holding
    /// its output, a fork bomb) ends with it.
    fn drop(&mut self) {
        self.stop_watch.store(true, Ordering::Relaxed);
        remove(&self.path);
    }
}

/// Whether commands together are within 1/16 of their memory limit.
fn at_limit(limit: u64) -> bool {
    fs::read_to_string(Path::new(COMMANDS).join("memory.current"))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .is_some_and(|current| current >= limit - limit / 16)
}

/// Kills every process in the group at `path` and removes it.
fn remove(path: &Path) {
    let _ = fs::write(path.join("cgroup.kill"), "1");
    // rmdir fails with EBUSY until the last process has been reaped.
    poll_until(
        Instant::now() + Duration::from_secs(5),
        Duration::from_millis(10),
        || fs::remove_dir(path).ok(),
    );
}

/// The value of `key` in a flat-keyed cgroup file ("key value" lines).
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_total_and_flat_keyed_files() {
        let meminfo = "MemTotal:         100352 kB\nMemFree:           8000 kB\n";
        assert_eq!(mem_total(meminfo), Some(100_352 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: lots kB\n"), None);
        let events = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 2\noom_group_kill 1\n";
        assert_eq!(field(events, "oom_kill"), Some(2));
        assert_eq!(field(events, "max"), Some(12));
        assert_eq!(field(events, "oom"), Some(1));
        assert_eq!(field(events, "missing"), None);
    }

    #[test]
    fn commands_get_all_but_a_bounded_reserve() {
        // Small guests keep 32 MiB, large ones at most 256 MiB.
        assert_eq!(memory_max(100 << 20), 68 << 20);
        assert_eq!(memory_max(1 << 30), (1 << 30) - (128 << 20));
        assert_eq!(memory_max(16 << 30), (16 << 30) - (256 << 20));
        // Never nothing, even for a guest smaller than the reserve.
        assert_eq!(memory_max(16 << 20), 32 << 20);
    }
}
