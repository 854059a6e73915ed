//! The shared package cache: every .deb a bootstrap downloaded, kept by
//! its SHA-256 and offered to the next bootstrap from the same mirror, so
//! that adding a package to a recipe downloads only that package and what
//! it newly pulls in.
//!
//! One cache entry per mirror, `debs/<key>/`: the files `<sha256>.deb`, and
//! `index`, which maps apt's file name for a package
//! (`name_version_arch.deb`) to one of them. apt takes a file it finds in
//! `/var/cache/apt/archives` under the right name and size without hashing
//! it, so only files checked against that mirror's (signed) `Packages` are
//! ever indexed, and each is hashed again before it is offered. Debian
//! never reuses a version's file name in an archive, which is what makes
//! the name a sound key within one mirror.
//!
//! A bootstrap gets an [`Offer`]: a directory in the cache with the
//! mirror's packages under apt's names (hard links), which mmdebstrap's
//! hooks copy into the chroot before apt runs, and the chroot's packages
//! and package lists, which they copy back out before mmdebstrap's cleanup
//! empties them (so the root archive is the same whether the cache was
//! warm or cold). [`Offer::ingest`] stores the new ones.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use serde::Serialize;

use super::{lock_file, staging_prefix, CacheUse};
use crate::util::owned_dir::OwnedDir;
use crate::util::packages::Packages;

/// The cache's folder for packages (a kind `kiln cache` lists).
pub const KIND: &str = "debs";

/// mmdebstrap options that fill `/var/cache/apt/archives` from an offer
/// and copy it and the package lists back out; run with the offer as the
/// working directory. They change no byte of the result (apt's cache is
/// emptied before the archive is made, and its folder is left as
/// mmdebstrap makes it), so they are not part of a bootstrap's cache key.
///
/// The copies are mmdebstrap's special hooks, which its own process does
/// as the user who ran kiln: in unshare mode the hooks' shell is root of a
/// namespace that cannot read the user's files.
pub const MMDEBSTRAP_HOOKS: &[&str] = &[
    // Keeps the essential packages in the cache until the hooks below copy
    // it out; the cleanup step removes them from the tree afterwards.
    "--skip=essential/unlink",
    "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
    "--setup-hook=sync-in in /var/cache/apt/archives/",
    // sync-in gives the folder the owner and mode of `in`: the user who
    // ran kiln would own the image's apt cache. Back to what mkdir made
    // (mmdebstrap runs with umask 022).
    "--setup-hook=chown 0:0 \"$1\"/var/cache/apt/archives && \
     chmod 0755 \"$1\"/var/cache/apt/archives",
    "--customize-hook=sync-out /var/cache/apt/archives out",
    "--customize-hook=sync-out /var/lib/apt/lists lists",
];

/// What a bootstrap took from the cache and what it downloaded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DebReport {
    /// Installed packages that came from the cache.
    pub reused: usize,
    /// apt's file names of the packages downloaded, sorted.
    pub downloaded: Vec<String>,
    /// Their size in bytes.
    pub downloaded_bytes: u64,
    /// Downloaded packages not kept, because the mirror's package lists
    /// give another SHA-256 for them, or none.
    pub not_kept: Vec<String>,
}

impl DebReport {
    /// "97 packages from the package cache, 1 downloaded (150 KiB)".
    pub fn summary(&self) -> String {
        format!(
            "{} packages from the package cache, {} downloaded ({} KiB)",
            self.reused,
            self.downloaded.len(),
            self.downloaded_bytes.div_ceil(1024)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DebsError {
    #[error("package cache {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> DebsError + '_ {
    move |source| DebsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One mirror's packages, in use while this value lives.
pub struct Store {
    dir: PathBuf,
    _use: CacheUse,
}

impl Store {
    /// The store of `mirror` in the cache at `root`, made if missing.
    pub fn open(root: &Path, mirror: &str) -> Result<Store, DebsError> {
        let key = super::hash(&[b"kiln-debs-v1", mirror.trim_end_matches('/').as_bytes()]);
        let dir = root.join(KIND).join(&key[..16]);
        // Marked in use before it is made or read: no gc removes it under us.
        let held = CacheUse::begin(&dir);
        fs::create_dir_all(&dir).map_err(at(&dir))?;
        let about = dir.join("mirror");
        if !about.exists() {
            fs::write(&about, format!("{mirror}\n")).map_err(at(&about))?;
        }
        Ok(Store { dir, _use: held })
    }

    #[cfg(test)]
    fn path(&self) -> &Path {
        &self.dir
    }

    /// A directory with every package of this store whose content still
    /// has its hash, under apt's names, in `in/`; a file that does not is
    /// removed from the store.
    pub fn offer(&self) -> Result<Offer, DebsError> {
        let parent = self.dir.parent().unwrap_or(Path::new("/"));
        let name = self.dir.file_name().unwrap_or_default().to_string_lossy();
        let dir = OwnedDir::new_in(parent, &staging_prefix(&name)).map_err(at(parent))?;
        let input = dir.path().join("in");
        fs::create_dir(&input).map_err(at(&input))?;
        let mut offered = BTreeSet::new();
        for (apt_name, sha) in self.read_index()? {
            let blob = self.blob(&sha);
            match sha256_file(&blob) {
                Ok(actual) if actual == sha => {}
                Ok(_) => {
                    eprintln!(
                        "warning: removing {} from the package cache: its content changed",
                        blob.display()
                    );
                    let _ = fs::remove_file(&blob);
                    continue;
                }
                // Removed by hand, or by an earlier check: not offered.
                Err(_) => continue,
            }
            let link = input.join(&apt_name);
            if fs::hard_link(&blob, &link).is_err() {
                fs::copy(&blob, &link).map_err(at(&link))?;
            }
            offered.insert(apt_name);
        }
        Ok(Offer { dir, offered })
    }

    fn blob(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.deb"))
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index")
    }

    /// apt file name → SHA-256. Lines that are not "HEX NAME" (a file
    /// damaged by hand) are skipped.
    fn read_index(&self) -> Result<BTreeMap<String, String>, DebsError> {
        let path = self.index_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(at(&path)(e)),
        };
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(sha, name)| is_sha256(sha) && is_apt_name(name))
            .map(|(sha, name)| (name.to_string(), sha.to_string()))
            .collect())
    }

    /// Adds `new` to the index: under its lock, so that two bootstraps
    /// storing at once both keep theirs, and by a rename, so that a reader
    /// sees the old index or the new one.
    fn add_to_index(&self, new: &BTreeMap<String, String>) -> Result<(), DebsError> {
        if new.is_empty() {
            return Ok(());
        }
        let lock_path = self.dir.join("index.lock");
        let _lock =
            lock_file(&lock_path, FlockOperation::LockExclusive, true).map_err(at(&lock_path))?;
        let mut index = self.read_index()?;
        index.extend(new.iter().map(|(n, s)| (n.clone(), s.clone())));
        let mut text = String::new();
        for (name, sha) in &index {
            text.push_str(&format!("{sha} {name}\n"));
        }
        let path = self.index_path();
        let mut tmp = tempfile::Builder::new()
            .prefix(".index-")
            .tempfile_in(&self.dir)
            .map_err(at(&self.dir))?;
        tmp.write_all(text.as_bytes()).map_err(at(tmp.path()))?;
        // Readable by a group that shares the cache, and on disk before it
        // replaces the old index.
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(at(tmp.path()))?;
        tmp.persist(&path).map_err(|e| at(&path)(e.error))?;
        Ok(())
    }
}

/// Packages offered to one bootstrap, and what it copies back out.
/// Dropping it removes the directory.
pub struct Offer {
    dir: OwnedDir,
    offered: BTreeSet<String>,
}

impl Offer {
    /// mmdebstrap's working directory (see [`MMDEBSTRAP_HOOKS`]).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// How many packages are offered.
    #[cfg(test)]
    fn offered(&self) -> usize {
        self.offered.len()
    }

    /// After a bootstrap that succeeded, which installed `installed` (apt
    /// file names, see [`apt_names`]): stores every package it downloaded
    /// whose SHA-256 is the one the mirror's package lists give.
    pub fn ingest(
        self,
        store: &Store,
        installed: &BTreeSet<String>,
    ) -> Result<DebReport, DebsError> {
        let out = self.dir.path().join("out");
        let mut report = DebReport {
            // Everything offered is copied in and out again, used or not.
            reused: self.offered.intersection(installed).count(),
            ..DebReport::default()
        };
        let mut new = BTreeMap::new();
        let read = fs::read_dir(&out).map_err(at(&out))?;
        for e in read {
            let e = e.map_err(at(&out))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !is_apt_name(&name) || !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            if !self.offered.contains(&name) {
                new.insert(name, e.path());
            }
        }
        let wanted: BTreeSet<&str> = new.keys().map(String::as_str).collect();
        let expected = expected_hashes(&self.dir.path().join("lists"), &wanted)?;
        let mut added = BTreeMap::new();
        for (name, path) in new {
            let size = fs::metadata(&path).map_err(at(&path))?.len();
            report.downloaded_bytes += size;
            let sha = sha256_file(&path).map_err(at(&path))?;
            if !expected.get(&name).is_some_and(|s| s.contains(&sha)) {
                report.not_kept.push(name.clone());
            } else {
                let blob = store.blob(&sha);
                // Replaces a blob that is there but damaged, too; a rename,
                // so that no offer ever hashes half a file.
                if sha256_file(&blob).ok().as_ref() != Some(&sha) {
                    fs::rename(&path, &blob).map_err(at(&blob))?;
                }
                added.insert(name.clone(), sha);
            }
            report.downloaded.push(name);
        }
        store.add_to_index(&added)?;
        Ok(report)
    }
}

/// The SHA-256s the `*_Packages` lists in `lists` give for each of
/// `wanted` (apt file names).
fn expected_hashes(
    lists: &Path,
    wanted: &BTreeSet<&str>,
) -> Result<HashMap<String, BTreeSet<String>>, DebsError> {
    let mut found: HashMap<String, BTreeSet<String>> = HashMap::new();
    if wanted.is_empty() {
        return Ok(found);
    }
    let read = match fs::read_dir(lists) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(at(lists)(e)),
    };
    for e in read.flatten() {
        if !e.file_name().to_string_lossy().ends_with("_Packages") {
            continue;
        }
        let path = e.path();
        let file = fs::File::open(&path).map_err(at(&path))?;
        for (name, sha) in stanzas(BufReader::new(file)).map_err(at(&path))? {
            if wanted.contains(name.as_str()) {
                found.entry(name).or_default().insert(sha);
            }
        }
    }
    Ok(found)
}

/// (apt file name, SHA-256) of every complete stanza of a `Packages` file.
fn stanzas(r: impl BufRead) -> io::Result<Vec<(String, String)>> {
    #[derive(Default)]
    struct Stanza {
        package: Option<String>,
        version: Option<String>,
        arch: Option<String>,
        filename: Option<String>,
        sha256: Option<String>,
    }
    impl Stanza {
        fn take(&mut self) -> Option<(String, String)> {
            let s = std::mem::take(self);
            let ext = s.filename?.rsplit_once('.')?.1.to_string();
            let sha = s.sha256.filter(|h| is_sha256(h))?;
            Some((apt_name(&s.package?, &s.version?, &s.arch?, &ext), sha))
        }
    }
    let mut out = Vec::new();
    let mut cur = Stanza::default();
    for line in r.split(b'\n') {
        let line = line?;
        if line.is_empty() {
            out.extend(cur.take());
            continue;
        }
        // Continuation lines (descriptions) start with a blank.
        let Ok(line) = std::str::from_utf8(&line) else {
            continue;
        };
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        let value = Some(value.trim().to_string());
        match field {
            "Package" => cur.package = value,
            "Version" => cur.version = value,
            "Architecture" => cur.arch = value,
            "Filename" => cur.filename = value,
            "SHA256" => cur.sha256 = value,
            _ => {}
        }
    }
    out.extend(cur.take());
    Ok(out)
}

/// The name apt gives a downloaded package in its cache: its name, version
/// and architecture quoted as apt's `QuoteString` does (`:` in an epoch
/// becomes `%3a`).
fn apt_name(package: &str, version: &str, arch: &str, ext: &str) -> String {
    fn quote(s: &str, bad: &[u8]) -> String {
        let mut q = String::new();
        for &b in s.as_bytes() {
            if bad.contains(&b) || b == b'%' || b <= 0x20 || b >= 0x7f {
                q.push_str(&format!("%{b:02x}"));
            } else {
                q.push(char::from(b));
            }
        }
        q
    }
    format!(
        "{}_{}_{}.{ext}",
        quote(package, b"_:"),
        quote(version, b"_:"),
        quote(arch, b"_:.")
    )
}

/// apt's file names for the installed `packages` (see [`apt_name`]).
pub fn apt_names(packages: &Packages) -> BTreeSet<String> {
    packages
        .iter()
        .map(|(name, version, arch)| apt_name(name, version, arch, "deb"))
        .collect()
}

/// A name this module will store or offer: a plain file name ending in
/// `.deb`, nothing that could reach outside a directory.
fn is_apt_name(name: &str) -> bool {
    name.ends_with(".deb")
        && !name.starts_with('.')
        && !name.contains('/')
        && name.bytes().all(|b| b > 0x20 && b < 0x7f)
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn sha256_file(path: &Path) -> io::Result<String> {
    super::sha256_of(&fs::File::open(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    fn packages(entries: &[(&str, &str, &[u8])]) -> String {
        entries
            .iter()
            .map(|(name, version, data)| {
                format!(
                    "Package: {name}\nVersion: {version}\nArchitecture: amd64\n\
                     Description: a package\n multi-line: not a field\n\
                     Filename: pool/main/x/{name}_{version}_amd64.deb\nSHA256: {}\n\n",
                    sha(data)
                )
            })
            .collect()
    }

    /// Plays mmdebstrap's part: what its hooks copy out of the chroot.
    fn bootstrap(offer: &Offer, debs: &[(&str, &[u8])], lists: &str) {
        let out = offer.path().join("out");
        fs::create_dir_all(out.join("partial")).expect("out");
        for name in fs::read_dir(offer.path().join("in")).expect("in").flatten() {
            fs::copy(name.path(), out.join(name.file_name())).expect("copy in");
        }
        for (name, data) in debs {
            fs::write(out.join(name), data).expect("download");
        }
        fs::write(out.join("lock"), b"").expect("lock");
        let l = offer.path().join("lists");
        fs::create_dir_all(&l).expect("lists");
        fs::write(l.join("m_dists_bookworm_main_binary-amd64_Packages"), lists).expect("list");
    }

    #[test]
    fn apt_names_quote_epochs_and_underscores() {
        assert_eq!(
            apt_name("bsdutils", "1:2.38.1-5+deb12u3", "amd64", "deb"),
            "bsdutils_1%3a2.38.1-5+deb12u3_amd64.deb"
        );
        assert_eq!(apt_name("a_b", "1%", "x.y", "deb"), "a%5fb_1%25_x%2ey.deb");
    }

    #[test]
    fn stanzas_without_a_hash_or_a_file_are_skipped() {
        let text = format!(
            "{}Package: nohash\nVersion: 1\nArchitecture: all\nFilename: p/n.deb\n\n\
             Package: badhash\nVersion: 1\nArchitecture: all\nFilename: p/b.deb\nSHA256: zz\n\n\
             \u{0}\u{ff}\n\nPackage: last\nVersion: 2\nArchitecture: amd64\n\
             Filename: p/l.deb\nSHA256: {}",
            packages(&[("a", "1:1.0", b"A")]),
            sha(b"L")
        );
        let got = stanzas(text.as_bytes()).expect("parse");
        assert_eq!(
            got,
            vec![
                ("a_1%3a1.0_amd64.deb".to_string(), sha(b"A")),
                ("last_2_amd64.deb".to_string(), sha(b"L")),
            ]
        );
    }

    #[test]
    fn a_second_bootstrap_downloads_only_what_the_first_did_not_and_bad_files_are_not_kept() {
        let cache = tempfile::tempdir().expect("tempdir");
        let store = Store::open(cache.path(), "http://deb.debian.org/debian").expect("open");
        let lists = packages(&[("a", "1", b"A"), ("b", "1", b"B"), ("c", "1", b"C")]);

        let offer = store.offer().expect("offer");
        assert_eq!(offer.offered(), 0);
        let view = offer.path().to_path_buf();
        bootstrap(
            &offer,
            &[
                ("a_1_amd64.deb", b"A"),
                ("b_1_amd64.deb", b"B"),
                ("c_1_amd64.deb", b"tampered"),
                ("unlisted_1_amd64.deb", b"U"),
            ],
            &lists,
        );
        let all: BTreeSet<String> = ["a", "b", "c", "unlisted"]
            .iter()
            .map(|p| format!("{p}_1_amd64.deb"))
            .collect();
        let first = offer.ingest(&store, &all).expect("ingest");
        assert!(!view.exists(), "the offer's directory was left behind");
        assert_eq!(first.reused, 0);
        assert_eq!(
            first.downloaded,
            [
                "a_1_amd64.deb",
                "b_1_amd64.deb",
                "c_1_amd64.deb",
                "unlisted_1_amd64.deb"
            ]
        );
        assert_eq!(first.downloaded_bytes, 1 + 1 + 8 + 1);
        assert_eq!(first.not_kept, ["c_1_amd64.deb", "unlisted_1_amd64.deb"]);
        assert!(store.path().join(format!("{}.deb", sha(b"A"))).is_file());
        assert!(!store
            .path()
            .join(format!("{}.deb", sha(b"tampered")))
            .exists());

        // The same mirror, opened again (another kiln): a, b offered.
        let again = Store::open(cache.path(), "http://deb.debian.org/debian/").expect("open");
        let offer = again.offer().expect("offer");
        assert_eq!(offer.offered(), 2);
        assert_eq!(
            fs::read(offer.path().join("in").join("b_1_amd64.deb")).expect("offered"),
            b"B"
        );
        bootstrap(&offer, &[("c_1_amd64.deb", b"C")], &lists);
        let second = offer.ingest(&again, &all).expect("ingest");
        assert_eq!(second.reused, 2);
        assert_eq!(second.downloaded, ["c_1_amd64.deb"]);
        assert!(second.not_kept.is_empty());

        // Offered but not installed: not counted as reused.
        let offer = store.offer().expect("offer");
        assert_eq!(offer.offered(), 3);
        bootstrap(&offer, &[], &lists);
        let only_a: BTreeSet<String> = ["a_1_amd64.deb".to_string()].into();
        let third = offer.ingest(&store, &only_a).expect("ingest");
        assert_eq!((third.reused, third.downloaded.len()), (1, 0));

        // A stored file that changed is dropped, not offered.
        fs::write(store.path().join(format!("{}.deb", sha(b"A"))), b"rot").expect("rot");
        let offer = store.offer().expect("offer");
        assert_eq!(offer.offered(), 2);
        assert!(!offer.path().join("in").join("a_1_amd64.deb").exists());
        assert!(!store.path().join(format!("{}.deb", sha(b"A"))).exists());

        // Another mirror has a store of its own.
        let other = Store::open(cache.path(), "http://example.org/debian").expect("open");
        assert_ne!(other.path(), store.path());
        assert_eq!(other.offer().expect("offer").offered(), 0);
    }

    #[test]
    fn a_damaged_index_line_is_skipped() {
        let cache = tempfile::tempdir().expect("tempdir");
        let store = Store::open(cache.path(), "m").expect("open");
        fs::write(store.path().join(format!("{}.deb", sha(b"A"))), b"A").expect("blob");
        fs::write(
            store.path().join("index"),
            format!(
                "{} a_1_amd64.deb\ngarbage\n{} ../escape.deb\nabc b_1_amd64.deb\n",
                sha(b"A"),
                sha(b"A")
            ),
        )
        .expect("index");
        let index = store.read_index().expect("read");
        assert_eq!(
            index.into_iter().collect::<Vec<_>>(),
            [("a_1_amd64.deb".to_string(), sha(b"A"))]
        );
    }
}
