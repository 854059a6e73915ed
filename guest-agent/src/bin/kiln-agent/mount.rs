//! Mounting a filesystem on a directory made for it: the agent's own mounts
//! at boot (kernel filesystems, the tools image, cgroup2) and the host's
//! (shares).

use std::fs;
use std::io;

use nix::mount::{mount, MsFlags};

/// Which of the two steps failed; each caller words it its own way.
#[derive(Debug)]
pub enum MountError {
    /// The mount point could not be created.
    MountPoint(io::Error),
    /// mount(2) refused.
    Mount(nix::Error),
}

impl From<MountError> for io::Error {
    fn from(e: MountError) -> io::Error {
        match e {
            MountError::MountPoint(e) => e,
            MountError::Mount(e) => e.into(),
        }
    }
}

/// Mounts `source` (of type `fstype`, with `data` options) on `target`,
/// creating `target` and its parents first.
pub fn mount_on(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), MountError> {
    fs::create_dir_all(target).map_err(MountError::MountPoint)?;
    mount(Some(source), target, Some(fstype), flags, data).map_err(MountError::Mount)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_point_is_made_first_and_each_failure_says_which_step() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("a/b");
        let target = target.to_str().expect("utf8");
        // Unprivileged, mount(2) is refused (EPERM); as root, a bogus
        // filesystem type is (ENODEV). Either way after mkdir -p.
        match mount_on("none", target, "kiln-no-such-fs", MsFlags::empty(), None) {
            Err(MountError::Mount(e)) => {
                assert!(matches!(e, nix::Error::EPERM | nix::Error::ENODEV), "{e}");
                let io: io::Error = MountError::Mount(e).into();
                assert_eq!(io.raw_os_error(), Some(e as i32));
            }
            other => panic!("{other:?}"),
        }
        assert!(dir.path().join("a/b").is_dir());

        let file = dir.path().join("file");
        fs::write(&file, b"").expect("write");
        let under_file = file.join("x");
        match mount_on(
            "none",
            under_file.to_str().expect("utf8"),
            "tmpfs",
            MsFlags::empty(),
            None,
        ) {
            Err(e @ MountError::MountPoint(_)) => {
                let io: io::Error = e.into();
                assert_eq!(io.raw_os_error(), Some(nix::libc::ENOTDIR));
            }
            other => panic!("{other:?}"),
        }
    }
}
