//! kiln's cache: `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else
//! `~/.cache/kiln`. Every entry lives under a name derived from a content
//! hash and is published by an atomic rename, so a reader never sees a
//! half-written entry and an interrupted build leaves only a temp dir that
//! the next build of the same entry removes.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

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
pub struct Staging {
    tmp: PathBuf,
    dest: PathBuf,
}

impl Staging {
    /// Starts staging `dest` (e.g. `<cache>/kernel/<key>`), replacing any
    /// leftover of an earlier interrupted attempt.
    pub fn new(dest: &Path) -> Result<Staging> {
        let parent = dest.parent().context("cache entry has no parent")?;
        fs::create_dir_all(parent)
            .with_context(|| format!("creating cache directory {}", parent.display()))?;
        let name = dest
            .file_name()
            .context("cache entry has no name")?
            .to_string_lossy();
        let tmp = parent.join(format!(".{name}.partial"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)
                .with_context(|| format!("removing stale {}", tmp.display()))?;
        }
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Staging {
            tmp,
            dest: dest.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Publishes the entry atomically.
    pub fn commit(self) -> Result<PathBuf> {
        if self.dest.exists() {
            fs::remove_dir_all(&self.dest)
                .with_context(|| format!("replacing {}", self.dest.display()))?;
        }
        fs::rename(&self.tmp, &self.dest)
            .with_context(|| format!("publishing {}", self.dest.display()))?;
        let dest = self.dest.clone();
        std::mem::forget(self);
        Ok(dest)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.tmp);
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

    #[test]
    fn staging_publishes_atomically_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("entry");
        let s = Staging::new(&dest).expect("stage");
        fs::write(s.path().join("f"), b"1").expect("write");
        assert!(!dest.exists());
        s.commit().expect("commit");
        assert_eq!(fs::read(dest.join("f")).expect("read"), b"1");

        let s = Staging::new(&dir.path().join("other")).expect("stage");
        let tmp = s.path().to_path_buf();
        drop(s);
        assert!(!tmp.exists());
        assert!(!dir.path().join("other").exists());
    }
}
