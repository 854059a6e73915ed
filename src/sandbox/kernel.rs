//! The guest kernel: built from Debian's linux-source-6.1 with
//! `kernel-config/`, cached under `<cache>/kernel/<config hash>-<source version>`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::sandbox::{cache, logged_job};
use crate::util::owned_dir::{self, OwnedDir};

pub const FRAGMENT: &str = include_str!("../../kernel-config/kiln.config");
pub const SCRIPT: &str = include_str!("../../kernel-config/build.sh");
const SOURCE_PACKAGE: &str = "linux-source-6.1";
const DEFAULT_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";
const INSTALL_HINT: &str = "sudo apt-get install linux-source-6.1 build-essential bc bison \
                            flex libelf-dev libssl-dev";

/// A built kernel, held in use (see [`cache::CacheUse`]) while this lives.
#[derive(Debug)]
pub struct Kernel {
    pub dir: PathBuf,
    held: cache::CacheUse,
}

impl Kernel {
    /// The uncompressed kernel, booted through its PVH entry.
    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }

    /// What holds the entry in use, for whoever uses it longer than this.
    pub fn into_use(self) -> cache::CacheUse {
        self.held
    }

    pub fn release(&self) -> String {
        fs::read_to_string(self.dir.join("release"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }
}

fn config_hash() -> String {
    cache::hash(&[FRAGMENT.as_bytes(), SCRIPT.as_bytes()])[..16].to_string()
}

fn source_path() -> PathBuf {
    std::env::var_os("KILN_KERNEL_SOURCE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOURCE))
}

/// Identifies the kernel source: the Debian package version, or for a
/// source given by path, a hash of its contents.
fn source_version() -> Result<Option<String>> {
    let src = source_path();
    if !src.exists() {
        return Ok(None);
    }
    if std::env::var_os("KILN_KERNEL_SOURCE").is_none() {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", SOURCE_PACKAGE])
            .output();
        if let Ok(out) = out {
            let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !v.is_empty() {
                return Ok(Some(v));
            }
        }
    }
    let data = fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
    Ok(Some(cache::hash(&[&data])[..16].to_string()))
}

fn kernel_dir() -> Result<PathBuf> {
    Ok(cache::root()?.join("kernel"))
}

fn entry_name(version: &str) -> String {
    let v: String = version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{}-{v}", config_hash())
}

/// The files of an entry kiln uses, checked against its manifest.
const FILES: &[&str] = &["vmlinux", "release"];
/// What rebuilds a damaged entry.
const REBUILD: &str = "kiln kernel build --force";

fn complete(dir: &Path) -> bool {
    cache::complete(dir, FILES)
}

/// Whether the entry `dir` can be used as it is (see [`cache::usable`]).
fn usable(dir: &Path) -> bool {
    cache::usable(dir, FILES, REBUILD)
}

/// The built kernel for the current config: the one for the installed source
/// version if built, else the newest built from this config.
pub fn locate() -> Result<Kernel> {
    locate_in(&kernel_dir()?)
}

/// [`locate`] in the kernel directory `dir` of a cache.
fn locate_in(dir: &Path) -> Result<Kernel> {
    let prefix = format!("{}-", config_hash());
    let mut built: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix) && complete(&e.path()))
        .map(|e| {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, e.path())
        })
        .collect();
    // Asking dpkg which source is installed costs a process; only worth it
    // when there is a choice.
    if built.len() > 1 {
        if let Some(v) = source_version()? {
            let d = dir.join(entry_name(&v));
            if complete(&d) {
                return in_use(d);
            }
        }
    }
    built.sort();
    match built.pop() {
        Some((_, dir)) => in_use(dir),
        None => bail!(
            "the guest kernel is not built yet: run 'kiln kernel build' \
             (a few minutes, once; needs: {INSTALL_HINT})"
        ),
    }
}

/// The entry `dir`, checked once it is held in use (so that a `kiln cache
/// gc` that removed it meanwhile shows as its files missing).
fn in_use(dir: PathBuf) -> Result<Kernel> {
    let held = cache::CacheUse::begin(&dir);
    if !dir.exists() {
        bail!(
            "the guest kernel {} was removed as kiln started (by a 'kiln cache gc'?): \
             run the command again ('kiln kernel build' if no kernel is left)",
            dir.display()
        );
    }
    cache::verify(&dir, FILES, REBUILD)?;
    Ok(Kernel { dir, held })
}

/// Builds the kernel into the cache unless it is there already.
pub fn build(force: bool) -> Result<Kernel> {
    let Some(version) = source_version()? else {
        bail!(
            "kernel source {} not found: install it with '{INSTALL_HINT}'",
            source_path().display()
        );
    };
    let dest = kernel_dir()?.join(entry_name(&version));
    // Held from before the build, so that no gc removes what it publishes.
    let held = cache::CacheUse::begin(&dest);
    let staging = match cache::Staging::begin(&dest, force, usable)? {
        cache::Begin::Done(dir) => return Ok(Kernel { dir, held }),
        cache::Begin::Build(s) => s,
    };
    // The unpacked source tree lives in a temp dir kiln owns, so it is gone
    // on every exit path, Ctrl-C included.
    let scratch = OwnedDir::new(owned_dir::KERNEL).context("creating a work directory")?;
    let fragment = scratch.path().join("kiln.config");
    let script = scratch.path().join("build.sh");
    fs::write(&fragment, FRAGMENT)?;
    fs::write(&script, SCRIPT)?;
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .arg(&fragment)
        .arg(staging.path())
        .env("TMPDIR", scratch.path())
        .env("KILN_KERNEL_SOURCE", source_path());
    logged_job::run_logged_keeping(
        cmd,
        &format!("building guest kernel ({version})"),
        &scratch.path().join("build.log"),
        &kernel_dir()?.join("last-build.log"),
    )?;
    let dir = staging.commit_with_manifest(FILES)?;
    Ok(Kernel { dir, held })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel entry as `kiln kernel build` publishes it, in `dir`.
    fn built(dir: &Path, vmlinux: &[u8]) -> PathBuf {
        let dest = dir.join(entry_name("6.1.0-test"));
        let cache::Begin::Build(s) = cache::Staging::begin(&dest, false, usable).expect("begin")
        else {
            panic!("nothing built yet");
        };
        fs::write(s.path().join("vmlinux"), vmlinux).expect("write");
        fs::write(s.path().join("release"), "6.1.0-test\n").expect("write");
        s.commit_with_manifest(FILES).expect("commit")
    }

    #[test]
    fn a_damaged_kernel_names_the_command_that_rebuilds_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let entry = built(dir.path(), &[7u8; 64 << 10]);
        assert_eq!(locate_in(dir.path()).expect("as built").dir, entry);
        // Truncated, as by a full disk or a copy cut short.
        let vmlinux = entry.join("vmlinux");
        fs::write(&vmlinux, [7u8; 100]).expect("truncate");
        let e = format!("{:#}", locate_in(dir.path()).expect_err("truncated"));
        assert!(e.contains(&vmlinux.display().to_string()), "{e}");
        assert!(e.contains("'kiln kernel build --force'"), "{e}");
        assert!(!usable(&entry), "a damaged entry would not be rebuilt");
    }
}
