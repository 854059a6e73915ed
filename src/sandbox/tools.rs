//! The tools image: the guest's read-only userland, a squashfs built with
//! mmdebstrap from Debian packages, cached by the hash of suite + packages +
//! build options.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::sandbox::cache;
use crate::sandbox::mmdebstrap::Mmdebstrap;
use crate::util::owned_dir;
use crate::util::packages::Packages;

pub const SUITE: &str = "bookworm";

/// The image also takes packages from this suite (named in [`PACKAGES`]
/// as `name/suite`): e2fsprogs 1.47.2, whose `mke2fs -d` fills an ext4
/// from a tar, which kiln runs on the host (host_tools.rs).
const BACKPORTS: &str = "bookworm-backports";

pub const PACKAGES: &[&str] = &[
    "bash",
    "btrfs-progs",
    "coreutils",
    "cpio",
    "debootstrap",
    "dosfstools",
    "dpkg",
    "e2fsprogs/bookworm-backports",
    "fdisk",
    "gdisk",
    "grub-efi-amd64-bin",
    "grub-pc-bin",
    "grub2-common",
    // mke2fs loads it to read a tar.
    "libarchive13",
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
    // The backported mke2fs would give new ext4 filesystems two features
    // that bookworm's grub and e2fsprogs before 1.47 (Ubuntu 22.04's) cannot
    // handle; bookworm's own mke2fs.conf leaves them out too. The grep
    // fails the build if a later mke2fs.conf words them otherwise.
    "--customize-hook=sed -i -e 's/,metadata_csum_seed//' -e 's/,orphan_file//' \"$1/etc/mke2fs.conf\" && ! grep -q -e metadata_csum_seed -e orphan_file \"$1/etc/mke2fs.conf\"",
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

/// Packages a user adds to the tools image (`--package`): Debian package
/// names, sorted and without repeats, so the same set is the same image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extra(Vec<String>);

impl Extra {
    pub fn new(packages: &[String]) -> Result<Extra> {
        let mut v = Vec::with_capacity(packages.len());
        for p in packages {
            check_package_name(p)?;
            v.push(p.clone());
        }
        v.sort();
        v.dedup();
        Ok(Extra(v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A Debian package name (policy 5.6.1): lower-case letters, digits, `+`,
/// `-` and `.`, at least two long, starting alphanumeric. Anything else
/// would change mmdebstrap's comma-separated `--include`.
fn check_package_name(name: &str) -> Result<()> {
    let ok = name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    if !ok {
        bail!("'{name}' is not a Debian package name (lower-case letters, digits, '+', '-', '.')");
    }
    Ok(())
}

fn key(extra: &Extra) -> String {
    let pkgs = PACKAGES.join(",");
    let opts = MMDEBSTRAP_OPTIONS.join(" ");
    let sqfs = TAR2SQFS_OPTIONS.join(" ");
    let added = extra.0.join(",");
    let mut parts: Vec<&[u8]> = vec![
        SUITE.as_bytes(),
        pkgs.as_bytes(),
        opts.as_bytes(),
        sqfs.as_bytes(),
    ];
    // The base image keeps the key it always had.
    if !extra.is_empty() {
        parts.push(added.as_bytes());
    }
    cache::hash(&parts)[..16].to_string()
}

fn entry(extra: &Extra) -> Result<PathBuf> {
    Ok(entry_in(&cache::root()?, extra))
}

/// The entry of the image with `extra` packages in the cache at `root`.
fn entry_in(root: &Path, extra: &Extra) -> PathBuf {
    root.join("tools").join(format!("{SUITE}-{}", key(extra)))
}

/// The tools image: `user` if given (checked), else the cached one with
/// `extra` packages, held in use while the [`cache::CacheUse`] lives.
pub fn locate(user: Option<&Path>, extra: &Extra) -> Result<(PathBuf, cache::CacheUse)> {
    if let Some(p) = user {
        let meta = std::fs::metadata(p).with_context(|| format!("tools image {}", p.display()))?;
        if !meta.is_file() {
            bail!("tools image {} is not a file", p.display());
        }
        return Ok((p.to_path_buf(), cache::CacheUse::none()));
    }
    locate_cached(&cache::root()?, extra)
}

/// The cached image with `extra` packages, in the cache at `root`.
fn locate_cached(root: &Path, extra: &Extra) -> Result<(PathBuf, cache::CacheUse)> {
    let dir = entry_in(root, extra);
    // Held before it is looked at: a gc that removed it meanwhile shows as
    // the image not built.
    let held = cache::CacheUse::begin(&dir);
    let image = dir.join(IMAGE_NAME);
    if !image.is_file() && !extra.is_empty() {
        bail!(
            "the tools image with {} is not built yet: run 'kiln tools build{}'",
            extra.0.join(", "),
            package_args(extra)
        );
    }
    if !image.is_file() {
        bail!(
            "the tools image is not built yet: run 'kiln tools build' \
             (a few minutes, once; needs: sudo apt-get install mmdebstrap \
             squashfs-tools-ng uidmap), or pass your own with --tools IMAGE"
        );
    }
    cache::verify(&dir, &[IMAGE_NAME], &rebuild(extra))?;
    Ok((image, held))
}

/// The SHA-256 of the image `image` that [`locate`] returned.
pub fn image_sha256(image: &Path) -> Result<String> {
    let dir = image.parent().unwrap_or(Path::new("."));
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    cache::sha256_of_entry_file(dir, &name)
        .with_context(|| format!("reading the tools image {}", image.display()))
}

/// `--package P` for each added package, as the build command takes them.
fn package_args(extra: &Extra) -> String {
    extra.0.iter().map(|p| format!(" --package {p}")).collect()
}

/// What rebuilds a damaged image.
fn rebuild(extra: &Extra) -> String {
    format!("kiln tools build --force{}", package_args(extra))
}

/// Whether the entry `dir` can be used as it is (see [`cache::usable`]).
fn usable(dir: &Path, extra: &Extra) -> bool {
    cache::usable(dir, &[IMAGE_NAME], &rebuild(extra))
}

/// `bash -c PIPELINE kiln-tools-build N SQFS-OPTIONS... MMDEBSTRAP-ARGS...`,
/// writing the image to `$KILN_TOOLS_OUT`.
const PIPELINE: &str = r#"set -euo pipefail
n=$1
shift
sqfs=("${@:1:n}")
shift "$n"
mmdebstrap "$@" | tar2sqfs "${sqfs[@]}" "$KILN_TOOLS_OUT"
"#;

/// Builds the tools image with `extra` packages into the cache unless it
/// is there already; held in use while the [`cache::CacheUse`] lives.
pub fn build(force: bool, extra: &Extra) -> Result<(PathBuf, cache::CacheUse)> {
    let dest = entry(extra)?;
    // Held from before the build, so that no gc removes what it publishes.
    let held = cache::CacheUse::begin(&dest);
    let staging = match cache::Staging::begin(&dest, force, |d| usable(d, extra))? {
        cache::Begin::Done(dir) => return Ok((dir.join(IMAGE_NAME), held)),
        cache::Begin::Build(s) => s,
    };
    let mut bootstrap = Mmdebstrap::prepare(
        &[
            ("mmdebstrap", "mmdebstrap"),
            ("tar2sqfs", "squashfs-tools-ng"),
            ("rdsquashfs", "squashfs-tools-ng"),
        ],
        "to build the tools image",
        "the tools image",
        owned_dir::TOOLS,
    )?;
    let cache_root = cache::root()?;
    bootstrap.offer_cached_packages(&cache_root, &mirror());
    let image = std::path::absolute(staging.path().join(IMAGE_NAME))?;
    // mmdebstrap writes a tar (ownership kept, no root needed in unshare
    // mode) that tar2sqfs turns into the image. The pipeline is fixed text;
    // the arguments say how many of them are tar2sqfs's options.
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(PIPELINE)
        .arg("kiln-tools-build")
        .arg(TAR2SQFS_OPTIONS.len().to_string())
        .args(TAR2SQFS_OPTIONS)
        .arg(bootstrap.mode())
        .args(MMDEBSTRAP_OPTIONS)
        .args(bootstrap.package_cache_options())
        .arg(format!(
            "--include={}",
            PACKAGES
                .iter()
                .copied()
                .chain(extra.0.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(",")
        ))
        .arg("--format=tar")
        .arg(SUITE)
        .arg("-")
        .arg(mirror())
        .arg(format!("deb {} {BACKPORTS} main", mirror()))
        .env("KILN_TOOLS_OUT", &image);
    let what = if extra.is_empty() {
        format!("building tools image ({SUITE})")
    } else {
        format!(
            "building tools image ({SUITE}, with {})",
            extra.0.join(", ")
        )
    };
    bootstrap.run(
        cmd,
        &what,
        "build.log",
        &cache_root.join("tools").join("last-build.log"),
    )?;
    if let Some(r) = bootstrap.keep_downloads(&installed(&image)) {
        eprintln!("tools: {}", r.summary());
    }
    let dir = staging.commit_with_manifest(&[IMAGE_NAME])?;
    Ok((dir.join(IMAGE_NAME), held))
}

/// The packages installed in the tools image `image`, from its dpkg
/// status; none if that cannot be read (nothing then counts as reused).
fn installed(image: &Path) -> Packages {
    let status = Command::new("rdsquashfs")
        .args(["-c", "/var/lib/dpkg/status"])
        .arg(image)
        .stderr(Stdio::null())
        .output();
    match status {
        Ok(o) if o.status.success() => {
            Packages::from_dpkg_status(&String::from_utf8_lossy(&o.stdout)).unwrap_or_default()
        }
        _ => Packages::default(),
    }
}

/// The Debian mirror builds use: `KILN_DEBIAN_MIRROR`, or Debian's CDN.
pub fn mirror() -> String {
    std::env::var("KILN_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "http://deb.debian.org/debian".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extra(p: &[&str]) -> Result<Extra> {
        Extra::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn extra_packages_make_their_own_image() {
        let none = extra(&[]).expect("none");
        let a = extra(&["qemu-system-x86", "hello"]).expect("two");
        let b = extra(&["hello", "qemu-system-x86", "hello"]).expect("same set");
        assert_eq!(a, b);
        assert_eq!(key(&a), key(&b));
        assert_ne!(key(&a), key(&none));
        // The base image's key does not depend on this feature existing.
        let base = cache::hash(&[
            SUITE.as_bytes(),
            PACKAGES.join(",").as_bytes(),
            MMDEBSTRAP_OPTIONS.join(" ").as_bytes(),
            TAR2SQFS_OPTIONS.join(" ").as_bytes(),
        ]);
        assert_eq!(key(&none), base[..16]);
    }

    #[test]
    fn a_damaged_image_names_the_command_that_rebuilds_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let with = extra(&["hello"]).expect("one");
        let dest = entry_in(root.path(), &with);
        let cache::Begin::Build(s) =
            cache::Staging::begin(&dest, false, |d| usable(d, &with)).expect("begin")
        else {
            panic!("nothing built yet");
        };
        let data = vec![1u8; 256 << 10];
        std::fs::write(s.path().join(IMAGE_NAME), &data).expect("write");
        s.commit_with_manifest(&[IMAGE_NAME]).expect("commit");
        let (image, _held) = locate_cached(root.path(), &with).expect("as built");
        // Give the change other file times than the build's (one clock
        // tick), then flip a byte, size kept.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut bad = data;
        bad[1000] = 2;
        std::fs::write(&image, &bad).expect("corrupt");
        let e = format!(
            "{:#}",
            locate_cached(root.path(), &with).expect_err("corrupt")
        );
        assert!(e.contains(&image.display().to_string()), "{e}");
        assert!(
            e.contains("'kiln tools build --force --package hello'"),
            "{e}"
        );
        assert!(
            !usable(&dest, &with),
            "a damaged image would not be rebuilt"
        );
    }

    #[test]
    fn package_names_are_checked() {
        for ok in ["g++", "libc6.1-dev", "0ad", "qemu-system-x86"] {
            assert!(extra(&[ok]).is_ok(), "{ok}");
        }
        for bad in ["a,b", "Hello", "-x", "x", "a b", "pkg=1.0", "../x", ""] {
            let e = extra(&[bad]).expect_err(bad).to_string();
            assert!(e.contains("is not a Debian package name"), "{e}");
        }
    }
}
