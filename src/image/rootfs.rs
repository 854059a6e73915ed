//! The root filesystem as one tar archive on the host, unprivileged: a
//! Debian bootstrap by mmdebstrap (whose tar keeps ownership without root,
//! cached by the hash of everything that shapes it), the user's tarball, or
//! a directory packed with root ownership. The host makes the build's tree
//! from it (image/ext4.rs, `make_tree`).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::image::lock;
use crate::image::recipe::RootSource;
use crate::sandbox::cache;
use crate::sandbox::cache::debs::DebReport;
use crate::sandbox::mmdebstrap::Mmdebstrap;
use crate::util::owned_dir;
use crate::util::process::tie;

/// A root archive, which the host makes the build's tree from
/// (image/ext4.rs, `make_tree`).
pub struct RootTar {
    pub path: PathBuf,
    /// tar's flag for the archive's compression ("" for none): a compressed
    /// archive unpacks to several times its size.
    pub tar_flag: &'static str,
    pub size: u64,
    /// What a bootstrap run now took from the package cache and downloaded
    /// (none for a bootstrap from the cache, or another kind of root).
    pub debs: Option<DebReport>,
    /// Names the archive's contents, for the tree layers' keys.
    pub identity: String,
    /// Names where the root comes from (the recipe's tarball or directory,
    /// or the bootstrap's cache entry), whatever it holds now: the base
    /// tree made from it is kept under this, and replaced when `identity`
    /// changes.
    pub origin: String,
    /// The archive, open: what [`RootTar::pinned`] names.
    file: File,
    /// Holds a cached bootstrap in use while the archive is.
    _use: cache::CacheUse,
}

impl RootTar {
    /// A path to the archive as this kiln opened it, for this kiln and the
    /// programs it runs: the same file to the end of the build, even if a
    /// `--fresh` build replaces the cached bootstrap meanwhile.
    pub fn pinned(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.file.as_raw_fd()
        ))
    }

    /// The archive as a plain tar, for the layer merge: itself, or
    /// decompressed into `work` by the host's own decompressor.
    pub fn plain(&self, work: &Path) -> Result<PathBuf> {
        let program = match self.tar_flag {
            "" => return Ok(self.pinned()),
            "--gzip" => "gzip",
            "--xz" => "xz",
            "--zstd" => "zstd",
            "--bzip2" => "bzip2",
            other => bail!("no decompressor is known for a root archive read with tar {other}"),
        };
        let out = work.join("root-plain.tar");
        let file = File::create(&out).with_context(|| format!("creating {}", out.display()))?;
        // On its stdin: zstd will not read a name that is a symbolic link,
        // as /proc's are.
        let input = File::open(self.pinned()).context("reopening the root archive")?;
        let status = tie(Command::new(program).arg("-dc"))
            .stdin(input)
            .stdout(file)
            .status()
            .with_context(|| {
                format!(
                    "running {program} to decompress the root archive {} (install {program})",
                    self.path.display()
                )
            })?;
        if !status.success() {
            bail!(
                "{program} could not decompress the root archive {} ({status})",
                self.path.display()
            );
        }
        Ok(out)
    }
}

pub fn prepare(
    src: &RootSource,
    epoch: u64,
    work: &Path,
    fresh: bool,
    json: bool,
) -> Result<RootTar> {
    let mut root = match src {
        RootSource::Debian {
            suite,
            variant,
            packages,
            mirror,
            components,
        } => debian(
            suite, variant, packages, mirror, components, epoch, fresh, json,
        )?,
        RootSource::Tarball(p) => tarball(p)?,
        RootSource::Directory(d) => directory(d, epoch, work)?,
    };
    root.origin = match src {
        RootSource::Debian { .. } => format!("bootstrap:{}", root.path.display()),
        RootSource::Tarball(p) => format!("tarball:{}", std::path::absolute(p)?.display()),
        RootSource::Directory(d) => format!("directory:{}", std::path::absolute(d)?.display()),
    };
    Ok(root)
}

/// `identity` names the contents; None: the archive's SHA-256 does.
fn finish(
    path: PathBuf,
    tar_flag: &'static str,
    identity: Option<String>,
    held: cache::CacheUse,
) -> Result<RootTar> {
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata()?.len();
    let identity = match identity {
        Some(i) => i,
        None => {
            let dir = path.parent().unwrap_or(Path::new("."));
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let sum = cache::sha256_of_entry_file(dir, &name)
                .with_context(|| format!("reading {}", path.display()))?;
            format!("sha256:{sum}")
        }
    };
    Ok(RootTar {
        path,
        tar_flag,
        size,
        debs: None,
        identity,
        origin: String::new(),
        file,
        _use: held,
    })
}

/// A bootstrap in the cache is named by its key, and by when it was made:
/// `--fresh` makes it again under the same key, maybe from a mirror that
/// moved, and its layers must not be reused on the new one.
fn bootstrap_identity(key: &str, tar: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(tar).with_context(|| format!("reading {}", tar.display()))?;
    Ok(format!(
        "rootfs:{key}:{}:{}.{}",
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

fn tarball(p: &Path) -> Result<RootTar> {
    let mut magic = [0u8; 6];
    let n = File::open(p)
        .and_then(|mut f| f.read(&mut magic))
        .with_context(|| format!("reading root.tarball {}", p.display()))?;
    let flag = match &magic[..n] {
        [0x1f, 0x8b, ..] => "--gzip",
        [0xfd, b'7', b'z', b'X', b'Z', 0] => "--xz",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "--zstd",
        [b'B', b'Z', b'h', ..] => "--bzip2",
        _ => "",
    };
    finish(p.to_path_buf(), flag, None, cache::CacheUse::none())
}

fn directory(d: &Path, epoch: u64, work: &Path) -> Result<RootTar> {
    let out = work.join("root.tar");
    let status = tie(&mut Command::new("tar"))
        .args([
            "--sort=name",
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--format=gnu",
        ])
        .arg(format!("--mtime=@{epoch}"))
        .arg("--clamp-mtime")
        .arg("-C")
        .arg(d)
        .arg("-cf")
        .arg(&out)
        .arg(".")
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!(
            "packing root.directory {} with tar failed ({status})",
            d.display()
        );
    }
    finish(out, "", None, cache::CacheUse::none())
}

/// mmdebstrap options that shape the tree (part of the cache key).
const MMDEBSTRAP_OPTIONS: &[&str] = &[
    "--format=tar",
    // Locales and documentation stay out of the image.
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-include=/usr/share/locale/locale.alias",
];

/// mmdebstrap hooks (part of the cache key): the initramfs made once,
/// after every package is in, not once per package that asks.
const HOOKS: &[(&str, &str, &str)] = &[
    (
        "--essential-hook",
        "defer-initramfs.sh",
        include_str!("bootstrap-hooks/defer-initramfs.sh"),
    ),
    (
        "--customize-hook",
        "build-initramfs.sh",
        include_str!("bootstrap-hooks/build-initramfs.sh"),
    ),
];

/// The hooks for `variant`: none for `extract`, which runs no hooks, and
/// `custom`, which installs its packages before the essential hook, so
/// that the deferral would only add a run.
fn hooks(variant: &str) -> &'static [(&'static str, &'static str, &'static str)] {
    match variant {
        "extract" | "custom" => &[],
        _ => HOOKS,
    }
}

#[allow(clippy::too_many_arguments)]
fn debian(
    suite: &str,
    variant: &str,
    packages: &[String],
    mirror: &str,
    components: &[String],
    epoch: u64,
    fresh: bool,
    json: bool,
) -> Result<RootTar> {
    let key = cache::hash(&[
        suite.as_bytes(),
        variant.as_bytes(),
        packages.join(",").as_bytes(),
        mirror.as_bytes(),
        components.join(",").as_bytes(),
        epoch.to_string().as_bytes(),
        MMDEBSTRAP_OPTIONS.join(" ").as_bytes(),
        hooks(variant)
            .iter()
            .map(|(option, name, text)| format!("{option}={name}\n{text}"))
            .collect::<String>()
            .as_bytes(),
    ]);
    let dest = cache::root()?.join("rootfs").join(&key[..16]);
    // Held from before it is looked at or built until the archive is done
    // with, so that no gc removes it under the build.
    let held = cache::CacheUse::begin(&dest);
    let staging = match cache::Staging::begin(&dest, fresh, |d| d.join("root.tar").is_file())? {
        cache::Begin::Done(dir) => {
            if !json {
                eprintln!("root: {suite} bootstrap from the cache ({})", dir.display());
            }
            let tar = dir.join("root.tar");
            let identity = bootstrap_identity(&key, &tar)?;
            return finish(tar, "", Some(identity), held);
        }
        cache::Begin::Build(s) => s,
    };
    let mut bootstrap = Mmdebstrap::prepare(
        &[("mmdebstrap", "mmdebstrap")],
        "for root.suite",
        &format!("a root.suite = \"{suite}\" image"),
        owned_dir::ROOTFS,
    )?;
    let cache_root = cache::root()?;
    bootstrap.offer_cached_packages(&cache_root, mirror);
    let tar = std::path::absolute(staging.path().join("root.tar"))?;
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg(bootstrap.mode())
        .arg(format!("--variant={variant}"))
        .args(MMDEBSTRAP_OPTIONS)
        .args(bootstrap.package_cache_options())
        .arg(format!("--components={}", components.join(",")));
    for (option, name, text) in hooks(variant) {
        let mut arg = std::ffi::OsString::from(format!("{option}="));
        arg.push(bootstrap.write_hook(name, text)?);
        cmd.arg(arg);
    }
    if !packages.is_empty() {
        cmd.arg(format!("--include={}", packages.join(",")));
    }
    cmd.arg(suite)
        .arg(&tar)
        .arg(mirror)
        .env("SOURCE_DATE_EPOCH", epoch.to_string());
    bootstrap.run(
        cmd,
        &format!("root: bootstrapping {suite}"),
        "bootstrap.log",
        &cache_root.join("rootfs").join("last-bootstrap.log"),
    )?;
    // An archive whose status cannot be read counts nothing as reused.
    let installed = lock::archive_packages(&tar).unwrap_or_default();
    let report = bootstrap.keep_downloads(&installed);
    if let (Some(r), false) = (&report, json) {
        eprintln!("root: {}", r.summary());
    }
    let dir = staging.commit()?;
    let tar = dir.join("root.tar");
    let identity = bootstrap_identity(&key, &tar)?;
    let mut root = finish(tar, "", Some(identity), held)?;
    root.debs = report;
    Ok(root)
}
