//! The repository's examples of other build systems (`images/make`,
//! `images/debos`), copied where a test uses them as a user's checkout.

use std::path::Path;
use std::process::Command;

/// Copies `images/NAME` to `to` (`cp -a`: modes kept, the scripts stay
/// executable).
pub fn copy_example(name: &str, to: &Path) {
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("images")
        .join(name);
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&example)
        .arg(to)
        .status()
        .expect("cp");
    assert!(copied.success(), "copying {}", example.display());
}
