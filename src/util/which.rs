//! Finding a host program by name, as a shell would: the first regular
//! file of that name in the directories of `$PATH`. Self-contained, so the
//! benches and test helpers include this file too.

use std::path::PathBuf;

/// `name` in `$PATH`; `None` if it is in none of its directories (or
/// `$PATH` is unset).
pub fn which(name: &str) -> Option<PathBuf> {
    which_also_in(name, &[])
}

/// `name` in `$PATH`, then in `more`: places a program may be kept outside
/// an ordinary user's `$PATH` (`/usr/sbin`, `/usr/libexec`).
pub fn which_also_in(name: &str, more: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH");
    first_in(
        name,
        path.iter()
            .flat_map(std::env::split_paths)
            .chain(more.iter().cloned()),
    )
}

/// The first regular file called `name` in `dirs`.
fn first_in(name: &str, dirs: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

// Each test imports what it tests: the benches include this file, with
// cfg(test) set but without #[test] functions.
#[cfg(test)]
mod tests {
    #[test]
    fn takes_the_first_regular_file_in_order() {
        use super::*;
        let root = tempfile::tempdir().expect("tempdir");
        let dir = |n: &str| {
            let d = root.path().join(n);
            std::fs::create_dir(&d).expect("mkdir");
            d
        };
        let (a, b, c) = (dir("a"), dir("b"), dir("c"));
        // A directory of the name is not a program.
        std::fs::create_dir(a.join("tool")).expect("mkdir");
        std::fs::write(b.join("tool"), "").expect("write");
        std::fs::write(c.join("tool"), "").expect("write");
        let dirs = || vec![a.clone(), b.clone(), c.clone()];
        assert_eq!(first_in("tool", dirs()), Some(b.join("tool")));
        assert_eq!(first_in("missing", dirs()), None);
        assert_eq!(first_in("tool", vec![]), None);
    }

    #[test]
    fn looks_in_path_then_in_the_extra_places() {
        use super::*;
        // PATH is the test process's own (setting it would race the tests
        // that start programs): sh is in it.
        let sh = which("sh").expect("sh in PATH");
        assert!(sh.is_file(), "{}", sh.display());
        let extra = tempfile::tempdir().expect("tempdir");
        let name = "kiln-which-test-program";
        assert_eq!(which(name), None);
        std::fs::write(extra.path().join(name), "").expect("write");
        let more = [extra.path().to_path_buf()];
        assert_eq!(which_also_in(name, &more), Some(extra.path().join(name)));
        assert_eq!(which_also_in("sh", &more), Some(sh), "PATH comes first");
    }
}
