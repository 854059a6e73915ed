//! The guest's name resolution under `kiln run --net`. The kernel has
//! already set the interface up from its command line (`ip=`) and lists
//! the DNS server it was given in /proc/net/pnp; this makes that the
//! resolver's configuration. Without a network the file lists none, and
//! nothing changes.

use std::fs;
use std::io;
use std::path::Path;

use crate::etc_file;

/// The `nameserver` lines of the kernel's IP auto-configuration report.
fn nameservers(pnp: &str) -> Vec<&str> {
    pnp.lines()
        .filter(|l| {
            l.strip_prefix("nameserver ")
                .is_some_and(|a| !a.trim().is_empty() && a.trim() != "0.0.0.0")
        })
        .collect()
}

/// Writes `etc/resolv.conf` under `root` from `pnp` (the text of
/// /proc/net/pnp), replacing whatever the tools image had there (a link to
/// systemd-resolved's file, say, which nothing serves here). Returns
/// whether there was a server to write.
fn write_resolv_conf(pnp: &str, root: &Path) -> io::Result<bool> {
    let servers = nameservers(pnp);
    if servers.is_empty() {
        return Ok(false);
    }
    let mut text = String::from("# from the kernel's ip= configuration (kiln run --net)\n");
    for s in servers {
        text.push_str(s);
        text.push('\n');
    }
    etc_file::replace(&root.join("etc/resolv.conf"), &text)?;
    Ok(true)
}

/// Points the resolver at the DNS server the kernel was given, if any.
pub fn configure_resolver() -> io::Result<()> {
    let pnp = match fs::read_to_string("/proc/net/pnp") {
        Ok(t) => t,
        // A kernel without IP auto-configuration: no network to name.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    write_resolv_conf(&pnp, Path::new("/")).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_nameservers_become_resolv_conf() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("etc")).expect("etc");
        // A dangling link where the tools image had systemd-resolved's file.
        std::os::unix::fs::symlink(
            "/run/systemd/resolve/stub-resolv.conf",
            dir.path().join("etc/resolv.conf"),
        )
        .expect("link");
        let pnp = "#MANUAL\nnameserver 10.0.2.3\nnameserver 0.0.0.0\n";
        assert!(write_resolv_conf(pnp, dir.path()).expect("write"));
        let text = fs::read_to_string(dir.path().join("etc/resolv.conf")).expect("read");
        assert!(text.ends_with("\nnameserver 10.0.2.3\n"), "{text}");
        assert!(!text.contains("0.0.0.0"), "{text}");
    }

    #[test]
    fn without_a_network_nothing_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("etc")).expect("etc");
        assert!(!write_resolv_conf("", dir.path()).expect("write"));
        assert!(!dir.path().join("etc/resolv.conf").exists());
    }
}
