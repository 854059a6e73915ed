//! Walks of a directory tree received from elsewhere (a guest), through
//! file descriptors: no symlink is ever followed, and no path grows past
//! PATH_MAX however deep the tree. One drops what must not be handed to
//! the user (setuid, setgid and sticky bits; device nodes), the other makes
//! a tree removable whatever modes it came with.

use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, Dir, FileType, Mode, OFlags, CWD};
use rustix::io::Errno;

/// The setuid, setgid and sticky bits.
const SPECIAL: u32 = 0o7000;

/// What [`drop_special`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Files and directories whose special bits were cleared.
    pub special_bits: usize,
    /// The device nodes removed, relative to the root.
    pub devices: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    DropSpecial,
    MakeRemovable,
}

/// Clears the setuid, setgid and sticky bits of every regular file and
/// directory under `root` (and of `root`), and removes its device nodes.
/// Symlinks are left as they are, never followed.
pub fn drop_special(root: &Path) -> io::Result<Dropped> {
    let mut dropped = Dropped::default();
    walk(root, Policy::DropSpecial, &mut dropped)?;
    Ok(dropped)
}

/// Removes the tree at `root`, if there is one, even where its modes deny
/// its owner access (a directory of mode 0o000 or 0o500 that kiln owns).
pub fn remove(root: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(root) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    walk(root, Policy::MakeRemovable, &mut Dropped::default())?;
    std::fs::remove_dir_all(root)
}

/// A directory being walked.
struct Frame {
    dir: Dir,
    /// Relative to the root, for messages.
    path: PathBuf,
    /// The mode it gets once walked, where that must change.
    mode_after: Option<u32>,
}

fn walk(root: &Path, policy: Policy, dropped: &mut Dropped) -> io::Result<()> {
    let fail = |rel: &Path, e: Errno| {
        let e = io::Error::from(e);
        io::Error::new(e.kind(), format!("{}: {e}", root.join(rel).display()))
    };
    let st = rfs::lstat(root).map_err(|e| fail(Path::new(""), e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", root.display()),
        ));
    }
    let first = open_dir(CWD, root, st.st_mode, policy, dropped)
        .and_then(|(fd, after)| Ok((Dir::new(fd)?, after)))
        .map_err(|e| fail(Path::new(""), e))?;
    let mut stack = vec![Frame {
        dir: first.0,
        path: PathBuf::new(),
        mode_after: first.1,
    }];
    while let Some(top) = stack.last_mut() {
        let Some(entry) = top.dir.read() else {
            // Walked whole: its own mode last, so it stayed open to us.
            if let Some(done) = stack.pop() {
                if let Some(mode) = done.mode_after {
                    done.dir
                        .fd()
                        .and_then(|fd| rfs::fchmod(fd, Mode::from_raw_mode(mode)))
                        .map_err(|e| fail(&done.path, e))?;
                }
            }
            continue;
        };
        let entry = entry.map_err(|e| fail(&top.path, e))?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let rel = top.path.join(OsStr::from_bytes(name.to_bytes()));
        let at = top.dir.fd().map_err(|e| fail(&top.path, e))?;
        match visit(at, name, policy, dropped).map_err(|e| fail(&rel, e))? {
            Visited::Directory(fd, mode_after) => {
                let dir = Dir::new(fd).map_err(|e| fail(&rel, e))?;
                stack.push(Frame {
                    dir,
                    path: rel,
                    mode_after,
                });
            }
            Visited::RemovedDevice => dropped.devices.push(rel),
            Visited::Done => {}
        }
    }
    Ok(())
}

/// What [`visit`] did with an entry.
enum Visited {
    /// Opened, to be walked, with the mode it gets back after.
    Directory(OwnedFd, Option<u32>),
    RemovedDevice,
    Done,
}

/// Handles the entry `name` in the directory `at`.
fn visit(
    at: BorrowedFd<'_>,
    name: &CStr,
    policy: Policy,
    dropped: &mut Dropped,
) -> Result<Visited, Errno> {
    let st = rfs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let mode = st.st_mode & 0o7777;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => {
            let (fd, after) = open_dir(at, name, st.st_mode, policy, dropped)?;
            Ok(Visited::Directory(fd, after))
        }
        FileType::RegularFile if policy == Policy::DropSpecial && mode & SPECIAL != 0 => {
            // By name, but only after lstat saw a regular file: the tree is
            // kiln's own, nobody swaps it for a symlink meanwhile.
            rfs::chmodat(
                at,
                name,
                Mode::from_raw_mode(mode & !SPECIAL),
                AtFlags::empty(),
            )?;
            dropped.special_bits += 1;
            Ok(Visited::Done)
        }
        FileType::BlockDevice | FileType::CharacterDevice if policy == Policy::DropSpecial => {
            rfs::unlinkat(at, name, AtFlags::empty())?;
            Ok(Visited::RemovedDevice)
        }
        _ => Ok(Visited::Done),
    }
}

/// Opens the directory `name` (in `at`) for the walk, first giving its
/// owner the access the walk needs (read and search; to remove, write too)
/// where its mode denies it. Returns it with the mode it must get back.
fn open_dir<P: rustix::path::Arg + Copy>(
    at: BorrowedFd<'_>,
    name: P,
    raw_mode: u32,
    policy: Policy,
    dropped: &mut Dropped,
) -> Result<(OwnedFd, Option<u32>), Errno> {
    let mode = raw_mode & 0o7777;
    let (need, mut after) = match policy {
        Policy::DropSpecial if mode & SPECIAL != 0 => {
            dropped.special_bits += 1;
            (0o500, Some(mode & !SPECIAL))
        }
        Policy::DropSpecial => (0o500, None),
        Policy::MakeRemovable => (0o700, None),
    };
    if mode & need != need {
        rfs::chmodat(at, name, Mode::from_raw_mode(mode | need), AtFlags::empty())?;
        if policy == Policy::DropSpecial {
            after = Some(after.unwrap_or(mode));
        }
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rfs::openat(at, name, flags, Mode::empty())?;
    Ok((fd, after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o7777
    }

    fn chmod(p: &Path, m: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(m)).expect("chmod");
    }

    #[test]
    fn special_bits_go_and_nothing_outside_the_tree_is_touched() {
        let top = tempfile::tempdir().expect("tempdir");
        let outside = top.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        let outside_file = outside.join("suid");
        fs::write(&outside_file, b"x").expect("write");
        chmod(&outside_file, 0o4755);
        let outside_dir = outside.join("sgid");
        fs::create_dir(&outside_dir).expect("mkdir");
        chmod(&outside_dir, 0o2775);

        let root = top.path().join("tree");
        fs::create_dir_all(root.join("a/b")).expect("mkdir");
        fs::write(root.join("suid"), b"x").expect("write");
        chmod(&root.join("suid"), 0o4755);
        fs::write(root.join("a/both"), b"x").expect("write");
        chmod(&root.join("a/both"), 0o6750);
        fs::write(root.join("a/b/plain"), b"x").expect("write");
        chmod(&root.join("a/b/plain"), 0o640);
        chmod(&root.join("a/b"), 0o1777);
        // Links out of the tree, to the file and the directory: never followed.
        symlink(&outside_file, root.join("to-suid")).expect("symlink");
        symlink(&outside_dir, root.join("a/to-sgid")).expect("symlink");
        symlink("../../outside/suid", root.join("a/relative")).expect("symlink");
        // A directory its owner may not enter, holding a setuid file.
        fs::create_dir(root.join("closed")).expect("mkdir");
        fs::write(root.join("closed/suid"), b"x").expect("write");
        chmod(&root.join("closed/suid"), 0o4700);
        chmod(&root.join("closed"), 0o2000);
        chmod(&root, 0o2755);

        let dropped = drop_special(&root).expect("walk");
        assert_eq!(dropped.devices, Vec::<PathBuf>::new());
        // suid, a/both, a/b, closed/suid, closed, the root.
        assert_eq!(dropped.special_bits, 6);
        assert_eq!(mode(&root), 0o755);
        assert_eq!(mode(&root.join("suid")), 0o755);
        assert_eq!(mode(&root.join("a/both")), 0o750);
        assert_eq!(mode(&root.join("a/b")), 0o777);
        assert_eq!(mode(&root.join("a/b/plain")), 0o640);
        assert_eq!(mode(&root.join("closed")), 0o000);
        chmod(&root.join("closed"), 0o700);
        assert_eq!(mode(&root.join("closed/suid")), 0o700);
        assert_eq!(mode(&outside_file), 0o4755, "followed a symlink out");
        assert_eq!(mode(&outside_dir), 0o2775, "followed a symlink out");
        assert!(fs::symlink_metadata(root.join("to-suid"))
            .expect("lstat")
            .is_symlink());
    }

    #[test]
    fn device_nodes_are_removed_where_they_can_be_made() {
        if !rustix::process::geteuid().is_root() {
            // Only root makes device nodes; a tree without them is the
            // case above.
            return;
        }
        let top = tempfile::tempdir().expect("tempdir");
        let root = top.path().join("tree");
        fs::create_dir_all(root.join("dev")).expect("mkdir");
        let null = rfs::makedev(1, 3);
        rfs::mknodat(
            CWD,
            root.join("dev/null"),
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            null,
        )
        .expect("mknod");
        rfs::mknodat(
            CWD,
            root.join("disk"),
            FileType::BlockDevice,
            Mode::from_raw_mode(0o666),
            rfs::makedev(7, 0),
        )
        .expect("mknod");
        fs::write(root.join("dev/keep"), b"x").expect("write");
        let mut dropped = drop_special(&root).expect("walk");
        dropped.devices.sort();
        assert_eq!(
            dropped.devices,
            [PathBuf::from("dev/null"), PathBuf::from("disk")]
        );
        assert!(!root.join("dev/null").exists() && !root.join("disk").exists());
        assert!(root.join("dev/keep").is_file());
    }

    #[test]
    fn a_tree_deeper_than_path_max_is_walked() {
        let top = tempfile::tempdir().expect("tempdir");
        let root = top.path().join("tree");
        fs::create_dir(&root).expect("mkdir");
        let name = "d".repeat(200);
        let mut fd =
            rfs::open(&root, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).expect("open");
        // 30 levels of 201 bytes: over 6000 bytes of path.
        for _ in 0..30 {
            rfs::mkdirat(&fd, name.as_str(), Mode::from_raw_mode(0o755)).expect("mkdir");
            fd = rfs::openat(
                &fd,
                name.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
            )
            .expect("open");
            rfs::fchmod(&fd, Mode::from_raw_mode(0o2755)).expect("chmod");
        }
        let dropped = drop_special(&root).expect("walk");
        assert_eq!(dropped.special_bits, 30);
        let st = rfs::fstat(&fd).expect("stat");
        assert_eq!(st.st_mode & 0o7777, 0o755);
        remove(&root).expect("remove");
        assert!(!root.exists());
    }

    #[test]
    fn a_tree_its_owner_cannot_enter_is_removed() {
        let top = tempfile::tempdir().expect("tempdir");
        let root = top.path().join("tree");
        fs::create_dir_all(root.join("a/b")).expect("mkdir");
        fs::write(root.join("a/b/f"), b"x").expect("write");
        symlink("/", root.join("a/root")).expect("symlink");
        chmod(&root.join("a/b"), 0o500);
        chmod(&root.join("a"), 0o000);
        chmod(&root, 0o500);
        remove(&root).expect("remove");
        assert!(!root.exists());
        assert_eq!(fs::read_dir(top.path()).expect("ls").count(), 0);
        // Nothing there is no error.
        remove(&root).expect("remove again");
    }

    #[test]
    fn only_a_directory_is_walked() {
        let top = tempfile::tempdir().expect("tempdir");
        let file = top.path().join("f");
        fs::write(&file, b"x").expect("write");
        chmod(&file, 0o4755);
        symlink(top.path(), top.path().join("link")).expect("symlink");
        assert!(drop_special(&file).is_err());
        assert!(drop_special(&top.path().join("link")).is_err());
        assert_eq!(mode(&file), 0o4755);
    }
}
