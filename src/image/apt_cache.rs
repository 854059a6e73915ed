//! The shared package cache for the recipe's commands. A build whose
//! commands use the network offers them the mirror's cached packages
//! (sandbox/cache/debs.rs) that its root does not have installed, as one
//! archive on the layers disk. A command with the network gets them,
//! unpacked on the build VM's scratch disk, as the tree's
//! `/var/cache/apt/archives` (a bind mount, command.sh): apt takes what it
//! finds and downloads the rest there. What it downloaded, and the tree's
//! package lists, go back out on the layers disk; after the build kiln
//! keeps each package whose SHA-256 the lists give. So a command that
//! installs one more package downloads only that package, and downloaded
//! .debs are in no layer and no image.
//!
//! The guest is not trusted with the cache every later build (and
//! bootstrap) draws on: a package list counts only if a Release file that
//! the host's gpgv verifies with the host's archive keyrings gives its
//! SHA-256. A command that forges a package and its list gets neither
//! kept.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::sandbox::cache::{self, debs};
use crate::util::packages::Packages;
use crate::util::process::tie;

/// The line a command prints with where what it downloaded is on the
/// layers disk: "OFFSET SIZE".
pub const DEBS_MARK: &str = "KILN_DEBS_OUT=";

pub struct AptCache {
    store: debs::Store,
    offer: debs::Offer,
    /// The archive of what is offered, for the layers disk.
    pub archive: PathBuf,
    /// apt's names of the packages in it.
    offered: BTreeSet<String>,
}

impl AptCache {
    /// The offer of `mirror`'s cached packages but those `installed` in
    /// the root, archived into `work`.
    pub fn open(mirror: &str, installed: &Packages, work: &Path) -> Result<AptCache> {
        let store = debs::Store::open(&cache::root()?, mirror)
            .context("opening the package cache for the commands")?;
        let offer = store
            .offer()
            .context("offering cached packages to the commands")?;
        let offered = offer.path().join("in");
        // apt never fetches what is installed already: not worth a copy.
        for name in debs::apt_names(installed) {
            let _ = std::fs::remove_file(offered.join(name));
        }
        let names = std::fs::read_dir(&offered)
            .with_context(|| format!("reading {}", offered.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let archive = work.join("offered-debs.tar");
        tar(Command::new("tar")
            .args(["--format=gnu", "--sort=name", "-C"])
            .arg(&offered)
            .arg("-cf")
            .arg(&archive)
            .arg("."))?;
        Ok(AptCache {
            store,
            offer,
            archive,
            offered: names,
        })
    }

    /// Takes in what a command downloaded: its archive (`out/` and
    /// `lists/`, command.sh).
    pub fn take(&self, archive: &Path) -> Result<()> {
        tar(Command::new("tar")
            .arg("-C")
            .arg(self.offer.path())
            .args([
                "--no-same-owner",
                "--no-same-permissions",
                "--warning=no-unknown-keyword",
                "-xf",
            ])
            .arg(archive))?;
        keep_verified_lists(&self.offer.path().join("lists"))
    }

    /// Keeps what the commands downloaded, given the image's packages.
    pub fn keep(self, installed: Option<&Packages>) -> Result<debs::DebReport> {
        let installed = installed.map(debs::apt_names).unwrap_or_default();
        // No command may have run (all reused): nothing came out.
        for dir in ["out", "lists"] {
            std::fs::create_dir_all(self.offer.path().join(dir))?;
        }
        let mut report = self
            .offer
            .ingest(&self.store, &installed)
            .context("keeping the packages the commands downloaded")?;
        // What the commands installed from the offer: the root's own
        // packages were never in it.
        report.reused = self.offered.intersection(&installed).count();
        Ok(report)
    }
}

/// The archive keyrings of the host that vouch for a mirror's Release.
const KEYRINGS: &[&str] = &[
    "/usr/share/keyrings/debian-archive-keyring.gpg",
    "/usr/share/keyrings/ubuntu-archive-keyring.gpg",
];

/// Removes from `lists` every `*_Packages` file that no `*_InRelease`
/// beside it vouches for: one gpgv verifies with a host keyring, whose
/// SHA256 section gives that file's path and hash.
fn keep_verified_lists(lists: &Path) -> Result<()> {
    let names: Vec<String> = std::fs::read_dir(lists)
        .with_context(|| format!("reading {}", lists.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut vouched: BTreeSet<String> = BTreeSet::new();
    for release in names.iter().filter(|n| n.ends_with("_InRelease")) {
        let Some(text) = verified(&lists.join(release)) else {
            continue;
        };
        let prefix = release.trim_end_matches("InRelease");
        for (hash, path) in sha256_section(&text) {
            // apt names a list by its URI with `/` as `_`.
            let name = format!("{prefix}{}", path.replace('/', "_"));
            if names.contains(&name) && file_sha256(&lists.join(&name)).as_deref() == Some(hash) {
                vouched.insert(name);
            }
        }
    }
    for n in names {
        if !vouched.contains(&n) {
            let _ = std::fs::remove_file(lists.join(n));
        }
    }
    Ok(())
}

/// The signed text of an InRelease file, if gpgv verifies it with one of
/// the host's keyrings.
fn verified(release: &Path) -> Option<String> {
    for keyring in KEYRINGS.iter().filter(|k| Path::new(k).is_file()) {
        let out = tie(Command::new("gpgv")
            .arg("--quiet")
            .arg("--keyring")
            .arg(keyring)
            .arg("--output")
            .arg("-")
            .arg(release))
        .output()
        .ok()?;
        if out.status.success() {
            return String::from_utf8(out.stdout).ok();
        }
    }
    None
}

/// (SHA-256, path) of each file a Release's SHA256 section lists.
fn sha256_section(text: &str) -> Vec<(&str, &str)> {
    let mut in_section = false;
    let mut found = Vec::new();
    for line in text.lines() {
        if !line.starts_with(' ') {
            in_section = line == "SHA256:";
            continue;
        }
        if in_section {
            let mut f = line.split_whitespace();
            if let (Some(hash), Some(_size), Some(path)) = (f.next(), f.next(), f.next()) {
                found.push((hash, path));
            }
        }
    }
    found
}

fn file_sha256(path: &Path) -> Option<String> {
    let dir = path.parent()?;
    let name = path.file_name()?.to_str()?;
    cache::sha256_of_entry_file(dir, name).ok()
}

fn tar(cmd: &mut Command) -> Result<()> {
    let out = tie(cmd).output().context("running tar")?;
    if !out.status.success() {
        bail!(
            "tar failed for the commands' package cache ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_lists_its_files_hashes() {
        let text = "Origin: Debian\nMD5Sum:\n 00 1 main/binary-amd64/Packages\nSHA256:\n \
                    aa 10 main/binary-amd64/Packages\n bb 20 main/i18n/Translation-en\n\
                    Other: x\n";
        assert_eq!(
            sha256_section(text),
            [
                ("aa", "main/binary-amd64/Packages"),
                ("bb", "main/i18n/Translation-en")
            ]
        );
    }

    #[test]
    fn lists_without_a_verified_release_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lists = dir.path();
        std::fs::write(lists.join("m_dists_x_main_binary-amd64_Packages"), "P").expect("w");
        // Not signed by anyone: gpgv refuses it.
        std::fs::write(lists.join("m_dists_x_InRelease"), "SHA256:\n x 1 y\n").expect("w");
        keep_verified_lists(lists).expect("verify");
        assert_eq!(std::fs::read_dir(lists).expect("read").count(), 0);
    }
}
