//! Programs of the tools image run on the host, at native speed, for work
//! that needs no kernel (an ext4 made from a tar). They are the image's own
//! binaries and libraries, started through its own dynamic loader, so what
//! they make does not depend on the host's versions of them.
//!
//! The part of the image they need is unpacked once per image, keyed by
//! the image's SHA-256, into `<cache>/host-tools/<key>/`; a cache that
//! cannot take it (read-only) gets a temporary copy for this kiln instead.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::sandbox::cache::{self, CacheUse};
use crate::sandbox::SandboxError;
use crate::util::ctrl_c;
use crate::util::owned_dir::{self, OwnedDir};
use crate::util::process::{tie, Guarded};
use crate::util::which::which;

/// What is unpacked: the loader and libraries, the C.UTF-8 locale, and
/// each program with the files it reads.
const MEMBERS: &[&str] = &[
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/locale/C.utf8",
    "usr/sbin/mke2fs",
    "etc/mke2fs.conf",
];
const LIBS: &str = "usr/lib/x86_64-linux-gnu";
const LOCALES: &str = "usr/lib/locale";
const LOADER: &str = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
/// Written last: its presence says the unpacking finished. Its name
/// changes with [`MEMBERS`], so an entry unpacked with fewer is redone.
const DONE: &str = "unpacked-2";

/// The unpacked programs, held (cache use, or the temporary copy) while
/// this lives.
pub struct HostTools {
    root: PathBuf,
    _held: Held,
}

/// Kept only to be dropped with the [`HostTools`].
#[allow(dead_code)]
enum Held {
    Cache(CacheUse),
    Temp(OwnedDir),
}

impl HostTools {
    /// The programs of the tools image `image`, whose SHA-256 is `sha256`,
    /// unpacked into the cache unless they are there already.
    pub fn of_image(image: &Path, sha256: &str) -> Result<HostTools> {
        if which("sqfs2tar").is_none() {
            bail!(
                "sqfs2tar not found, needed to run the tools image's mke2fs on the host: \
                 sudo apt-get install squashfs-tools-ng"
            );
        }
        let key = sha256
            .get(..16)
            .filter(|k| k.bytes().all(|b| b.is_ascii_hexdigit()));
        let Some(key) = key else {
            bail!(
                "'{sha256}' is not the SHA-256 of the tools image {}",
                image.display()
            );
        };
        let dest = cache::root()?.join(cache::HOST_TOOLS_KIND).join(key);
        let held = CacheUse::begin(&dest);
        // Complete entries are used as they are, without the build lock: a
        // read-only cache could not take it.
        if dest.join(DONE).is_file() {
            return Ok(HostTools {
                root: dest,
                _held: Held::Cache(held),
            });
        }
        let staging = cache::Staging::begin(&dest, false, |d| d.join(DONE).is_file());
        match staging {
            Ok(cache::Begin::Done(root)) => Ok(HostTools {
                root,
                _held: Held::Cache(held),
            }),
            Ok(cache::Begin::Build(s)) => {
                unpack(image, s.path())?;
                let root = s.commit()?;
                Ok(HostTools {
                    root,
                    _held: Held::Cache(held),
                })
            }
            Err(e) => {
                eprintln!(
                    "kiln: cannot keep the tools image's programs in the cache ({e:#}); \
                     unpacking them for this build only"
                );
                let tmp = OwnedDir::new(owned_dir::TOOLS)
                    .context("creating a directory for the tools image's programs")?;
                unpack(image, tmp.path())?;
                Ok(HostTools {
                    root: tmp.path().to_path_buf(),
                    _held: Held::Temp(tmp),
                })
            }
        }
    }

    /// Where the programs are (for messages).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The tools image's `mke2fs`, with its configuration and no other
    /// environment (E2FSPROGS_* and MKE2FS_* would change what it makes).
    pub fn mke2fs(&self) -> Command {
        let mut cmd = self.program("usr/sbin/mke2fs");
        cmd.env("MKE2FS_CONFIG", self.root.join("etc/mke2fs.conf"));
        cmd
    }

    /// `program` (a path in the image) run by the image's loader, with the
    /// image's libraries only: the host's cache of library paths is not
    /// read, and no library path of the host's is searched first. The
    /// locale is the image's C.UTF-8: libarchive refuses a pax archive's
    /// UTF-8 names (mmdebstrap's, GNU tar's) in the C locale.
    fn program(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.root.join(LOADER));
        cmd.arg("--inhibit-cache")
            .arg("--library-path")
            .arg(self.root.join(LIBS))
            .arg(self.root.join(program))
            .env_clear()
            .env("LC_ALL", "C.UTF-8")
            .env("LOCPATH", self.root.join(LOCALES))
            .env("TZ", "UTC");
        cmd
    }
}

/// Unpacks [`MEMBERS`] of `image` into `dir` (`sqfs2tar | tar -x`).
fn unpack(image: &Path, dir: &Path) -> Result<()> {
    // Its messages go to a file: a pipe nobody reads until tar is done
    // could fill and stop it.
    let mut said_file = tempfile::tempfile().context("creating a temporary file")?;
    let mut list = Command::new("sqfs2tar");
    list.arg(image)
        .stdout(Stdio::piped())
        .stderr(said_file.try_clone()?);
    let mut list = Guarded::new(
        tie(&mut list)
            .spawn()
            .context("starting sqfs2tar to unpack the tools image's programs")?,
    );
    let stream = list.child.stdout.take().context("sqfs2tar's output")?;
    let mut extract = Command::new("tar");
    extract
        .arg("-x")
        .arg("-C")
        .arg(dir)
        .arg("--no-same-owner")
        .args(MEMBERS)
        .stdin(stream);
    let extracted = tie(&mut extract)
        .output()
        .context("starting tar to unpack the tools image's programs")?;
    let listed = list.wait().context("waiting for sqfs2tar")?;
    if ctrl_c::requested() {
        bail!(SandboxError::Interrupted);
    }
    // tar first: when it fails (a full disk), sqfs2tar dies on the closed
    // pipe, and its failure says nothing of why.
    if !extracted.status.success() {
        bail!(
            "unpacking the tools image's programs into {} failed ({}): {}",
            dir.display(),
            extracted.status,
            String::from_utf8_lossy(&extracted.stderr).trim()
        );
    }
    let mut said = String::new();
    said_file.seek(SeekFrom::Start(0))?;
    let _ = said_file.read_to_string(&mut said);
    if !listed.success() {
        bail!(
            "sqfs2tar failed on the tools image {} ({listed}): {}; if the image is \
             damaged, 'kiln tools build --force' makes it again",
            image.display(),
            said.trim()
        );
    }
    std::fs::write(dir.join(DONE), b"")
        .with_context(|| format!("writing {}", dir.join(DONE).display()))?;
    Ok(())
}
