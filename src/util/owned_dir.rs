//! Directories a running kiln owns (a VM's runtime directory, build
//! scratch, cache staging), and the sweep that removes those whose owner is
//! gone. Dropping an [`OwnedDir`] removes it on every ordinary exit; a kiln
//! killed outright (SIGKILL, the OOM killer) cannot, so each directory holds
//! a file its owner keeps locked (flock) for the directory's whole life. The
//! kernel drops that lock when the process dies, however it dies, so a later
//! kiln that can take the lock knows the directory is abandoned.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The file, inside an owned directory, that its owner keeps locked.
const LOCK_FILE: &str = "owner.lock";
/// Where the lock file is created and locked before it takes its name, so
/// that a sweep never finds `owner.lock` unlocked while its owner lives.
const PENDING_LOCK_FILE: &str = ".owner.lock.new";

/// Prefixes of kiln's directories in the temp dir (`$TMPDIR`, else /tmp).
pub const RUN: &str = "kiln-run-";
pub const BOOT: &str = "kiln-boot-";
pub const KERNEL: &str = "kiln-kernel-";
pub const TOOLS: &str = "kiln-tools-";
pub const ROOTFS: &str = "kiln-rootfs-";
/// Exactly these: other `kiln-*` names (the tests' own dirs) are not ours.
const TEMP_PREFIXES: [&str; 5] = [RUN, BOOT, KERNEL, TOOLS, ROOTFS];

/// A directory without a lock file may be one another kiln is creating (or
/// publishing) this instant, or one a kiln from before these locks is still
/// using (a long build's staging directory keeps its mtime for minutes):
/// only one left untouched this long is taken for abandoned.
const UNLOCKED_GRACE: Duration = Duration::from_secs(24 * 60 * 60);

/// A directory that exists, locked, while this value lives.
pub struct OwnedDir {
    // Field order is drop order: the directory is removed while still
    // locked, so no sweep takes it for abandoned half-way.
    dir: tempfile::TempDir,
    lock: File,
}

impl OwnedDir {
    /// A new directory `PREFIX<random>` in the temp dir.
    pub fn new(prefix: &str) -> io::Result<OwnedDir> {
        OwnedDir::new_in(&std::env::temp_dir(), prefix)
    }

    /// A new directory `PREFIX<random>` in `parent`.
    pub fn new_in(parent: &Path, prefix: &str) -> io::Result<OwnedDir> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(parent)?;
        let pending = dir.path().join(PENDING_LOCK_FILE);
        // std opens with O_CLOEXEC: the helpers kiln starts must not inherit
        // the lock and keep it alive after kiln dies.
        let lock = File::options()
            .write(true)
            .create_new(true)
            .open(&pending)?;
        try_lock(&lock)?;
        fs::rename(&pending, dir.path().join(LOCK_FILE))?;
        Ok(OwnedDir { dir, lock })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Renames the directory to `dest`, without its lock file, and gives up
    /// ownership; on failure the directory is removed.
    pub fn publish(self, dest: &Path) -> io::Result<()> {
        let OwnedDir { dir, lock } = self;
        // From here until the rename the directory has no lock file and a
        // fresh mtime: a sweep leaves it alone for UNLOCKED_GRACE.
        fs::remove_file(dir.path().join(LOCK_FILE))?;
        let path = dir.keep();
        let result = fs::rename(&path, dest);
        if result.is_err() {
            let _ = fs::remove_dir_all(&path);
        }
        drop(lock);
        result
    }

    /// What an owner killed outright leaves: the directory with its lock
    /// file, unlocked.
    #[cfg(test)]
    pub fn abandon(self) -> std::path::PathBuf {
        let OwnedDir { dir, lock } = self;
        drop(lock);
        dir.keep()
    }
}

/// Sweeps the temp dir of kiln's abandoned directories.
pub fn sweep_temp() {
    sweep(&std::env::temp_dir(), |name| {
        TEMP_PREFIXES.iter().any(|p| name.starts_with(p))
    });
}

/// Removes the directories in `parent` that `is_ours` claims by name and
/// whose owner is gone. Cheap when there is nothing to remove: one readdir,
/// and a stat and a lock attempt per claimed name. Never fails: what it
/// cannot judge or remove it leaves, and two kilns sweeping at once only
/// find less to remove.
pub fn sweep(parent: &Path, is_ours: impl Fn(&str) -> bool) {
    for dir in abandoned(parent, is_ours) {
        let _ = dir.remove();
    }
}

/// A directory whose owner is gone, claimed: while this lives no other
/// sweep judges it.
pub struct Abandoned {
    path: PathBuf,
    _lock: Option<File>,
}

impl Abandoned {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directory, while its lock (if any) is still held.
    pub fn remove(self) -> io::Result<()> {
        fs::remove_dir_all(&self.path)
    }
}

/// The directories in `parent` that `is_ours` claims by name and whose
/// owner is gone, each claimed (see [`sweep`], which removes them; `kiln
/// cache gc` measures them first).
pub fn abandoned(parent: &Path, is_ours: impl Fn(&str) -> bool) -> Vec<Abandoned> {
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    let uid = rustix::process::geteuid().as_raw();
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(&is_ours) {
            continue;
        }
        let path = entry.path();
        if let Some(lock) = claim(&path, uid) {
            found.push(Abandoned { path, _lock: lock });
        }
    }
    found
}

/// Whether `dir` is an abandoned directory of this user's: `Some` with the
/// dead owner's lock, now held, or `Some(None)` for an old directory without
/// a lock file; `None` if it is live, someone else's, or not a directory.
fn claim(dir: &Path, uid: u32) -> Option<Option<File>> {
    let owned = |m: &fs::Metadata| m.is_dir() && m.uid() == uid;
    if !owned(&fs::symlink_metadata(dir).ok()?) {
        return None;
    }
    match File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(LOCK_FILE))
    {
        Ok(lock) => try_lock(&lock).ok().map(|()| Some(lock)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Stat again now the lock file is known to be missing: an owner
            // that just removed it to publish the directory changed the
            // mtime before.
            let meta = fs::symlink_metadata(dir).ok()?;
            let age = SystemTime::now()
                .duration_since(meta.modified().ok()?)
                .ok()?;
            (owned(&meta) && age >= UNLOCKED_GRACE).then_some(None)
        }
        Err(_) => None,
    }
}

/// Takes the exclusive lock on `f`, or fails at once if another open file
/// description holds it.
fn try_lock(f: &File) -> io::Result<()> {
    rustix::fs::flock(f, rustix::fs::FlockOperation::NonBlockingLockExclusive)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second open file description of `dir`'s lock file: flock locks
    /// belong to those, so this one cannot take the lock while the owner's
    /// holds it, as another process could not.
    fn lock_is_free(dir: &Path) -> bool {
        let f = File::open(dir.join(LOCK_FILE)).expect("lock file");
        try_lock(&f).is_ok()
    }

    #[test]
    fn an_owned_dir_is_locked_while_it_lives_and_removed_when_dropped() {
        let parent = tempfile::tempdir().expect("tempdir");
        let d = OwnedDir::new_in(parent.path(), RUN).expect("owned dir");
        let path = d.path().to_path_buf();
        assert!(path.join(LOCK_FILE).is_file());
        assert!(!path.join(PENDING_LOCK_FILE).exists());
        assert!(!lock_is_free(&path));
        drop(d);
        assert!(!path.exists());
    }

    #[test]
    fn sweep_removes_only_abandoned_dirs_of_ours() {
        let parent = tempfile::tempdir().expect("tempdir");
        let is_ours = |n: &str| n.starts_with(RUN);
        let live = OwnedDir::new_in(parent.path(), RUN).expect("owned dir");

        // An owner that died: its lock file stays, unlocked.
        let dead = OwnedDir::new_in(parent.path(), RUN)
            .expect("owned dir")
            .abandon();
        assert!(lock_is_free(&dead));

        // Without a lock file: maybe being created right now, unless old.
        let fresh = parent.path().join(format!("{RUN}fresh"));
        fs::create_dir(&fresh).expect("mkdir");
        let old = parent.path().join(format!("{RUN}old"));
        fs::create_dir(&old).expect("mkdir");
        File::open(&old)
            .and_then(|f| f.set_modified(SystemTime::now() - 2 * UNLOCKED_GRACE))
            .expect("age the dir");

        // Not ours by name, abandoned or not.
        let other = OwnedDir::new_in(parent.path(), "kiln-test-")
            .expect("owned dir")
            .abandon();

        sweep(parent.path(), is_ours);
        assert!(!dead.exists(), "an abandoned dir was kept");
        assert!(!old.exists(), "an old dir without a lock file was kept");
        assert!(
            live.path().join(LOCK_FILE).is_file(),
            "a live dir was swept"
        );
        assert!(fresh.exists(), "a new dir without a lock file was swept");
        assert!(other.exists(), "a dir not named as ours was swept");
        drop(live);
    }

    #[test]
    fn publish_leaves_no_lock_file_and_releases_the_name() {
        let parent = tempfile::tempdir().expect("tempdir");
        let d = OwnedDir::new_in(parent.path(), ".entry.partial-").expect("owned dir");
        fs::write(d.path().join("f"), b"1").expect("write");
        let staged = d.path().to_path_buf();
        let dest = parent.path().join("entry");
        d.publish(&dest).expect("publish");
        assert!(!staged.exists());
        assert_eq!(fs::read(dest.join("f")).expect("read"), b"1");
        assert!(!dest.join(LOCK_FILE).exists());
    }
}
