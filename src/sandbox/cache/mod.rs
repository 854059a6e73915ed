//! kiln's cache: `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else
//! `~/.cache/kiln`. Every entry lives under a name derived from a content
//! hash and is published by an atomic rename, so a reader never sees a
//! half-written entry. A build's staging directory is an [`OwnedDir`]:
//! removed when the build ends, and by [`sweep`] in a later kiln if the
//! build was killed outright.
//!
//! The kernel and tools entries also carry a [`MANIFEST`]: the size and
//! SHA-256 of their files, written at build time, checked by [`verify`]
//! when they are used, so a truncated or corrupted file is named as such
//! (with the command that rebuilds it) instead of making the guest fail
//! in some puzzling way.
//!
//! Every kiln holds the entries it uses ([`CacheUse`], in `usage.rs`,
//! which also records their last use), and `kiln cache ls|gc` lists and
//! prunes them by that (`gc.rs`).

use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::{flock, FlockOperation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::util::owned_dir::{self, OwnedDir};

pub mod debs;
mod gc;
mod usage;

pub use gc::{gc, list, remove_if_unused, Entry, Policy, Report};
pub use usage::CacheUse;

/// The kind of entry the tools image's programs are unpacked into, for the
/// host to run (sandbox/host_tools.rs).
pub const HOST_TOOLS_KIND: &str = "host-tools";
/// The kind of entry a build's tree layers are (image/layers/store.rs).
pub const LAYERS_KIND: &str = "layers";
/// The kind of entry a build's base tree is (image/layers/base.rs).
pub const TREES_KIND: &str = "trees";

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
        let lock_path = build_lock(dest);
        // Blocks until the other build of this entry ends.
        let lock = lock_file(&lock_path, FlockOperation::LockExclusive, true)
            .with_context(|| format!("locking {}", lock_path.display()))?
            .with_context(|| format!("cannot create {}", lock_path.display()))?;
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

    /// Publishes the entry atomically, with a [`MANIFEST`] of `files`
    /// (names in the staging directory) for [`verify`]. The files are
    /// synced first, so a crash cannot publish an entry whose data never
    /// reached the disk.
    pub fn commit_with_manifest(self, files: &[&str]) -> Result<PathBuf> {
        let mut manifest = Manifest::default();
        for name in files {
            let path = self.path().join(name);
            let file =
                fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            file.sync_all()
                .with_context(|| format!("syncing {}", path.display()))?;
            let meta = file.metadata()?;
            let sha256 = sha256_of(&file).with_context(|| format!("reading {}", path.display()))?;
            manifest.files.insert(
                name.to_string(),
                Recorded {
                    size: meta.len(),
                    sha256,
                    seen: Stamp::of(&meta),
                },
            );
        }
        write_manifest(self.path(), &manifest)
            .with_context(|| format!("writing {}", self.path().join(MANIFEST).display()))?;
        self.commit()
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

/// The file in a kernel or tools entry that records its files.
pub const MANIFEST: &str = "manifest.json";

/// What [`MANIFEST`] holds, per file name.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    files: BTreeMap<String, Recorded>,
}

/// A file as it was built, and its times when its hash last matched.
#[derive(Debug, Serialize, Deserialize)]
struct Recorded {
    size: u64,
    sha256: String,
    seen: Stamp,
}

/// A file's mtime and ctime, each (seconds, nanoseconds). Any write to the
/// file changes both; ctime cannot be set back by `touch`, and changes too
/// when the file is replaced by a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A cache entry's file that is not the one that was built.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    #[error("{} is damaged: {problem}; rebuild it with '{fix}'", file.display())]
    Damaged {
        file: PathBuf,
        problem: Problem,
        /// The command that rebuilds the entry.
        fix: String,
    },
    #[error("checking {}", file.display())]
    Unreadable {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl IntegrityError {
    /// What is wrong, without the advice (for when kiln rebuilds itself).
    pub fn what(&self) -> String {
        match self {
            IntegrityError::Damaged { file, problem, .. } => {
                format!("{} is damaged: {problem}", file.display())
            }
            IntegrityError::Unreadable { file, source } => {
                format!("cannot check {}: {source}", file.display())
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("it is missing")]
    Missing,
    #[error(
        "it is {found} bytes long but was {expected} bytes when built (truncated, or written over)"
    )]
    Size { expected: u64, found: u64 },
    #[error("its contents changed since it was built (SHA-256 {found}, built as {expected})")]
    Hash { expected: String, found: String },
    #[error("its entry's {MANIFEST} cannot be parsed ({0})")]
    Manifest(String),
}

/// Checks the files `names` of the cache entry `dir` against its
/// [`MANIFEST`]; `fix` is the command that rebuilds the entry.
///
/// The size is compared on every call. The SHA-256 is computed again only
/// when the file's mtime or ctime differ from those recorded when it last
/// matched: hashing the kernel and the tools image (24 + 80 MB) costs
/// about 0.1 s with SHA-NI and several seconds where kiln itself runs
/// under TCG (the nested tests), on a `kiln run -- true` of 1-1.5 s, while
/// truncation changes the size and any write changes both times. What is
/// left undetected is a change that keeps size and both times (the disk
/// itself flipping bits), which a hash on every use would catch at that
/// price. After a match with new times (a copied cache) the new times are
/// recorded, when the cache is writable.
///
/// An entry without a manifest was built before kiln kept them: it is
/// taken as it is, and its manifest written now, so later damage shows.
pub fn verify(dir: &Path, names: &[&str], fix: &str) -> Result<(), IntegrityError> {
    let damaged = |file: PathBuf, problem: Problem| IntegrityError::Damaged {
        file,
        problem,
        fix: fix.to_string(),
    };
    let unreadable = |file: &Path, source: std::io::Error| IntegrityError::Unreadable {
        file: file.to_path_buf(),
        source,
    };
    let manifest_path = dir.join(MANIFEST);
    let mut manifest = match fs::read(&manifest_path) {
        Ok(data) => serde_json::from_slice::<Manifest>(&data)
            .map_err(|e| damaged(manifest_path.clone(), Problem::Manifest(e.to_string())))?,
        Err(e) if e.kind() == ErrorKind::NotFound => Manifest::default(),
        Err(e) => return Err(unreadable(&manifest_path, e)),
    };
    let mut changed = false;
    for name in names {
        let path = dir.join(name);
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(damaged(path, Problem::Missing))
            }
            Err(e) => return Err(unreadable(&path, e)),
        };
        let stamp = Stamp::of(&meta);
        match manifest.files.get_mut(*name) {
            Some(r) => {
                if meta.len() != r.size {
                    return Err(damaged(
                        path,
                        Problem::Size {
                            expected: r.size,
                            found: meta.len(),
                        },
                    ));
                }
                if r.seen == stamp {
                    continue;
                }
                let found = fs::File::open(&path)
                    .and_then(|f| sha256_of(&f))
                    .map_err(|e| unreadable(&path, e))?;
                if found != r.sha256 {
                    return Err(damaged(
                        path,
                        Problem::Hash {
                            expected: r.sha256.clone(),
                            found,
                        },
                    ));
                }
                r.seen = stamp;
            }
            None => {
                let sha256 = fs::File::open(&path)
                    .and_then(|f| sha256_of(&f))
                    .map_err(|e| unreadable(&path, e))?;
                manifest.files.insert(
                    name.to_string(),
                    Recorded {
                        size: meta.len(),
                        sha256,
                        seen: stamp,
                    },
                );
            }
        }
        changed = true;
    }
    if changed {
        record(dir, &manifest);
    }
    Ok(())
}

/// The SHA-256 of the entry `dir`'s file `name`: as its [`MANIFEST`]
/// records it (call [`verify`] first), else computed now.
pub fn sha256_of_entry_file(dir: &Path, name: &str) -> std::io::Result<String> {
    let recorded = fs::read(dir.join(MANIFEST))
        .ok()
        .and_then(|data| serde_json::from_slice::<Manifest>(&data).ok())
        .and_then(|mut m| m.files.remove(name))
        .map(|r| r.sha256);
    match recorded {
        Some(sha256) => Ok(sha256),
        None => sha256_of(&fs::File::open(dir.join(name))?),
    }
}

/// Whether the entry `dir` has every one of `names` (its files kiln uses).
pub fn complete(dir: &Path, names: &[&str]) -> bool {
    names.iter().all(|n| dir.join(n).is_file())
}

/// Whether the entry `dir` can be used as it is: [`complete`] and passing
/// [`verify`]. For a build deciding whether to build: damage is said, as
/// the build that follows replaces the entry (`fix` is not, being what is
/// about to happen).
pub fn usable(dir: &Path, names: &[&str], fix: &str) -> bool {
    if !complete(dir, names) {
        return false;
    }
    match verify(dir, names, fix) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("kiln: {}; building it again", e.what());
            false
        }
    }
}

/// Writes `manifest` into the published entry `dir`, under the entry's
/// build lock, so that a rebuild (`--force`) publishing a new entry under
/// the same name meanwhile cannot get this one's manifest. Best effort: a
/// read-only cache, or a build holding the lock, keeps the old manifest,
/// which costs only a hash next time.
fn record(dir: &Path, manifest: &Manifest) {
    let lock = lock_file(
        &build_lock(dir),
        FlockOperation::NonBlockingLockExclusive,
        true,
    );
    if let Ok(Some(_lock)) = lock {
        let _ = write_manifest(dir, manifest);
    }
}

/// `<parent>/.<entry>.<suffix>`: the files kept beside an entry.
fn beside(entry: &Path, suffix: &str) -> PathBuf {
    let name = entry.file_name().unwrap_or_default().to_string_lossy();
    entry.with_file_name(format!(".{name}.{suffix}"))
}

/// The lock a build of `entry` holds exclusively (see [`Staging`]).
fn build_lock(entry: &Path) -> PathBuf {
    beside(entry, "lock")
}

/// Opens the lock file `path`, creating it if `create` (when the cache is
/// read-only, an existing one is opened for reading, which flock takes as
/// well), and locks it with `op`; `Ok(None)` if there is no such file to
/// open. `kiln cache gc` removes an entry's lock files while it holds them:
/// whoever locked a file that was removed meanwhile locks the path's new
/// file instead, so that every kiln locks the same one.
fn lock_file(path: &Path, op: FlockOperation, create: bool) -> std::io::Result<Option<fs::File>> {
    loop {
        let opened = if create {
            fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .or_else(|e| {
                    if e.raw_os_error() == Some(libc::EROFS)
                        || e.kind() == ErrorKind::PermissionDenied
                    {
                        fs::File::open(path)
                    } else {
                        Err(e)
                    }
                })
        } else {
            fs::File::open(path)
        };
        let file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        flock(&file, op)?;
        let held = file.metadata()?;
        match fs::symlink_metadata(path) {
            Ok(m) if m.dev() == held.dev() && m.ino() == held.ino() => return Ok(Some(file)),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
}

/// Replaces `dir`'s manifest atomically (a temp file renamed over it).
fn write_manifest(dir: &Path, manifest: &Manifest) -> std::io::Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".manifest-")
        .tempfile_in(dir)?;
    let data = serde_json::to_vec_pretty(manifest).map_err(std::io::Error::other)?;
    // Readable like the entry's other files (a temp file starts 0600).
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    tmp.write_all(&data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dir.join(MANIFEST))?;
    Ok(())
}

/// Hex SHA-256 of everything `file` holds from where it is.
fn sha256_of(mut file: &fs::File) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex::encode(h.finalize()))
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

    const FIX: &str = "kiln frob build --force";

    /// A published entry with `f` holding `data`, and its manifest.
    fn entry_with(dest: &Path, data: &[u8]) {
        let Begin::Build(s) = stage(dest, true) else {
            panic!("force builds");
        };
        fs::write(s.path().join("f"), data).expect("write");
        s.commit_with_manifest(&["f"]).expect("commit");
    }

    /// File times have the kernel's clock tick for resolution: after this
    /// a change gives the file times other than those recorded.
    fn tick() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    fn damage(dest: &Path) -> String {
        let e = verify(dest, &["f"], FIX).expect_err("damage goes unnoticed");
        let msg = e.to_string();
        assert!(msg.contains(&dest.join("f").display().to_string()), "{msg}");
        assert!(msg.contains(&format!("rebuild it with '{FIX}'")), "{msg}");
        msg
    }

    #[test]
    fn a_truncated_or_changed_file_is_named_with_its_rebuild_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("entry");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        entry_with(&dest, &data);
        verify(&dest, &["f"], FIX).expect("as built");
        let f = dest.join("f");

        // Truncated: the size says so, without reading the file.
        fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .and_then(|h| h.set_len(4096))
            .expect("truncate");
        let msg = damage(&dest);
        assert!(msg.contains("4096 bytes long but was 100000"), "{msg}");

        // One byte changed in place, size kept, even with the mtime set
        // back: the ctime moved, so the hash is checked, and differs.
        fs::write(&f, &data).expect("restore");
        verify(&dest, &["f"], FIX).expect("restored");
        tick();
        let mtime = fs::metadata(&f).and_then(|m| m.modified()).expect("mtime");
        let mut bad = data.clone();
        bad[50_000] ^= 1;
        fs::write(&f, &bad).expect("corrupt");
        fs::File::options()
            .write(true)
            .open(&f)
            .and_then(|h| h.set_modified(mtime))
            .expect("set mtime back");
        let msg = damage(&dest);
        assert!(msg.contains("contents changed since it was built"), "{msg}");

        // Missing.
        fs::remove_file(&f).expect("rm");
        assert!(damage(&dest).contains("it is missing"));

        // A manifest that is not one.
        fs::write(&f, &data).expect("restore");
        fs::write(dest.join(MANIFEST), b"{").expect("garble");
        let e = verify(&dest, &["f"], FIX).expect_err("garbled manifest");
        assert!(e.to_string().contains(MANIFEST), "{e}");
        assert!(e.to_string().contains(FIX), "{e}");
    }

    #[test]
    fn only_a_complete_undamaged_entry_is_usable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("entry");
        assert!(!usable(&dest, &["f"], FIX), "no entry yet");
        entry_with(&dest, b"contents");
        assert!(complete(&dest, &["f"]));
        assert!(usable(&dest, &["f"], FIX));
        assert!(!complete(&dest, &["f", "g"]));
        assert!(!usable(&dest, &["f", "g"], FIX), "a file missing");
        tick();
        fs::write(dest.join("f"), b"CONTENTS").expect("corrupt");
        assert!(complete(&dest, &["f"]));
        assert!(!usable(&dest, &["f"], FIX), "damaged");
    }

    #[test]
    fn a_copied_entry_is_hashed_once_and_a_legacy_one_adopted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("entry");
        entry_with(&dest, b"contents");
        let before = fs::read(dest.join(MANIFEST)).expect("manifest");
        tick();

        // The same bytes in a new file (a copied cache): accepted after
        // a hash, and its times recorded for next time.
        fs::remove_file(dest.join("f")).expect("rm");
        fs::write(dest.join("f"), b"contents").expect("copy");
        verify(&dest, &["f"], FIX).expect("same bytes");
        let after = fs::read(dest.join(MANIFEST)).expect("manifest");
        assert_ne!(before, after, "the new times were not recorded");
        assert!(
            fs::read_dir(&dest)
                .expect("readdir")
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with(".manifest-")),
            "a temp manifest was left"
        );

        // Built before manifests: taken as it is, then watched.
        let legacy = dir.path().join("legacy");
        fs::create_dir(&legacy).expect("mkdir");
        fs::write(legacy.join("f"), b"old build").expect("write");
        verify(&legacy, &["f"], FIX).expect("a legacy entry is accepted");
        assert!(legacy.join(MANIFEST).is_file(), "no manifest recorded");
        fs::write(legacy.join("f"), b"old").expect("truncate");
        assert!(damage(&legacy).contains("3 bytes long but was 9"));
    }

    #[test]
    fn racing_builds_of_one_entry_build_it_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Barrier};
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("entry");
        let builds = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(Barrier::new(4));
        let racers: Vec<_> = (0..4)
            .map(|i| {
                let (dest, builds, start) = (dest.clone(), builds.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    // Each thread opens the lock file itself: another open
                    // file description, as another process would have.
                    match Staging::begin(&dest, false, |d| verify(d, &["f"], FIX).is_ok())
                        .expect("begin")
                    {
                        Begin::Done(d) => d,
                        Begin::Build(s) => {
                            builds.fetch_add(1, Ordering::SeqCst);
                            // A slow build: the others wait on the lock.
                            std::thread::sleep(std::time::Duration::from_millis(300));
                            fs::write(s.path().join("f"), format!("built by {i}")).expect("write");
                            s.commit_with_manifest(&["f"]).expect("commit")
                        }
                    }
                })
            })
            .collect();
        for r in racers {
            assert_eq!(r.join().expect("racer"), dest);
        }
        assert_eq!(builds.load(Ordering::SeqCst), 1, "built more than once");
        verify(&dest, &["f"], FIX).expect("the entry is whole");
        // The entry, its lock file, nothing staged left over.
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .expect("readdir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".entry.lock", "entry"]);
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
