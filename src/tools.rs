//! The tools image: the guest's read-only userland, a squashfs built with
//! mmdebstrap from Debian packages, cached by the hash of suite + packages +
//! build options.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::backend::qemu::which;
use crate::{cache, job};

pub const SUITE: &str = "bookworm";

pub const PACKAGES: &[&str] = &[
    "bash",
    "btrfs-progs",
    "coreutils",
    "cpio",
    "debootstrap",
    "dosfstools",
    "dpkg",
    "e2fsprogs",
    "fdisk",
    "gdisk",
    "grub-efi-amd64-bin",
    "grub-pc-bin",
    "grub2-common",
    "mount",
    "mtools",
    "parted",
    "rsync",
    "squashfs-tools",
    "tar",
    "util-linux",
    "xfsprogs",
    "xorriso",
    "xz-utils",
    "zstd",
];

/// Options that shape the image's contents (and so are part of its key).
const MMDEBSTRAP_OPTIONS: &[&str] = &[
    "--variant=essential",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
];

/// How the tar from mmdebstrap becomes the squashfs. zstd with 128 KiB
/// blocks, because every file the guest opens is decompressed under
/// emulation: mmdebstrap's own squashfs output (xz, 1 MiB blocks) made
/// `kiln run -- true` about 0.25 s slower under TCG.
const TAR2SQFS_OPTIONS: &[&str] = &[
    "--quiet",
    "--force",
    "--compressor",
    "zstd",
    "--block-size",
    "131072",
];

const IMAGE_NAME: &str = "tools.squashfs";

fn key() -> String {
    let pkgs = PACKAGES.join(",");
    let opts = MMDEBSTRAP_OPTIONS.join(" ");
    let sqfs = TAR2SQFS_OPTIONS.join(" ");
    cache::hash(&[
        SUITE.as_bytes(),
        pkgs.as_bytes(),
        opts.as_bytes(),
        sqfs.as_bytes(),
    ])[..16]
        .to_string()
}

fn entry() -> Result<PathBuf> {
    Ok(cache::root()?
        .join("tools")
        .join(format!("{SUITE}-{}", key())))
}

/// The tools image: `user` if given (checked), else the cached one.
pub fn locate(user: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = user {
        let meta = std::fs::metadata(p).with_context(|| format!("tools image {}", p.display()))?;
        if !meta.is_file() {
            bail!("tools image {} is not a file", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let image = entry()?.join(IMAGE_NAME);
    if !image.is_file() {
        bail!(
            "the tools image is not built yet: run 'kiln tools build' \
             (a few minutes, once; needs: sudo apt-get install mmdebstrap \
             squashfs-tools-ng uidmap), or pass your own with --tools IMAGE"
        );
    }
    Ok(image)
}

pub fn build(force: bool) -> Result<PathBuf> {
    let dest = entry()?;
    let staging = match cache::Staging::begin(&dest, force, |d| d.join(IMAGE_NAME).is_file())? {
        cache::Begin::Done(dir) => return Ok(dir.join(IMAGE_NAME)),
        cache::Begin::Build(s) => s,
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut needed = vec![
        ("mmdebstrap", "mmdebstrap"),
        ("tar2sqfs", "squashfs-tools-ng"),
    ];
    if !root {
        needed.push(("newuidmap", "uidmap"));
    }
    for (tool, package) in needed {
        if which(tool).is_none() {
            bail!(
                "{tool} not found, needed to build the tools image: sudo apt-get install {package}"
            );
        }
    }
    let scratch = tempfile::Builder::new().prefix("kiln-tools-").tempdir()?;
    // mmdebstrap writes a tar (ownership kept, no root needed in unshare
    // mode) that tar2sqfs turns into the image.
    let mut script = String::from("set -euo pipefail\nmmdebstrap \"$@\" | tar2sqfs");
    for o in TAR2SQFS_OPTIONS {
        script.push(' ');
        script.push_str(o);
    }
    script.push_str(" \"$KILN_TOOLS_OUT\"\n");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .arg("kiln-tools-build")
        .arg(if root {
            "--mode=root"
        } else {
            "--mode=unshare"
        })
        .args(MMDEBSTRAP_OPTIONS)
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg("--format=tar")
        .arg(SUITE)
        .arg("-")
        .env("KILN_TOOLS_OUT", staging.path().join(IMAGE_NAME))
        .env("TMPDIR", scratch.path());
    if let Some(mirror) = std::env::var_os("KILN_DEBIAN_MIRROR").filter(|m| !m.is_empty()) {
        cmd.arg(mirror);
    }
    let log = scratch.path().join("build.log");
    if let Err(e) = job::run_logged(cmd, &format!("building tools image ({SUITE})"), &log) {
        let _ = std::fs::copy(&log, cache::root()?.join("tools").join("last-build.log"));
        return Err(e);
    }
    Ok(staging.commit()?.join(IMAGE_NAME))
}

/// The Debian mirror builds use: `KILN_DEBIAN_MIRROR`, or Debian's CDN.
pub fn mirror() -> String {
    std::env::var("KILN_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "http://deb.debian.org/debian".into())
}
