//! Running mmdebstrap, for the tools image and `root.suite` bootstraps:
//! in root mode when kiln runs as root, otherwise in unshare mode once this
//! user is found able to (util/userns.rs); with its temporary files in a work
//! directory kiln owns, and its output in a log that is kept in the cache
//! when it fails; with the packages earlier bootstraps downloaded offered
//! from the shared package cache, and the new ones kept there. What it
//! bootstraps, and into what, is the caller's.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::sandbox::cache::debs::{self, DebReport, Offer, Store};
use crate::sandbox::logged_job;
use crate::util::owned_dir::OwnedDir;
use crate::util::packages::Packages;
use crate::util::userns;
use crate::util::which::which;

/// A bootstrap about to run: its mode chosen and its work directory made.
pub struct Mmdebstrap {
    root: bool,
    scratch: OwnedDir,
    packages: Option<(Store, Offer)>,
}

impl Mmdebstrap {
    /// Checks that `programs` (mmdebstrap and any the caller pipes it into,
    /// each with its Debian package) are installed, `needed_for` naming
    /// the job in the message ("to build the tools image"), and that
    /// unshare mode can run unless kiln is root (`unshare_job` naming the
    /// job there); then makes the work directory, `scratch_prefix<random>`.
    pub fn prepare(
        programs: &[(&str, &str)],
        needed_for: &str,
        unshare_job: &str,
        scratch_prefix: &str,
    ) -> Result<Mmdebstrap> {
        let root = rustix::process::geteuid().is_root();
        for (program, package) in programs {
            if which(program).is_none() {
                bail!("{program} not found, needed {needed_for}: sudo apt-get install {package}");
            }
        }
        if !root {
            userns::check_unshare_mode(unshare_job)?;
        }
        let scratch = OwnedDir::new(scratch_prefix).context("creating a work directory")?;
        Ok(Mmdebstrap {
            root,
            scratch,
            packages: None,
        })
    }

    /// Offers this bootstrap every package `mirror` gave an earlier one,
    /// from the package cache at `cache_root`. A cache that cannot take
    /// them (read-only) only costs downloads: a warning says so.
    pub fn offer_cached_packages(&mut self, cache_root: &Path, mirror: &str) {
        match Store::open(cache_root, mirror).and_then(|s| Ok((s.offer()?, s))) {
            Ok((offer, store)) => self.packages = Some((store, offer)),
            Err(e) => eprintln!("warning: {e}; every package is downloaded"),
        }
    }

    /// The options that hand the offered packages in and the downloaded
    /// ones out (none without an offer); they change nothing in the result.
    pub fn package_cache_options(&self) -> &'static [&'static str] {
        if self.packages.is_some() {
            debs::MMDEBSTRAP_HOOKS
        } else {
            &[]
        }
    }

    /// After a run that succeeded, which installed `installed`: keeps what
    /// it downloaded in the package cache. What cannot be kept is a
    /// warning, never an error: the bootstrap itself is done.
    pub fn keep_downloads(&mut self, installed: &Packages) -> Option<DebReport> {
        let (store, offer) = self.packages.take()?;
        let report = match offer.ingest(&store, &debs::apt_names(installed)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("warning: the downloaded packages were not kept: {e}");
                return None;
            }
        };
        if !report.not_kept.is_empty() {
            eprintln!(
                "warning: not kept in the package cache, as their SHA-256 is not the one the \
                 mirror's package lists give: {}",
                report.not_kept.join(", ")
            );
        }
        Some(report)
    }

    /// Writes the hook script `text` as the executable `name` in the work
    /// directory, and returns its absolute path, for a `--*-hook=` option
    /// (mmdebstrap runs a hook that is a file, not a command line, as it is).
    pub fn write_hook(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = std::path::absolute(self.scratch.path().join(name))?;
        std::fs::write(&path, text)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)))
            .with_context(|| format!("writing the bootstrap hook {}", path.display()))?;
        Ok(path)
    }

    /// mmdebstrap's `--mode`.
    pub fn mode(&self) -> &'static str {
        mode(self.root)
    }

    /// Runs `cmd` (mmdebstrap, or a pipeline around it) as the long job
    /// `what`, its temporary files in the work directory and its output in
    /// `log_name` there; the log is copied to `keep_log` if it fails.
    /// With packages offered, it runs in the offer's directory, which
    /// [`Self::package_cache_options`] name their folders relative to:
    /// paths among its arguments must be absolute.
    pub fn run(&self, mut cmd: Command, what: &str, log_name: &str, keep_log: &Path) -> Result<()> {
        // Absolute: the command may run in the offer's directory.
        cmd.env("TMPDIR", std::path::absolute(self.scratch.path())?);
        if let Some((_, offer)) = &self.packages {
            cmd.current_dir(offer.path());
        }
        let log = self.scratch.path().join(log_name);
        logged_job::run_logged_keeping(cmd, what, &log, keep_log)
    }
}

fn mode(root: bool) -> &'static str {
    if root {
        "--mode=root"
    } else {
        "--mode=unshare"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_bootstraps_in_root_mode_and_others_in_unshare_mode() {
        assert_eq!(mode(true), "--mode=root");
        assert_eq!(mode(false), "--mode=unshare");
    }

    #[test]
    fn a_missing_program_is_named_with_its_package() {
        let e = Mmdebstrap::prepare(
            &[("kiln-no-such-program", "kiln-package")],
            "to test this",
            "a test",
            "kiln-test-",
        )
        .err()
        .expect("found a program that does not exist");
        assert_eq!(
            e.to_string(),
            "kiln-no-such-program not found, needed to test this: \
             sudo apt-get install kiln-package"
        );
    }

    #[test]
    fn the_log_of_a_failed_run_is_kept_and_the_work_directory_is_its_temp_dir() {
        let keep = tempfile::tempdir().expect("tempdir");
        let m = Mmdebstrap {
            root: false,
            scratch: OwnedDir::new_in(keep.path(), "kiln-test-").expect("scratch"),
            packages: None,
        };
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo \"tmp=$TMPDIR\"; exit 3"]);
        let kept = keep.path().join("last.log");
        let e = m
            .run(cmd, "a failing job", "job.log", &kept)
            .expect_err("exit 3 succeeded");
        assert!(e.to_string().contains("a failing job failed"), "{e}");
        let log = std::fs::read_to_string(&kept).expect("the log was not kept");
        assert_eq!(log, format!("tmp={}\n", m.scratch.path().display()));

        let ok = keep.path().join("ok.log");
        m.run(Command::new("true"), "a job", "job.log", &ok)
            .expect("true failed");
        assert!(!ok.exists(), "the log of a job that succeeded was kept");
    }
}
