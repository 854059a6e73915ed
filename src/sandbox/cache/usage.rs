//! Which cache entries a running kiln uses, and when each was last used:
//! what `kiln cache gc` goes by.
//!
//! Every kiln holds a shared flock on `.<entry>.use`, beside the entry, for
//! as long as it uses the entry (a VM's kernel, tools image and initramfs
//! for the VM's whole life, a build's root archive for the build's). gc
//! removes an entry only once it holds that lock exclusively, without
//! waiting; so it skips what is in use, and no kiln starts using an entry
//! while gc removes it. This is not the entry's build lock (`.<entry>.lock`,
//! see [`super::Staging`]): builds of one entry wait for each other, and
//! must not wait for the kilns that merely use it (two `kiln build`s of one
//! recipe would run one after the other).
//!
//! The last use is the mtime of that same `.use` file, set through the
//! descriptor opened for the lock: no second path lookup, no write to the
//! entry itself (whose files' times the manifest check compares, and whose
//! directory's mtime tells `kernel::locate` which kernel was built last),
//! and unlike the atime, not left to `relatime` or `noatime`. An entry
//! without a `.use` file (built by a kiln from before these) counts as used
//! when it was built.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustix::fs::{futimens, FlockOperation, Timespec, Timestamps, UTIME_NOW, UTIME_OMIT};

use super::{beside, lock_file};

/// Marks a cache entry in use while it lives.
#[derive(Debug)]
pub struct CacheUse {
    _lock: Option<fs::File>,
}

impl CacheUse {
    /// Marks `entry` (e.g. `<cache>/kernel/<key>`, whether it exists yet
    /// or not) in use, and records its use now. Waits only while a gc is
    /// removing the entry (a few renames), after which the caller finds it
    /// missing: callers take this before looking at the entry. Best effort:
    /// a cache kiln cannot write (a read-only share of it) is used without
    /// a lock, as nothing can remove an entry from it through this kiln.
    pub fn begin(entry: &Path) -> CacheUse {
        if let Some(parent) = entry.parent() {
            let _ = fs::create_dir_all(parent);
        }
        let lock = lock_file(&use_lock(entry), FlockOperation::LockShared, true)
            .ok()
            .flatten();
        if let Some(f) = &lock {
            // UTIME_NOW needs only write access where an explicit time
            // needs ownership: a cache shared by a group records them all.
            let now = Timestamps {
                last_access: Timespec {
                    tv_sec: 0,
                    tv_nsec: UTIME_OMIT,
                },
                last_modification: Timespec {
                    tv_sec: 0,
                    tv_nsec: UTIME_NOW,
                },
            };
            let _ = futimens(f, &now);
        }
        CacheUse { _lock: lock }
    }

    /// For what is not in the cache (the user's own kernel or tools image).
    pub fn none() -> CacheUse {
        CacheUse { _lock: None }
    }
}

/// The lock every kiln using `entry` holds shared.
pub(super) fn use_lock(entry: &Path) -> PathBuf {
    beside(entry, "use")
}

/// When `entry` was last used: its [`use_lock`]'s mtime, or the entry's
/// own if later (rebuilt since, or never used by a kiln that records it).
pub(super) fn last_used(entry: &Path) -> SystemTime {
    let mtime = |p: &Path| {
        fs::symlink_metadata(p)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    mtime(&use_lock(entry)).max(mtime(entry))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Whether another open file description can take `entry`'s use lock
    /// exclusively, as gc does.
    fn unused(entry: &Path) -> bool {
        lock_file(
            &use_lock(entry),
            FlockOperation::NonBlockingLockExclusive,
            false,
        )
        .is_ok()
    }

    #[test]
    fn a_use_holds_the_entry_and_records_when() {
        let dir = tempfile::tempdir().expect("tempdir");
        let entry = dir.path().join("kernel").join("k");
        fs::create_dir_all(&entry).expect("mkdir");
        let long_ago = SystemTime::now() - Duration::from_secs(90 * 86400);
        fs::File::open(&entry)
            .and_then(|f| f.set_modified(long_ago))
            .expect("age");
        assert_eq!(last_used(&entry), long_ago, "no use recorded yet");

        let using = CacheUse::begin(&entry);
        let age = SystemTime::now()
            .duration_since(last_used(&entry))
            .unwrap_or_default();
        assert!(age < Duration::from_secs(60), "last use not recorded");
        assert!(!unused(&entry), "an entry in use could be removed");
        let also = CacheUse::begin(&entry);
        drop(using);
        assert!(!unused(&entry), "a second user does not count");
        drop(also);
        assert!(unused(&entry));
        assert!(
            fs::metadata(entry.join("..").join(".k.lock")).is_err(),
            "using is not building"
        );
    }

    #[test]
    fn a_user_of_a_removed_lock_file_locks_its_replacement() {
        let dir = tempfile::tempdir().expect("tempdir");
        let entry = dir.path().join("e");
        // gc holds the lock and removes the file; a kiln that opened it
        // just before waits on the removed file.
        let gc = lock_file(&use_lock(&entry), FlockOperation::LockExclusive, true)
            .expect("lock")
            .expect("created");
        let waiter = {
            let entry = entry.clone();
            std::thread::spawn(move || CacheUse::begin(&entry))
        };
        std::thread::sleep(Duration::from_millis(100));
        fs::remove_file(use_lock(&entry)).expect("rm");
        drop(gc);
        let using = waiter.join().expect("user");
        assert!(
            use_lock(&entry).is_file(),
            "the lock file was not made anew"
        );
        assert!(!unused(&entry), "the user holds a removed file");
        drop(using);
    }
}
