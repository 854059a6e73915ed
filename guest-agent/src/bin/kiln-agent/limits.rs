//! The cgroup2 groups commands run in. Every command gets its own group
//! under one parent that caps memory and processes below what the guest
//! has, so a command that runs out of either is ended (the OOM killer acts
//! inside the group, at once) or refused more processes, while the kernel
//! and the agent keep room to answer the host. Without the parent's limits
//! a guest out of memory thrashed the tools image's page cache for minutes
//! instead of killing anything.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
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
        Some(Group {
            path,
            procs,
            limits,
        })
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
        }
    }
}

impl Drop for Group {
    /// Whatever the command left running (background processes holding
    /// its output, a fork bomb) ends with it.
    fn drop(&mut self) {
        remove(&self.path);
    }
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
