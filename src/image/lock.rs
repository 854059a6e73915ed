//! `RECIPE.lock`: the packages an earlier build of a recipe installed,
//! beside the recipe. A build rewrites it when they change; `kiln build
//! --locked` refuses to build when they differ from it, which is how a
//! user notices that the mirror moved.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::packages::{self, Packages};
use crate::util::process::run_tool;

/// The changes a `--locked` failure lists before "and N more".
const LOCK_CHANGES_SHOWN: usize = 10;

/// `RECIPE.lock`: the recipe's file name with `.lock` for its extension,
/// beside it.
pub fn lock_path(recipe: &Path) -> PathBuf {
    recipe.with_extension("lock")
}

/// The lock `--locked` builds against; its absence is an error that says
/// how to make one.
pub fn read(path: &Path) -> Result<Packages> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "--locked: there is no lock file {}; build once without --locked to write it \
             (a build writes one when its image has a dpkg status, as a Debian root does)",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Packages::from_list(&text).with_context(|| format!("the lock file {}", path.display()))
}

/// Fails, listing the differences, unless `now` is what `lock` holds.
/// `when` says which packages were compared.
pub fn check(
    now: &Packages,
    lock: &Packages,
    lock_file: &Path,
    when: &str,
    out_dir: &Path,
) -> Result<()> {
    let changes = now.diff(lock);
    if changes.is_empty() {
        return Ok(());
    }
    bail!(
        "--locked: {when} differ from the lock {} in {} package(s):\n{}\
         The mirror now gives other versions, or the recipe changed. To accept them, \
         build without --locked, which rewrites the lock.\n(nothing was written to {})",
        lock_file.display(),
        changes.len(),
        packages::describe(&changes, LOCK_CHANGES_SHOWN),
        out_dir.display()
    )
}

/// The installed packages of a bootstrap's root archive, from its dpkg
/// status, read on the host before the build VM starts.
pub fn archive_packages(archive: &Path) -> Result<Packages> {
    // mmdebstrap's archives name members "./PATH".
    let status = run_tool(
        Command::new("tar")
            .arg("-xOf")
            .arg(archive)
            .arg("./var/lib/dpkg/status"),
        "reading the bootstrap's dpkg status with tar",
    )?;
    Packages::from_dpkg_status(&String::from_utf8_lossy(&status))
        .context("the bootstrap's /var/lib/dpkg/status")
}

/// Writes the lock beside the recipe, if it is new or says something
/// else; a note says what changed. A lock that cannot be written is a
/// warning: the image is built, only `--locked` cannot use it. Returns
/// whether the lock now lists `now`.
pub fn update(recipe: &Path, name: &str, now: &Packages, json: bool) -> bool {
    let path = lock_path(recipe);
    let text = now.to_lock(name);
    let old = std::fs::read_to_string(&path).ok();
    if old.as_deref() == Some(text.as_str()) {
        return true;
    }
    let write = || -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".kiln-lock-")
            .tempfile_in(dir)?;
        tmp.write_all(text.as_bytes())?;
        // tempfile makes it 0600; a lock is to be read and committed.
        tmp.as_file()
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path)?;
        Ok(())
    };
    if let Err(e) = write() {
        eprintln!(
            "kiln: warning: could not write the lock file {}: {e:#}",
            path.display()
        );
        return false;
    }
    if json {
        return true;
    }
    let old = old.and_then(|t| Packages::from_list(&t).ok());
    match old {
        Some(old) => {
            let changes = now.diff(&old);
            eprintln!(
                "lock: {} updated, {} package(s) changed:\n{}",
                path.display(),
                changes.len(),
                packages::describe(&changes, LOCK_CHANGES_SHOWN).trim_end()
            );
        }
        None => eprintln!("lock: wrote {} ({} packages)", path.display(), now.len()),
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_beside_the_recipe_and_a_difference_is_a_clear_error() {
        assert_eq!(
            lock_path(Path::new("dir/small.toml")),
            Path::new("dir/small.lock")
        );
        assert_eq!(lock_path(Path::new("recipe")), Path::new("recipe.lock"));
        let lock = Packages::from_list("a 1 amd64\nb 1 amd64\n").expect("lock");
        let out = Path::new("/out");
        let file = Path::new("r.lock");
        assert!(check(&lock, &lock, file, "the image's packages", out).is_ok());
        let now = Packages::from_list("a 2 amd64\nb 1 amd64\n").expect("now");
        let e = check(&now, &lock, file, "the image's packages", out)
            .expect_err("differs")
            .to_string();
        assert!(
            e.starts_with("--locked: the image's packages differ from the lock r.lock in 1 package(s):\n  ~ a:amd64 1 (locked) -> 2\n"),
            "{e}"
        );
        assert!(e.contains("build without --locked"), "{e}");
        assert!(e.ends_with("(nothing was written to /out)"), "{e}");
        let missing = read(Path::new("/nonexistent/r.lock"))
            .expect_err("missing")
            .to_string();
        assert!(missing.contains("build once without --locked"), "{missing}");
    }
}
