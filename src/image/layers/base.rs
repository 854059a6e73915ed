//! The base of the build's tree: the root archive made an ext4 filesystem
//! on the host (`ext4::make_tree`), which the build VM mounts read-only
//! under the layers. It depends only on the archive and the tools image's
//! mke2fs, so it is cached (`<cache>/trees/<key>/`) and shared, read-only,
//! by every build on that root. An entry's name is two hashes: of where
//! the root comes from, and of what it holds. A root that changes (a
//! bootstrap made again, an edited directory) gets a new base, and its
//! older ones, as large as the root, leave the cache once no kiln uses
//! them.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::image::ext4;
use crate::sandbox::cache::{self, Begin, CacheUse, Staging};
use crate::sandbox::host_tools::HostTools;

const IMAGE: &str = "tree.img";
/// Bumped when the base's options change (`ext4::make_tree`).
const FORMAT: &[u8] = b"kiln-base-tree-3";

/// A base tree in the cache, held while this lives.
pub struct BaseTree {
    pub image: PathBuf,
    /// Whether this build made it (else the cache had it).
    pub made: bool,
    _use: CacheUse,
}

/// The root archive a base tree is made from.
pub struct Root<'a> {
    pub tar: &'a Path,
    /// Its size in bytes, and whether it is compressed.
    pub size: u64,
    pub compressed: bool,
    /// Names its contents.
    pub identity: &'a str,
    /// Names where it comes from.
    pub origin: &'a str,
    /// Times later than this are clamped to it: the build's epoch.
    pub epoch: u64,
}

/// The base tree of `root` for `tools` (`tools_sha256`).
pub fn base_tree(tools: &HostTools, tools_sha256: &str, root: &Root) -> Result<BaseTree> {
    let origin = cache::hash(&[
        FORMAT,
        root.origin.as_bytes(),
        tools_sha256.as_bytes(),
        &root.epoch.to_le_bytes(),
    ]);
    let contents = cache::hash(&[root.identity.as_bytes()]);
    let prefix = format!("{}-", &origin[..16]);
    let dir = cache::root()?.join(cache::TREES_KIND);
    let dest = dir.join(format!("{prefix}{}", &contents[..16]));
    let held = CacheUse::begin(&dest);
    let staging = match Staging::begin(&dest, false, |d| cache::complete(d, &[IMAGE]))? {
        Begin::Done(entry) => {
            return Ok(BaseTree {
                image: entry.join(IMAGE),
                made: false,
                _use: held,
            })
        }
        Begin::Build(s) => s,
    };
    let image = staging.path().join(IMAGE);
    let room = room(root.size, root.compressed);
    File::create(&image)?.set_len(room)?;
    ext4::make_tree(tools, root.tar, &image, room, root.epoch)?;
    File::open(&image)?.sync_all()?;
    let entry = staging.commit()?;
    // The bases of what this root held before: superseded.
    for old in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let path = old.path();
        let name = old.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && path != entry && path.is_dir() {
            // In use, it stays until a gc or a later build finds it unused.
            let _ = cache::remove_if_unused(cache::TREES_KIND, &path);
        }
    }
    Ok(BaseTree {
        image: entry.join(IMAGE),
        made: true,
        _use: held,
    })
}

/// The filesystem's size: generous, for many small files (a block and an
/// inode each) and for compressed archives, which unpack to many times
/// their size. The image is sparse and taken as zeroed: only what mke2fs
/// writes takes space.
fn room(size: u64, compressed: bool) -> u64 {
    const GIB: u64 = 1 << 30;
    let factor = if compressed { 16 } else { 4 };
    (size.saturating_mul(factor) + 4 * GIB).div_ceil(GIB) * GIB
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_leaves_space_for_metadata_and_compression() {
        assert_eq!(room(0, false), 4 << 30);
        assert_eq!(room(600 << 20, false), 7 << 30);
        assert!(room(100 << 20, true) >= 5 << 30);
        assert_eq!(room(1, false) % (1 << 30), 0);
    }
}
