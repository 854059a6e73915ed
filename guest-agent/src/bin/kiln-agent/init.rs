//! Early boot as PID 1: kernel filesystems, the tools image as root, power off.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_agent::TOOLS_DISK_SERIAL;
use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot};

use crate::disks;

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
    fs::create_dir_all(target)?;
    mount(Some(source), target, Some(fstype), flags, data).map_err(|source_err| InitError::Mount {
        what: format!("{fstype} ({source})"),
        target: target.to_string(),
        source: source_err,
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
    let start = Instant::now();
    loop {
        if let Some(name) = disks::by_serial(TOOLS_DISK_SERIAL) {
            return Ok(format!("/dev/{name}"));
        }
        if start.elapsed() > limit {
            return Err(InitError::NoToolsDisk);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
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
