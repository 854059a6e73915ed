//! Virtio disks by serial number. There is no udev in the build VM, so the
//! agent makes the `/dev/disk/by-id/virtio-<serial>[-partN]` links itself.

use std::fs;
use std::os::unix::fs::symlink;

/// Keeps the links current while commands run: every block uevent (a
/// partition table re-read, say) triggers a refresh, as udev would.
pub fn watch_uevents() {
    use nix::sys::socket::{
        bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    use std::os::fd::AsRawFd;

    let Ok(sock) = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    ) else {
        return;
    };
    // Multicast group 1: the kernel's own uevents.
    if bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 1)).is_err() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("uevents".into())
        .spawn(move || {
            let mut buf = vec![0u8; 8192];
            loop {
                match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                    Ok(n) => {
                        let msg = &buf[..n];
                        if msg.split(|b| *b == 0).any(|kv| kv == b"SUBSYSTEM=block") {
                            link_by_id();
                        }
                    }
                    Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::ENOBUFS) => {}
                    Err(_) => return,
                }
            }
        });
}

/// The block device (e.g. `vdb`) whose virtio serial is `serial`.
pub fn by_serial(serial: &str) -> Option<String> {
    let entries = fs::read_dir("/sys/block").ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(s) = fs::read_to_string(entry.path().join("serial")) {
            if s.trim() == serial {
                return Some(name);
            }
        }
    }
    None
}

/// (Re)creates `/dev/disk/by-id` links for every virtio disk and partition.
/// Called at boot and before each command, since commands create partitions.
pub fn link_by_id() {
    let dir = "/dev/disk/by-id";
    if fs::create_dir_all(dir).is_err() {
        return;
    }
    // Drop stale links (partitions that no longer exist).
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("virtio-")
                && fs::metadata(e.path()).is_err()
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return;
    };
    for entry in entries.flatten() {
        let disk = entry.file_name().to_string_lossy().into_owned();
        let Ok(serial) = fs::read_to_string(entry.path().join("serial")) else {
            continue;
        };
        let serial = serial.trim();
        if serial.is_empty() || serial.contains('/') {
            continue;
        }
        link(&format!("{dir}/virtio-{serial}"), &disk);
        let Ok(parts) = fs::read_dir(entry.path()) else {
            continue;
        };
        for part in parts.flatten() {
            let pname = part.file_name().to_string_lossy().into_owned();
            if !pname.starts_with(&disk) {
                continue;
            }
            if let Ok(n) = fs::read_to_string(part.path().join("partition")) {
                link(&format!("{dir}/virtio-{serial}-part{}", n.trim()), &pname);
            }
        }
    }
}

fn link(path: &str, dev: &str) {
    let target = format!("../../{dev}");
    if fs::read_link(path)
        .map(|t| t.to_string_lossy() == target)
        .unwrap_or(false)
    {
        return;
    }
    let _ = fs::remove_file(path);
    let _ = symlink(target, path);
}
