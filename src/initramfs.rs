//! The guest's initramfs: the agent as `/init` plus the few directories it
//! needs, as a cpio "newc" archive written here, deterministically and
//! without root (device nodes are just archive entries).

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::cache;

/// The static guest agent, built by build.rs.
pub const AGENT: &[u8] = include_bytes!(env!("KILN_AGENT_PATH"));

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

enum Node<'a> {
    Dir,
    File(&'a [u8]),
    CharDev(u32, u32),
}

/// The initramfs for the embedded agent, written into the cache on first use.
pub fn path() -> Result<PathBuf> {
    let dir = cache::root()?.join("initramfs");
    let file = dir.join(format!("{}.cpio", &cache::hash(&[AGENT])[..16]));
    if file.exists() {
        return Ok(file);
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, &archive(AGENT))?;
    tmp.persist(&file)
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(file)
}

/// Builds the archive.
pub fn archive(agent: &[u8]) -> Vec<u8> {
    let entries: &[(&str, u32, Node)] = &[
        (".", 0o755, Node::Dir),
        ("dev", 0o755, Node::Dir),
        ("dev/console", 0o600, Node::CharDev(5, 1)),
        ("dev/null", 0o666, Node::CharDev(1, 3)),
        ("init", 0o755, Node::File(agent)),
        ("newroot", 0o755, Node::Dir),
        ("proc", 0o555, Node::Dir),
        ("run", 0o755, Node::Dir),
        ("sys", 0o555, Node::Dir),
        ("tmp", 0o1777, Node::Dir),
    ];
    let mut out = Vec::with_capacity(agent.len() + 4096);
    for (ino, (name, perm, node)) in entries.iter().enumerate() {
        let (kind, data, rdev, nlink): (u32, &[u8], (u32, u32), u32) = match node {
            Node::Dir => (S_IFDIR, &[], (0, 0), 2),
            Node::File(d) => (S_IFREG, d, (0, 0), 1),
            Node::CharDev(maj, min) => (S_IFCHR, &[], (*maj, *min), 1),
        };
        push_entry(
            &mut out,
            ino as u32 + 1,
            kind | perm,
            nlink,
            name,
            data,
            rdev,
        );
    }
    push_entry(&mut out, 0, 0, 1, "TRAILER!!!", &[], (0, 0));
    out
}

fn push_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    name: &str,
    data: &[u8],
    rdev: (u32, u32),
) {
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
    // rdevminor namesize check, all as 8 hex digits; mtime 0 keeps it
    // reproducible.
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn archive_is_deterministic_and_aligned() {
        let a = archive(b"#!/bin/true\n");
        assert_eq!(a, archive(b"#!/bin/true\n"));
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
    }

    #[test]
    fn cpio_tool_reads_it() {
        // GNU cpio lists what we wrote, with the device node and modes.
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("cpio not installed; skipping");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("i.cpio");
        fs::write(&file, archive(b"payload")).expect("write");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("cpio -itv < {}", file.display()))
            .output()
            .expect("cpio");
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(listing.contains("crw-------"), "{listing}");
        assert!(listing.contains("dev/console"), "{listing}");
        assert!(listing.contains("-rwxr-xr-x"), "{listing}");
        assert!(listing.contains("init"), "{listing}");
        assert!(listing.contains("drwxrwxrwt"), "{listing}");
    }
}
