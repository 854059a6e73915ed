//! The guest's machine ID. The tools image ships /etc/machine-id empty,
//! as images should, and on a booted system systemd would fill it in;
//! here nothing does, and tools that need one refuse to run
//! (systemd-nspawn, which debos and mkosi use: "Failed to retrieve machine
//! ID: No medium found"). Each VM gets its own, from the kernel's random
//! boot ID, as systemd gives a machine without one a transient ID.

use std::fs;
use std::io;
use std::path::Path;

use crate::etc_file;

/// A machine ID (32 lowercase hex digits) from a boot ID, a UUID as the
/// kernel prints it; `None` if it is not one.
fn from_boot_id(boot_id: &str) -> Option<String> {
    let id: String = boot_id.trim().chars().filter(|&c| c != '-').collect();
    (id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// Writes `etc/machine-id` under `root` from `boot_id` unless the file
/// already holds an ID. Returns whether it wrote one.
fn write(root: &Path, boot_id: &str) -> io::Result<bool> {
    let path = root.join("etc/machine-id");
    match fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = from_boot_id(boot_id).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the kernel's boot ID is not a UUID: {boot_id:?}"),
        )
    })?;
    etc_file::replace(&path, &format!("{id}\n"))?;
    Ok(true)
}

/// Gives the guest a machine ID if its root has none.
pub fn ensure() -> io::Result<()> {
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    write(Path::new("/"), &boot_id).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT_ID: &str = "3F2504E0-4F89-11D3-9A0C-0305E82C3301\n";

    #[test]
    fn a_boot_id_becomes_32_lowercase_hex_digits() {
        assert_eq!(
            from_boot_id(BOOT_ID).as_deref(),
            Some("3f2504e04f8911d39a0c0305e82c3301")
        );
        assert_eq!(from_boot_id(""), None);
        assert_eq!(from_boot_id("3f2504e0-4f89-11d3-9a0c"), None);
        assert_eq!(from_boot_id("zz2504e0-4f89-11d3-9a0c-0305e82c3301"), None);
    }

    #[test]
    fn an_empty_or_missing_id_is_written_and_a_real_one_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("etc")).expect("etc");
        let file = dir.path().join("etc/machine-id");

        assert!(write(dir.path(), BOOT_ID).expect("missing"));
        assert_eq!(
            fs::read_to_string(&file).expect("read"),
            "3f2504e04f8911d39a0c0305e82c3301\n"
        );

        fs::write(&file, "").expect("empty");
        assert!(write(dir.path(), BOOT_ID).expect("empty"));
        assert_eq!(
            fs::read_to_string(&file).expect("read"),
            "3f2504e04f8911d39a0c0305e82c3301\n"
        );

        fs::write(&file, "0123456789abcdef0123456789abcdef\n").expect("real");
        assert!(!write(dir.path(), BOOT_ID).expect("real"));
        assert_eq!(
            fs::read_to_string(&file).expect("read"),
            "0123456789abcdef0123456789abcdef\n"
        );

        fs::write(&file, "").expect("empty");
        assert!(write(dir.path(), "not a uuid").is_err());
    }
}
