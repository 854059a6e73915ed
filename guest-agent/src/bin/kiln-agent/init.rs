//! Early boot as PID 1: kernel filesystems, the tools image as root, power off.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_agent::poll::poll_until;
use kiln_agent::TOOLS_DISK_SERIAL;
use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot};

use crate::disks;
use crate::mount::{mount_on, MountError};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mounting {what} on {target}: {source}")]
    Mount {
        what: String,
        target: String,
        source: nix::Error,
    },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("no disk with serial '{TOOLS_DISK_SERIAL}' (the tools image) appeared")]
    NoToolsDisk,
    #[error("switching root: {0}")]
    SwitchRoot(nix::Error),
}

fn do_mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    mount_on(source, target, fstype, flags, data).map_err(|e| match e {
        MountError::MountPoint(e) => InitError::Io(e),
        MountError::Mount(source_err) => InitError::Mount {
            what: format!("{fstype} ({source})"),
            target: target.to_string(),
            source: source_err,
        },
    })
}

/// /dev, /proc and /sys, needed to find the disks and the agent port.
pub fn early_mounts() -> Result<(), InitError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    do_mount("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, None)?;
    do_mount("proc", "/proc", "proc", nosuid, None)?;
    do_mount("sysfs", "/sys", "sysfs", nosuid, None)?;
    Ok(())
}

/// Mounts the tools image read-only under a tmpfs overlay and makes it `/`.
pub fn enter_tools_root() -> Result<(), InitError> {
    let dev = wait_for_tools_disk(Duration::from_secs(10))?;
    do_mount(
        &dev,
        "/run/kiln/lower",
        "squashfs",
        MsFlags::MS_RDONLY,
        None,
    )?;
    do_mount(
        "tmpfs",
        "/run/kiln/rw",
        "tmpfs",
        MsFlags::empty(),
        Some("mode=0755"),
    )?;
    fs::create_dir_all("/run/kiln/rw/upper")?;
    fs::create_dir_all("/run/kiln/rw/work")?;
    do_mount(
        "overlay",
        "/newroot",
        "overlay",
        MsFlags::empty(),
        Some("lowerdir=/run/kiln/lower,upperdir=/run/kiln/rw/upper,workdir=/run/kiln/rw/work"),
    )?;
    for dir in ["dev", "proc", "sys"] {
        let target = format!("/newroot/{dir}");
        fs::create_dir_all(&target)?;
        mount(
            Some(&*format!("/{dir}")),
            &*target,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| InitError::Mount {
            what: format!("/{dir} (move)"),
            target: target.clone(),
            source: e,
        })?;
    }
    chdir("/newroot").map_err(InitError::SwitchRoot)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(InitError::SwitchRoot)?;
    chroot(".").map_err(InitError::SwitchRoot)?;
    chdir("/").map_err(InitError::SwitchRoot)?;

    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    do_mount("tmpfs", "/run", "tmpfs", nosuid, Some("mode=0755"))?;
    do_mount("tmpfs", "/tmp", "tmpfs", nosuid, Some("mode=1777"))?;
    do_mount(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID,
        Some("ptmxmode=0666,mode=0620"),
    )?;
    do_mount("tmpfs", "/dev/shm", "tmpfs", nosuid, Some("mode=1777"))?;
    // Tools expect these even without udev.
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/0", "/dev/stdin");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/1", "/dev/stdout");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/2", "/dev/stderr");
    if !Path::new("/etc/mtab").exists() {
        let _ = std::os::unix::fs::symlink("../proc/self/mounts", "/etc/mtab");
    }
    let _ = nix::unistd::sethostname("kiln");
    Ok(())
}

fn wait_for_tools_disk(limit: Duration) -> Result<String, InitError> {
    poll_until(Instant::now() + limit, Duration::from_millis(5), || {
        disks::by_serial(TOOLS_DISK_SERIAL)
    })
    .map(|name| format!("/dev/{name}"))
    .ok_or(InitError::NoToolsDisk)
}

/// Mount points that stay until the end: the root and the kernel's own.
const KEEP_MOUNTED: &[&str] = &[
    "/", "/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/run", "/tmp",
];

/// Before power-off: stop every process and unmount what commands left
/// mounted (a user's filesystem, a share), so the disks are left clean and
/// complete rather than merely synced.
pub fn quiesce() {
    use nix::sys::signal::{kill, Signal};
    // -1: every process but PID 1 (us); ESRCH means there was none.
    if kill(nix::unistd::Pid::from_raw(-1), Signal::SIGKILL).is_ok() {
        poll_until(
            Instant::now() + Duration::from_secs(2),
            Duration::from_millis(10),
            || (!user_processes_left()).then_some(()),
        );
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let points: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|p| p.starts_with('/') && !KEEP_MOUNTED.contains(&p.as_str()))
        .collect();
    for point in points.iter().rev() {
        if let Err(e) = nix::mount::umount(point.as_str()) {
            eprintln!("kiln-agent: unmounting {point}: {e}");
        }
    }
    nix::unistd::sync();
}

/// Whether any process other than PID 1 and kernel threads is still there.
fn user_processes_left() -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.chars().all(|c| c.is_ascii_digit())
            && name != "1"
            // Kernel threads (and reaped zombies) have no command line.
            && fs::read(e.path().join("cmdline")).is_ok_and(|c| !c.is_empty())
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Ends the VM. kiln boots the guest with `reboot=t` and tells the hypervisor
/// not to reboot, so a restart request ends the VM with no ACPI needed.
pub fn power_off() -> ! {
    nix::unistd::sync();
    loop {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        std::thread::sleep(Duration::from_secs(1));
    }
}
