//! The guest's initramfs: the agent as `/init` plus the few directories it
//! needs, as a cpio "newc" archive written here, deterministically and
//! without root (device nodes are just archive entries).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::sandbox::cache;

/// The static guest agent, built by the crate's build.rs.
pub const AGENT: &[u8] = include_bytes!(env!("KILN_AGENT_PATH"));

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

enum Node<'a> {
    Dir,
    File(&'a [u8]),
    CharDev(u32, u32),
}

/// The initramfs for the embedded agent, written into the cache on first
/// use; held in use while the [`cache::CacheUse`] lives.
pub fn path() -> Result<(PathBuf, cache::CacheUse)> {
    let root = cache::root()?;
    // Held before it is looked at: one a gc removed meanwhile is written
    // again.
    let held = cache::CacheUse::begin(&entry_in(&root));
    Ok((path_in(&root)?, held))
}

/// Where the initramfs for the embedded agent is, in the cache at `root`.
fn entry_in(root: &Path) -> PathBuf {
    root.join("initramfs")
        .join(format!("{}.cpio", &cache::hash(&[AGENT])[..16]))
}

/// The initramfs in the cache at `root`. The cached copy is compared with
/// the archive in full on every use (0.75 MB, well under a millisecond),
/// and written again if it differs, so a damaged one heals itself. It is
/// written to a temp file renamed into place: kilns starting at once each
/// write theirs, one rename wins, and every reader sees a whole archive.
fn path_in(root: &Path) -> Result<PathBuf> {
    let file = entry_in(root);
    let dir = root.join("initramfs");
    let want = archive(AGENT);
    if fs::read(&file).is_ok_and(|have| have == want) {
        return Ok(file);
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".initramfs-")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    tmp.write_all(&want)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
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
    fn the_cached_copy_is_whole_written_once_and_healed() {
        let root = tempfile::tempdir().expect("tempdir");
        // Kilns starting at once on an empty cache.
        let racers: Vec<_> = (0..4)
            .map(|_| {
                let root = root.path().to_path_buf();
                std::thread::spawn(move || path_in(&root).expect("initramfs"))
            })
            .collect();
        let paths: Vec<PathBuf> = racers
            .into_iter()
            .map(|r| r.join().expect("racer"))
            .collect();
        assert!(paths.iter().all(|p| *p == paths[0]));
        let names: Vec<_> = fs::read_dir(root.path().join("initramfs"))
            .expect("readdir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "one file, no temp files: {names:?}");
        assert_eq!(fs::read(&paths[0]).expect("read"), archive(AGENT));

        // Cut short (a crash before the data reached the disk): rewritten.
        fs::write(&paths[0], b"").expect("truncate");
        assert_eq!(path_in(root.path()).expect("again"), paths[0]);
        assert_eq!(fs::read(&paths[0]).expect("read"), archive(AGENT));
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
        let out = Command::new("cpio")
            .arg("-itv")
            .stdin(fs::File::open(&file).expect("open"))
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
