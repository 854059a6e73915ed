//! kiln's cache: `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else
//! `~/.cache/kiln`. Every entry lives under a name derived from a content
//! hash and is published by an atomic rename, so a reader never sees a
//! half-written entry. A build's staging directory is an [`OwnedDir`]:
//! removed when the build ends, and by [`sweep`] in a later kiln if the
//! build was killed outright.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::owned_dir::{self, OwnedDir};

pub fn root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KILN_CACHE_DIR").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir).join("kiln"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("cannot locate the cache: set HOME, XDG_CACHE_HOME or KILN_CACHE_DIR")?;
    Ok(PathBuf::from(home).join(".cache").join("kiln"))
}

/// Hex SHA-256 over the parts, each length-prefixed so that boundaries count.
pub fn hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

/// A directory being filled before it is published under its final name.
/// Builds of the same entry are serialized by a lock file beside it; each
/// build stages in a directory of its own, removed if the build fails.
pub struct Staging {
    tmp: OwnedDir,
    dest: PathBuf,
    _lock: fs::File,
}

/// What [`Staging::begin`] found once it held the entry's lock.
pub enum Begin {
    /// Another build published the entry while we waited.
    Done(PathBuf),
    Build(Staging),
}

impl Staging {
    /// Starts staging `dest` (e.g. `<cache>/kernel/<key>`). Waits for any
    /// other build of the same entry; `complete` says whether an existing
    /// entry is usable (then nothing is rebuilt unless `force`).
    pub fn begin(dest: &Path, force: bool, complete: impl Fn(&Path) -> bool) -> Result<Begin> {
        let parent = dest.parent().context("cache entry has no parent")?;
        fs::create_dir_all(parent)
            .with_context(|| format!("creating cache directory {}", parent.display()))?;
        let name = dest
            .file_name()
            .context("cache entry has no name")?
            .to_string_lossy()
            .into_owned();
        let lock_path = parent.join(format!(".{name}.lock"));
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        // SAFETY: flock on a descriptor we own; blocks until the other
        // build of this entry ends.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", lock_path.display()));
        }
        if !force && complete(dest) {
            return Ok(Begin::Done(dest.to_path_buf()));
        }
        let tmp = OwnedDir::new_in(parent, &staging_prefix(&name))
            .with_context(|| format!("creating a staging directory in {}", parent.display()))?;
        Ok(Begin::Build(Staging {
            tmp,
            dest: dest.to_path_buf(),
            _lock: lock,
        }))
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Publishes the entry atomically.
    pub fn commit(self) -> Result<PathBuf> {
        if self.dest.exists() {
            fs::remove_dir_all(&self.dest)
                .with_context(|| format!("replacing {}", self.dest.display()))?;
        }
        self.tmp
            .publish(&self.dest)
            .with_context(|| format!("publishing {}", self.dest.display()))?;
        Ok(self.dest)
    }
}

/// Staging directories are `.<entry>.partial-<random>`, beside the entry.
fn staging_prefix(entry: &str) -> String {
    format!(".{entry}.partial-")
}

fn is_staging(name: &str) -> bool {
    name.starts_with('.') && name.contains(".partial-")
}

/// Removes the staging directories of builds that were killed outright:
/// one readdir of the cache and of each directory in it (a handful).
pub fn sweep() {
    if let Ok(root) = root() {
        sweep_in(&root);
    }
}

fn sweep_in(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            owned_dir::sweep(&e.path(), is_staging);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_boundaries() {
        assert_ne!(hash(&[b"ab", b"c"]), hash(&[b"a", b"bc"]));
        assert_eq!(hash(&[b"x"]), hash(&[b"x"]));
    }

    fn stage(dest: &Path, force: bool) -> Begin {
        Staging::begin(dest, force, |d| d.join("f").exists()).expect("begin")
    }

    #[test]
    fn staging_publishes_atomically_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("entry");
        let Begin::Build(s) = stage(&dest, false) else {
            panic!("nothing built yet");
        };
        fs::write(s.path().join("f"), b"1").expect("write");
        assert!(!dest.exists());
        s.commit().expect("commit");
        assert_eq!(fs::read(dest.join("f")).expect("read"), b"1");
        assert!(matches!(stage(&dest, false), Begin::Done(_)));
        assert!(matches!(stage(&dest, true), Begin::Build(_)));

        let other = dir.path().join("other");
        let Begin::Build(s) = stage(&other, false) else {
            panic!("nothing built yet");
        };
        let tmp = s.path().to_path_buf();
        drop(s);
        assert!(!tmp.exists());
        assert!(!other.exists());
    }

    #[test]
    fn sweep_removes_the_staging_of_a_dead_build_only() {
        let cache = tempfile::tempdir().expect("tempdir");
        let dest = cache.path().join("kernel").join("entry");
        let Begin::Build(live) = stage(&dest, false) else {
            panic!("nothing built yet");
        };
        let other = cache.path().join("tools").join("entry");
        let Begin::Build(dead) = stage(&other, false) else {
            panic!("nothing built yet");
        };
        // The sweep opens the lock file anew: another open file description,
        // which cannot take the lock the live build's holds, as another
        // process could not.
        sweep_in(cache.path());
        assert!(live.path().is_dir(), "a live build's staging was swept");
        assert!(dead.path().is_dir(), "a live build's staging was swept");

        // The second build dies without cleaning up: its lock is released
        // and its directory stays, as after a SIGKILL.
        let Staging { tmp, _lock, .. } = dead;
        drop(_lock);
        let dead = tmp.abandon();
        assert!(dead.is_dir());
        sweep_in(cache.path());
        assert!(!dead.exists(), "a dead build's staging was kept");
        assert!(live.path().is_dir(), "a live build's staging was swept");
        assert!(
            cache.path().join("tools").join(".entry.lock").is_file(),
            "the entry's lock file is not a staging directory"
        );
        live.commit().expect("commit");
        assert!(dest.is_dir());
    }
}
