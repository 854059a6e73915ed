//! `--disk PATH[,ro][,format=raw|qcow2][,device]`: parsing, checks and the
//! advisory lock that keeps two kiln runs off one image. A disk's format is
//! decided here, once (the user's `format=`, else the image's magic); the
//! backends and kiln-vmm take it as decided.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use rustix::fs::{flock, FlockOperation};
use rustix::io::Errno;

use kiln_vmm::DiskFormat;

/// A `--disk` argument as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    pub path: PathBuf,
    pub readonly: bool,
    pub format: Option<DiskFormat>,
    /// `,device`: PATH is meant to be a block device. Required for one, so
    /// that a typo cannot hand the guest a host disk.
    pub device: bool,
}

/// What `--disk` accepts, for error messages.
const DISK_TAKES: &str =
    "--disk takes a regular image file, or a block device with ',device' (--disk PATH,device)";

impl FromStr for DiskArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err("expected PATH[,ro][,format=raw|qcow2][,device]".into());
        }
        let mut arg = DiskArg {
            path: PathBuf::from(path),
            readonly: false,
            format: None,
            device: false,
        };
        for opt in parts {
            match opt {
                "ro" => arg.readonly = true,
                "rw" => arg.readonly = false,
                "format=raw" => arg.format = Some(DiskFormat::Raw),
                "format=qcow2" => arg.format = Some(DiskFormat::Qcow2),
                "device" => arg.device = true,
                other => {
                    return Err(format!(
                        "unknown disk option '{other}' \
                         (allowed: ro, rw, format=raw, format=qcow2, device)"
                    ))
                }
            }
        }
        Ok(arg)
    }
}

/// A disk checked, locked and ready to attach. The lock is held as long as
/// this value lives.
#[derive(Debug)]
pub struct Disk {
    pub path: PathBuf,
    pub readonly: bool,
    pub format: DiskFormat,
    _lock: File,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Whether an image whose first bytes are `header` is a qcow2 image.
pub fn is_qcow2(header: &[u8]) -> bool {
    header.starts_with(QCOW2_MAGIC)
}

impl Disk {
    pub fn open(arg: &DiskArg) -> Result<Disk> {
        let path = &arg.path;
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!(
                "disk {} does not exist: create it first, e.g. 'truncate -s 1G {0}' \
                 or 'qemu-img create -f qcow2 {0} 1G'",
                path.display()
            ),
            _ => anyhow::anyhow!("disk {}: {e}", path.display()),
        })?;
        // Judged before opening: opening a FIFO blocks, and opening some
        // character devices has effects of its own (a watchdog arms).
        check_type(arg, &meta.file_type())?;
        let file = OpenOptions::new()
            .read(true)
            .write(!arg.readonly)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    anyhow::anyhow!(
                        "no permission to {} disk {}{}",
                        if arg.readonly { "read" } else { "write" },
                        path.display(),
                        if arg.readonly {
                            ""
                        } else {
                            " (attach it with ',ro' to only read it)"
                        }
                    )
                } else {
                    anyhow::anyhow!("opening disk {}: {e}", path.display())
                }
            })?;
        let detected = detect_format(&file);
        let format = match (arg.format, detected) {
            (Some(f), _) => f,
            (None, d) => d,
        };
        lock(&file, arg.readonly, path)?;
        let path =
            std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
        Ok(Disk {
            path,
            readonly: arg.readonly,
            format,
            _lock: file,
        })
    }
}

/// Refuses anything but a regular file, or a block device asked for with
/// `,device`. `ft` is the type of the link's target, not of a link.
fn check_type(arg: &DiskArg, ft: &std::fs::FileType) -> Result<()> {
    let path = &arg.path;
    // Through a link, name the target too: that is what would be attached.
    let shown = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::canonicalize(path) {
            Ok(target) => format!("{} (a link to {})", path.display(), target.display()),
            Err(_) => path.display().to_string(),
        },
        _ => path.display().to_string(),
    };
    if ft.is_file() {
        if arg.device {
            bail!(
                "disk {shown} is a regular file, not a block device: \
                 drop ',device' to attach it as an image file"
            );
        }
        return Ok(());
    }
    if ft.is_block_device() {
        if !arg.device {
            bail!(
                "disk {shown} is a block device: to give the guest the whole device, \
                 add ',device' (--disk {}{},device) after checking it is the one you mean",
                path.display(),
                if arg.readonly { ",ro" } else { "" }
            );
        }
        return Ok(());
    }
    let (what, hint) = if ft.is_dir() {
        (
            "a directory",
            "; to give the guest a host directory, use --share HOST:GUEST",
        )
    } else if ft.is_char_device() {
        ("a character device", "")
    } else if ft.is_fifo() {
        ("a FIFO", "")
    } else if ft.is_socket() {
        ("a socket", "")
    } else {
        ("of a kind kiln cannot attach", "")
    };
    bail!("disk {shown} is {what}; {DISK_TAKES}{hint}")
}

fn detect_format(mut file: &File) -> DiskFormat {
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) if is_qcow2(&magic) => DiskFormat::Qcow2,
        _ => DiskFormat::Raw,
    }
}

/// flock: shared for read-only use, exclusive for writing; never waits.
fn lock(file: &File, shared: bool, path: &Path) -> Result<()> {
    let op = if shared {
        FlockOperation::NonBlockingLockShared
    } else {
        FlockOperation::NonBlockingLockExclusive
    };
    let Err(err) = flock(file, op) else {
        return Ok(());
    };
    if err == Errno::WOULDBLOCK {
        bail!(
            "disk {} is in use by another kiln (or another program holding a lock on it): \
             wait for that run to finish, or attach it read-only with ',ro' in both",
            path.display()
        );
    }
    Err(std::io::Error::from(err)).with_context(|| format!("locking disk {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        let d: DiskArg = "a.img,ro,format=qcow2".parse().expect("parse");
        assert_eq!(d.path, PathBuf::from("a.img"));
        assert!(d.readonly);
        assert_eq!(d.format, Some(DiskFormat::Qcow2));
        let d: DiskArg = "b.img".parse().expect("parse");
        assert!(!d.readonly);
        assert_eq!(d.format, None);
        assert!("".parse::<DiskArg>().is_err());
        let e = "a.img,format=vmdk".parse::<DiskArg>().expect_err("bad");
        assert!(e.contains("format=vmdk"), "{e}");
        assert!(e.contains("device"), "the allowed list names device: {e}");
    }

    #[test]
    fn parses_device_option() {
        let d: DiskArg = "/dev/sdb,ro,device".parse().expect("parse");
        assert_eq!(d.path, PathBuf::from("/dev/sdb"));
        assert!(d.readonly);
        assert!(d.device);
        assert_eq!(d.format, None);
        let d: DiskArg = "/dev/sdb,device,format=raw".parse().expect("parse");
        assert!(d.device && !d.readonly);
        assert_eq!(d.format, Some(DiskFormat::Raw));
        assert!(!"b.img".parse::<DiskArg>().expect("parse").device);
        assert!("a.img,dev".parse::<DiskArg>().is_err());
        assert!("a.img,device=yes".parse::<DiskArg>().is_err());
    }

    fn open_err(spec: &str) -> String {
        let arg: DiskArg = spec.parse().expect("parse");
        format!("{:#}", Disk::open(&arg).expect_err("must be refused"))
    }

    /// The message names the path, what it is, and what --disk takes.
    fn assert_refused(spec: &str, path: &Path, what: &str) {
        let e = open_err(spec);
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains(what), "{e}");
        assert!(e.contains(DISK_TAKES), "{e}");
    }

    #[test]
    fn character_device_is_refused() {
        let null = Path::new("/dev/null");
        assert_refused("/dev/null", null, "is a character device");
        assert_refused("/dev/null,ro", null, "is a character device");
        assert_refused("/dev/null,device", null, "is a character device");
    }

    #[test]
    fn fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &p,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        // Opening it would block with no writer: refusing first is the point.
        assert_refused(p.to_str().expect("utf8"), &p, "is a FIFO");
    }

    #[test]
    fn socket_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&p).expect("bind");
        assert_refused(p.to_str().expect("utf8"), &p, "is a socket");
    }

    #[test]
    fn directory_is_refused_and_share_is_suggested() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = open_err(dir.path().to_str().expect("utf8"));
        assert!(e.contains("is a directory"), "{e}");
        assert!(e.contains(DISK_TAKES), "{e}");
        assert!(e.contains("--share"), "{e}");
    }

    #[test]
    fn link_is_judged_by_its_target() {
        let dir = tempfile::tempdir().expect("tempdir");
        let to_null = dir.path().join("null.img");
        std::os::unix::fs::symlink("/dev/null", &to_null).expect("symlink");
        let e = open_err(to_null.to_str().expect("utf8"));
        assert!(e.contains("is a character device"), "{e}");
        assert!(e.contains("a link to /dev/null"), "{e}");

        let img = dir.path().join("real.img");
        std::fs::write(&img, vec![0u8; 4096]).expect("write");
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&img, &link).expect("symlink");
        let d = Disk::open(&link.to_str().expect("utf8").parse().expect("parse")).expect("open");
        assert_eq!(d.path, std::fs::canonicalize(&img).expect("canonicalize"));
    }

    #[test]
    fn regular_file_with_device_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("a.img");
        std::fs::write(&img, vec![0u8; 4096]).expect("write");
        let e = open_err(&format!("{},device", img.display()));
        assert!(e.contains("is a regular file, not a block device"), "{e}");
        assert!(e.contains("drop ',device'"), "{e}");
    }

    /// Some block device under /dev, if this machine has one.
    fn any_block_device() -> Option<PathBuf> {
        let mut dirs = vec![PathBuf::from("/dev")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_block_device() {
                    return Some(e.path());
                }
                if ft.is_dir() {
                    dirs.push(e.path());
                }
            }
        }
        None
    }

    #[test]
    fn block_device_needs_the_device_option() {
        let Some(dev) = any_block_device() else {
            eprintln!("no block device under /dev: skipping");
            return;
        };
        let e = open_err(dev.to_str().expect("utf8"));
        assert!(e.contains(&dev.display().to_string()), "{e}");
        assert!(e.contains("is a block device"), "{e}");
        assert!(e.contains("add ',device'"), "{e}");
        // Refused before it is opened, so even a read-only ask never opens it.
        let e = open_err(&format!("{},ro", dev.display()));
        assert!(e.contains(&format!("{},ro,device", dev.display())), "{e}");
    }

    #[test]
    fn missing_disk_names_the_fix() {
        let e = Disk::open(&"/nonexistent/x.img".parse().expect("parse")).expect_err("missing");
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(e.to_string().contains("truncate"), "{e}");
    }

    #[test]
    fn qcow2_is_told_by_its_whole_magic() {
        assert!(is_qcow2(b"QFI\xfb\0\0\0\x03"));
        assert!(is_qcow2(QCOW2_MAGIC));
        assert!(!is_qcow2(b"QFI\xfa\0\0\0\x03"));
        assert!(!is_qcow2(b"QFI"));
        assert!(!is_qcow2(b""));
    }

    #[test]
    fn detects_qcow2_and_locks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("q.img");
        let mut data = QCOW2_MAGIC.to_vec();
        data.resize(512, 0);
        std::fs::write(&p, &data).expect("write");
        let arg: DiskArg = p.to_str().expect("utf8").parse().expect("parse");
        let d = Disk::open(&arg).expect("open");
        assert_eq!(d.format, DiskFormat::Qcow2);
        let e = Disk::open(&arg).expect_err("locked");
        assert!(e.to_string().contains("in use by another kiln"), "{e}");
        drop(d);
        Disk::open(&arg).expect("free again");

        // Two read-only users may share a disk.
        let ro: DiskArg = format!("{},ro", p.display()).parse().expect("parse");
        let a = Disk::open(&ro).expect("ro a");
        let _b = Disk::open(&ro).expect("ro b");
        assert!(Disk::open(&arg).is_err());
        drop(a);
    }
}
