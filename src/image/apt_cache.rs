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
            .arg(archive))
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
