//! The cache as users see and prune it: `kiln cache ls` lists the entries
//! ([`list`]), `kiln cache gc` removes the least recently used ([`gc`]).

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::FlockOperation;
use serde::Serialize;

use super::usage::{last_used, use_lock};
use super::{build_lock, is_staging, lock_file, staging_prefix};
use crate::util::owned_dir::{self, OwnedDir};

/// The directories of the cache that hold entries, one per kind: kernel
/// and tools images, root bootstraps and one mirror's packages are
/// directories; initramfs archives are files (`<hash>.cpio`).
pub const KINDS: [&str; 8] = [
    "kernel",
    "tools",
    "initramfs",
    "rootfs",
    super::debs::KIND,
    super::HOST_TOOLS_KIND,
    super::LAYERS_KIND,
    super::TREES_KIND,
];

/// One entry of the cache.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub kind: &'static str,
    /// Its name in its kind's directory.
    pub key: String,
    pub path: PathBuf,
    /// Bytes allocated on disk, as du counts them: each file once however
    /// many links it has, symbolic links not followed.
    pub size: u64,
    /// When a kiln last used it, in seconds since the Unix epoch.
    pub last_used: u64,
    /// Whether a running kiln holds it (see [`super::CacheUse`]).
    pub in_use: bool,
}

/// A staging directory whose kiln died before it finished.
#[derive(Debug, Clone, Serialize)]
pub struct Leftover {
    pub path: PathBuf,
    pub size: u64,
}

/// What [`gc`] removes: every entry unused for longer than `older_than`,
/// then more of the least recently used until the entries take at most
/// `keep` bytes. Neither removes only leftovers.
#[derive(Debug, Default, Clone)]
pub struct Policy {
    pub keep: Option<u64>,
    pub older_than: Option<Duration>,
    /// Say what would go, and remove nothing.
    pub dry_run: bool,
}

/// What [`gc`] did (or with `dry_run`, would do).
#[derive(Debug, Serialize)]
pub struct Report {
    pub dry_run: bool,
    /// Least recently used first.
    pub removed: Vec<Entry>,
    /// Entries the policy picked that a running kiln uses (or builds).
    pub in_use: Vec<Entry>,
    pub leftovers: Vec<Leftover>,
    /// Bytes removed, entries and leftovers.
    pub freed: u64,
    /// Bytes the entries that are left take.
    pub total: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("cannot read the cache directory {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot remove {}: {source}; check that it and its directory are yours and writable, \
         then run 'kiln cache gc' again",
        path.display()
    )]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The entries of the cache at `root`, by kind, then most recently used
/// first.
pub fn list(root: &Path) -> Result<Vec<Entry>, GcError> {
    let mut entries = Vec::new();
    for kind in KINDS {
        let dir = root.join(kind);
        let read = match fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(source) => return Err(GcError::Read { path: dir, source }),
        };
        for e in read.flatten() {
            let Some(key) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            // Dot names are staging, lock and temp files; the build logs
            // beside the entries are files.
            let is_entry = |m: &fs::Metadata| {
                if kind == "initramfs" {
                    m.is_file() && key.ends_with(".cpio")
                } else {
                    m.is_dir()
                }
            };
            let path = e.path();
            if key.starts_with('.') || !fs::symlink_metadata(&path).is_ok_and(|m| is_entry(&m)) {
                continue;
            }
            entries.push(Entry {
                kind,
                size: disk_usage(&path),
                last_used: unix_seconds(last_used(&path)),
                in_use: in_use(&path),
                key,
                path,
            });
        }
    }
    entries.sort_by(|a, b| {
        (a.kind, std::cmp::Reverse(a.last_used), &a.key).cmp(&(
            b.kind,
            std::cmp::Reverse(b.last_used),
            &b.key,
        ))
    });
    Ok(entries)
}

/// Prunes the cache at `root` by `policy`, as of `now`: first the staging
/// directories of builds whose kiln died, then entries, least recently
/// used first. An entry a running kiln uses is never removed; it is
/// reported. An entry is moved into a staging directory of gc's own before
/// it is removed, so that no kiln ever sees half of one, and what a gc
/// killed half-way leaves is a leftover the next kiln sweeps.
pub fn gc(root: &Path, policy: &Policy, now: SystemTime) -> Result<Report, GcError> {
    let mut report = Report {
        dry_run: policy.dry_run,
        removed: Vec::new(),
        in_use: Vec::new(),
        leftovers: Vec::new(),
        freed: 0,
        total: 0,
    };
    for kind in KINDS {
        for dir in owned_dir::abandoned(&root.join(kind), is_staging) {
            let leftover = Leftover {
                path: dir.path().to_path_buf(),
                size: disk_usage(dir.path()),
            };
            if !policy.dry_run {
                dir.remove().map_err(|source| GcError::Remove {
                    path: leftover.path.clone(),
                    source,
                })?;
            }
            report.freed += leftover.size;
            report.leftovers.push(leftover);
        }
    }

    let mut entries = list(root)?;
    entries.sort_by(|a, b| (a.last_used, &a.path).cmp(&(b.last_used, &b.path)));
    let mut total: u64 = entries.iter().map(|e| e.size).sum();
    let now = unix_seconds(now);
    for e in entries {
        let old = policy
            .older_than
            .is_some_and(|d| now.saturating_sub(e.last_used) > d.as_secs());
        let over = policy.keep.is_some_and(|k| total > k);
        if !(old || over) {
            continue;
        }
        match remove(&e, policy.dry_run)? {
            Removal::Removed => {
                total -= e.size;
                report.freed += e.size;
                report.removed.push(e);
            }
            Removal::InUse => report.in_use.push(Entry { in_use: true, ..e }),
            // Another gc (or a hand) was first: nothing freed by us.
            Removal::Gone => total -= e.size,
        }
    }
    report.total = total;
    if !policy.dry_run {
        remove_orphan_locks(root);
    }
    Ok(report)
}

/// Removes the entry at `path` (of `kind`) unless a kiln uses or builds
/// it: for a kiln that has made the entry that supersedes it. Whether it
/// was removed.
pub fn remove_if_unused(kind: &'static str, path: &Path) -> Result<bool, GcError> {
    let Some(key) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(false);
    };
    let e = Entry {
        kind,
        key: key.to_string(),
        path: path.to_path_buf(),
        size: 0,
        last_used: unix_seconds(last_used(path)),
        in_use: false,
    };
    Ok(matches!(remove(&e, false)?, Removal::Removed))
}

/// What became of an entry gc chose.
enum Removal {
    /// Removed (with `dry_run`: could be).
    Removed,
    /// A kiln uses or builds it, or used it since gc listed it.
    InUse,
    /// It was gone by the time gc held its locks.
    Gone,
}

/// Removes `e` unless a kiln uses or builds it.
fn remove(e: &Entry, dry_run: bool) -> Result<Removal, GcError> {
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GcError::Remove { path, source }
    };
    let use_path = use_lock(&e.path);
    // An entry no kiln has recorded a use of yet gets its use lock from gc
    // below; that file's fresh mtime is not a use.
    let recorded = use_path.exists();
    // Without waiting: a kiln holding either lock may hold it for hours.
    let user = match lock_file(
        &use_path,
        FlockOperation::NonBlockingLockExclusive,
        !dry_run,
    ) {
        Ok(l) => l,
        Err(err) if err.kind() == ErrorKind::WouldBlock => return Ok(Removal::InUse),
        Err(err) => return Err(failed(&use_path)(err)),
    };
    let build_path = build_lock(&e.path);
    let keep = |user: Option<fs::File>| {
        if !recorded && user.is_some() {
            let _ = fs::remove_file(&use_path);
        }
        Ok(Removal::InUse)
    };
    let builder = match lock_file(&build_path, FlockOperation::NonBlockingLockExclusive, false) {
        Ok(l) => l,
        Err(err) if err.kind() == ErrorKind::WouldBlock => return keep(user),
        Err(err) => return Err(failed(&build_path)(err)),
    };
    // Decided on what `list` saw: a kiln may have used the entry (and let
    // go) since, or rebuilt it.
    let used = if recorded {
        last_used(&e.path)
    } else {
        fs::symlink_metadata(&e.path)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    if unix_seconds(used) > e.last_used {
        return keep(user);
    }
    if dry_run {
        return Ok(Removal::Removed);
    }
    let parent = e.path.parent().unwrap_or(Path::new("/"));
    let grave = OwnedDir::new_in(parent, &staging_prefix(&e.key)).map_err(failed(parent))?;
    match fs::rename(&e.path, grave.path().join(&e.key)) {
        Ok(()) => {}
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(Removal::Gone),
        Err(err) => return Err(failed(&e.path)(err)),
    }
    // Removed while held: a kiln that opened them meanwhile locks new ones
    // (see `lock_file`), and finds the entry gone.
    if user.is_some() {
        let _ = fs::remove_file(&use_path);
    }
    if builder.is_some() {
        let _ = fs::remove_file(&build_path);
    }
    drop((user, builder));
    // Removes the entry; if that fails, the next sweep does.
    drop(grave);
    Ok(Removal::Removed)
}

/// Removes the lock files of entries that do not exist (a build that
/// failed, or an entry removed by hand), unless a kiln holds them.
fn remove_orphan_locks(root: &Path) {
    for kind in KINDS {
        let dir = root.join(kind);
        let Ok(read) = fs::read_dir(&dir) else {
            continue;
        };
        for e in read.flatten() {
            let name = e.file_name();
            let Some(entry) = name
                .to_str()
                .and_then(|n| n.strip_prefix('.'))
                .and_then(|n| n.strip_suffix(".use").or_else(|| n.strip_suffix(".lock")))
            else {
                continue;
            };
            if is_staging(&name.to_string_lossy()) || dir.join(entry).exists() {
                continue;
            }
            let path = e.path();
            if let Ok(Some(_held)) =
                lock_file(&path, FlockOperation::NonBlockingLockExclusive, false)
            {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

/// Whether a running kiln holds `entry`'s use lock. gc's test, briefly
/// taking the lock exclusively: a kiln starting to use the entry that
/// instant waits for it.
fn in_use(entry: &Path) -> bool {
    matches!(
        lock_file(&use_lock(entry), FlockOperation::NonBlockingLockExclusive, false),
        Err(e) if e.kind() == ErrorKind::WouldBlock
    )
}

/// Bytes allocated to `path` and everything under it, each inode once,
/// symbolic links not followed; what cannot be read counts nothing.
fn disk_usage(path: &Path) -> u64 {
    fn walk(path: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
        let Ok(meta) = fs::symlink_metadata(path) else {
            return 0;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            return 0;
        }
        let mut bytes = meta.blocks() * 512;
        if meta.is_dir() {
            for e in fs::read_dir(path).into_iter().flatten().flatten() {
                bytes += walk(&e.path(), seen);
            }
        }
        bytes
    }
    walk(path, &mut HashSet::new())
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::cache::{Begin, CacheUse, Staging};

    const DAY: u64 = 86400;

    /// A published entry of `kind` holding `bytes` of data, last used
    /// `days_ago`.
    fn entry(root: &Path, kind: &str, key: &str, bytes: usize, days_ago: u64) -> PathBuf {
        let path = root.join(kind).join(key);
        fs::create_dir_all(root.join(kind)).expect("mkdir");
        if kind == "initramfs" {
            fs::write(&path, vec![1u8; bytes]).expect("write");
        } else {
            fs::create_dir(&path).expect("mkdir");
            fs::write(path.join("data"), vec![1u8; bytes]).expect("write");
        }
        let when = SystemTime::now() - Duration::from_secs(days_ago * DAY);
        fs::File::open(&path)
            .and_then(|f| f.set_modified(when))
            .expect("age");
        path
    }

    fn keys(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.key.as_str()).collect()
    }

    #[test]
    fn list_finds_each_kind_and_nothing_else() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        entry(r, "kernel", "k1", 10_000, 3);
        entry(r, "kernel", "k2", 10_000, 1);
        entry(r, "tools", "bookworm-t", 20_000, 2);
        entry(r, "initramfs", "i.cpio", 30_000, 0);
        entry(r, "rootfs", "r", 40_000, 5);
        fs::write(r.join("kernel").join("last-build.log"), "log").expect("log");
        fs::write(r.join("kernel").join(".k1.lock"), "").expect("lock");
        fs::write(r.join("initramfs").join(".initramfs-x"), "").expect("tmp");
        fs::create_dir(r.join("tools").join(".t.partial-x")).expect("staging");
        let found = list(r).expect("list");
        assert_eq!(keys(&found), ["i.cpio", "k2", "k1", "r", "bookworm-t"]);
        let tools = &found[4];
        assert_eq!(tools.kind, "tools");
        assert!(tools.size >= 20_000, "{}", tools.size);
        let expected = unix_seconds(SystemTime::now()) - 2 * DAY;
        assert!(tools.last_used.abs_diff(expected) < 60);
        assert!(!tools.in_use);
    }

    #[test]
    fn keep_removes_least_recently_used_first_and_skips_what_is_in_use() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        let oldest = entry(r, "kernel", "oldest", 100_000, 9);
        entry(r, "tools", "older", 100_000, 8);
        entry(r, "rootfs", "old", 100_000, 7);
        entry(r, "initramfs", "new.cpio", 100_000, 1);
        let using = CacheUse::begin(&oldest);
        let sizes: u64 = list(r).expect("list").iter().map(|e| e.size).sum();
        let policy = Policy {
            keep: Some(sizes / 2),
            ..Policy::default()
        };

        let dry = gc(
            r,
            &Policy {
                dry_run: true,
                ..policy.clone()
            },
            SystemTime::now(),
        )
        .expect("dry run");
        assert_eq!(keys(&dry.removed), ["older", "old"]);
        assert_eq!(list(r).expect("list").len(), 4, "a dry run removed");

        let report = gc(r, &policy, SystemTime::now()).expect("gc");
        // "oldest" was just used, by this test: now the most recent.
        assert_eq!(keys(&report.removed), ["older", "old"]);
        assert!(report.in_use.is_empty());
        assert_eq!(report.freed, sizes - report.total);
        let left = list(r).expect("list");
        assert_eq!(keys(&left), ["new.cpio", "oldest"]);
        assert!(left[1].in_use);

        let all = gc(
            r,
            &Policy {
                keep: Some(0),
                ..Policy::default()
            },
            SystemTime::now(),
        )
        .expect("gc");
        assert_eq!(keys(&all.removed), ["new.cpio"]);
        assert_eq!(keys(&all.in_use), ["oldest"]);
        assert!(oldest.is_dir());
        drop(using);
        // Nothing left behind: no staging directory, no lock file but
        // the one of the entry that stays.
        let mut names: Vec<String> = KINDS
            .iter()
            .flat_map(|k| fs::read_dir(r.join(k)).into_iter().flatten().flatten())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".oldest.use", "oldest"]);
    }

    #[test]
    fn a_superseded_entry_goes_once_no_kiln_uses_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let old = entry(root.path(), "trees", "a-1", 1000, 0);
        let held = CacheUse::begin(&old);
        assert!(!remove_if_unused("trees", &old).expect("remove"));
        assert!(old.exists());
        drop(held);
        assert!(remove_if_unused("trees", &old).expect("remove"));
        assert!(!old.exists());
    }

    #[test]
    fn older_than_removes_what_was_not_used_since() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        entry(r, "kernel", "a", 1000, 40);
        entry(r, "kernel", "b", 1000, 20);
        let c = entry(r, "kernel", "c", 1000, 40);
        drop(CacheUse::begin(&c));
        let policy = Policy {
            older_than: Some(Duration::from_secs(30 * DAY)),
            ..Policy::default()
        };
        let report = gc(r, &policy, SystemTime::now()).expect("gc");
        assert_eq!(keys(&report.removed), ["a"]);
        assert_eq!(keys(&list(r).expect("list")), ["c", "b"]);
    }

    #[test]
    fn an_entry_being_built_is_kept_and_dead_builds_are_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        let dest = entry(r, "tools", "t", 1000, 40);
        // A --force rebuild, under way.
        let Begin::Build(live) = Staging::begin(&dest, true, |_| true).expect("begin") else {
            panic!("force builds");
        };
        fs::write(live.path().join("data"), vec![2u8; 50_000]).expect("write");
        // A build killed outright.
        fs::create_dir(r.join("kernel")).expect("mkdir");
        let dead = OwnedDir::new_in(&r.join("kernel"), &staging_prefix("k"))
            .expect("staging")
            .abandon();
        fs::write(dead.join("data"), vec![2u8; 50_000]).expect("write");

        let policy = Policy {
            keep: Some(0),
            ..Policy::default()
        };
        let report = gc(r, &policy, SystemTime::now()).expect("gc");
        assert_eq!(keys(&report.in_use), ["t"], "{report:?}");
        assert_eq!(report.leftovers.len(), 1, "{report:?}");
        assert_eq!(report.leftovers[0].path, dead);
        assert!(report.leftovers[0].size >= 50_000);
        assert!(!dead.exists());
        assert!(live.path().is_dir(), "a live build's staging was removed");
        live.commit().expect("commit");
        assert!(dest.join("data").is_file());
    }
}
