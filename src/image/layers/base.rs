//! The base of the build's tree: the root archive made an ext4 filesystem
//! on the host (`ext4::make_tree`), which the build VM mounts read-only
//! under the layers. It depends only on the archive and the tools image's
//! mke2fs, so it is cached under their hash (`<cache>/trees/<key>/`) and
//! shared, read-only, by every build on that root.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::image::ext4;
use crate::sandbox::cache::{self, Begin, CacheUse, Staging};
use crate::sandbox::host_tools::HostTools;

const IMAGE: &str = "tree.img";
/// Bumped when the base's options change (`ext4::make_tree`).
const FORMAT: &[u8] = b"kiln-base-tree-1";

/// A base tree in the cache, held while this lives.
pub struct BaseTree {
    pub image: PathBuf,
    /// Whether this build made it (else the cache had it).
    pub made: bool,
    _use: CacheUse,
}

/// The base tree of `root_tar` (plain or compressed, `size` bytes;
/// `identity` names its contents) for `tools` (`tools_sha256`).
pub fn base_tree(
    tools: &HostTools,
    tools_sha256: &str,
    root_tar: &Path,
    identity: &str,
    size: u64,
    compressed: bool,
) -> Result<BaseTree> {
    let key = cache::hash(&[FORMAT, identity.as_bytes(), tools_sha256.as_bytes()]);
    let dest = cache::root()?.join(cache::TREES_KIND).join(&key[..32]);
    let held = CacheUse::begin(&dest);
    let staging = match Staging::begin(&dest, false, |d| cache::complete(d, &[IMAGE]))? {
        Begin::Done(dir) => {
            return Ok(BaseTree {
                image: dir.join(IMAGE),
                made: false,
                _use: held,
            })
        }
        Begin::Build(s) => s,
    };
    let image = staging.path().join(IMAGE);
    let room = room(size, compressed);
    File::create(&image)?.set_len(room)?;
    ext4::make_tree(tools, root_tar, &image, room)?;
    File::open(&image)?.sync_all()?;
    let dir = staging.commit()?;
    Ok(BaseTree {
        image: dir.join(IMAGE),
        made: true,
        _use: held,
    })
}

/// The filesystem's size: the archive's contents with room for ext4's
/// own metadata and small files' blocks. A compressed archive unpacks to
/// several times its size. The image is sparse: only what mke2fs writes
/// takes space.
fn room(size: u64, compressed: bool) -> u64 {
    const MIB: u64 = 1 << 20;
    let contents = if compressed { size * 8 } else { size };
    (contents + contents / 2 + 256 * MIB).div_ceil(MIB) * MIB
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_leaves_space_for_metadata_and_compression() {
        assert_eq!(room(0, false), 256 << 20);
        assert_eq!(room(600 << 20, false), (900 + 256) << 20);
        assert!(room(100 << 20, true) > 800 << 20);
        assert_eq!(room(1, false) % (1 << 20), 0);
    }
}
