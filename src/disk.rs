//! `--disk PATH[,ro][,format=raw|qcow2]`: parsing, checks and the advisory
//! lock that keeps two kiln runs off one image.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        })
    }
}

/// A `--disk` argument as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    pub path: PathBuf,
    pub readonly: bool,
    pub format: Option<DiskFormat>,
}

impl FromStr for DiskArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err("expected PATH[,ro][,format=raw|qcow2]".into());
        }
        let mut arg = DiskArg {
            path: PathBuf::from(path),
            readonly: false,
            format: None,
        };
        for opt in parts {
            match opt {
                "ro" => arg.readonly = true,
                "rw" => arg.readonly = false,
                "format=raw" => arg.format = Some(DiskFormat::Raw),
                "format=qcow2" => arg.format = Some(DiskFormat::Qcow2),
                other => {
                    return Err(format!(
                        "unknown disk option '{other}' (allowed: ro, rw, format=raw, format=qcow2)"
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
        if meta.is_dir() {
            bail!(
                "disk {} is a directory; --disk takes an image file",
                path.display()
            );
        }
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

fn detect_format(mut file: &File) -> DiskFormat {
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == QCOW2_MAGIC => DiskFormat::Qcow2,
        _ => DiskFormat::Raw,
    }
}

/// flock: shared for read-only use, exclusive for writing; never waits.
fn lock(file: &File, shared: bool, path: &Path) -> Result<()> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        bail!(
            "disk {} is in use by another kiln (or another program holding a lock on it): \
             wait for that run to finish, or attach it read-only with ',ro' in both",
            path.display()
        );
    }
    Err(err).with_context(|| format!("locking disk {}", path.display()))
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
    }

    #[test]
    fn missing_disk_names_the_fix() {
        let e = Disk::open(&"/nonexistent/x.img".parse().expect("parse")).expect_err("missing");
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(e.to_string().contains("truncate"), "{e}");
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
