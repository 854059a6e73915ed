//! The ext4 filesystems kiln makes on the host: the build VM's tree, from
//! the root archive, before the VM; and the image's, after it:
//! the tools image's mke2fs writes each one in place into the raw disk,
//! filled from the tar of its tree that the VM left on the trees disk
//! (plan/scripts/archive-tree.sh), or, for the root, from the root
//! archive and the tree's layers merged on the host (layers/merge.rs).
//! Under emulation this was the slowest
//! step in the VM; natively it takes seconds. The result depends only on
//! the tar and the options below, not on the host: the mke2fs is the tools
//! image's, run with its own libraries and configuration
//! (sandbox/host_tools.rs).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::image::layers::merge;
use crate::image::plan::{Ext4Source, HostExt4};
use crate::sandbox::host_tools::HostTools;
use crate::util::process::tie;

/// Makes `fs` in the raw disk `raw`: from its tree's tar on `trees`, or
/// from `layers` (the root archive, then each layer's) merged.
pub fn make(
    tools: &HostTools,
    fs: &HostExt4,
    raw: &Path,
    trees: &Path,
    layers: &[&Path],
    epoch: u64,
) -> Result<()> {
    let p = &fs.part;
    let mut cmd = tools.mke2fs();
    cmd.args(args(fs))
        .arg(raw)
        .arg(format!("{}k", p.size / 1024))
        // mke2fs takes its times from these (superblock, files newer than
        // the epoch), as in the VM.
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string());
    match fs.source {
        Ext4Source::Tree(a) => {
            // mke2fs reads `-d -` from its stdin: the trees disk from where
            // this tar starts. It stops at the tar's end marker.
            let mut file = File::open(trees)
                .with_context(|| format!("opening the trees disk {}", trees.display()))?;
            file.seek(SeekFrom::Start(a.offset))?;
            cmd.stdin(Stdio::from(file));
        }
        Ext4Source::Empty => {
            cmd.stdin(Stdio::null());
        }
        Ext4Source::Layers => return from_layers(&mut cmd, fs, tools.root(), layers),
    }
    let out = tie(&mut cmd)
        .output()
        .with_context(|| started(fs, tools.root()))?;
    check(&out, fs, tools.root())
}

/// Runs mke2fs with the merged layers on its stdin, written as it reads.
fn from_layers(cmd: &mut Command, fs: &HostExt4, tools: &Path, layers: &[&Path]) -> Result<()> {
    let mut child = tie(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| started(fs, tools))?;
    let stdin = child.stdin.take().context("mke2fs's stdin")?;
    // A pipe of 1 MiB (the most an unprivileged process may ask), not
    // 64 KiB: mke2fs reads, and the merge writes, far fewer times.
    let _ = rustix::pipe::fcntl_setpipe_size(&stdin, 1 << 20);
    let out = std::thread::scope(|s| {
        let writer = s.spawn(move || {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, stdin);
            let summary = merge::merge(layers, &mut w)?;
            // Flushed, then closed: mke2fs sees the end of the tar.
            w.into_inner()
                .map_err(|e| anyhow::Error::from(e.into_error()).context("writing to mke2fs"))?;
            anyhow::Ok(summary)
        });
        let out = child.wait_with_output();
        let merged = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the layer merge panicked"));
        (out, merged)
    });
    let (out, merged) = out;
    let out = out.with_context(|| started(fs, tools))?;
    // mke2fs's own failure first: a merge cut short by it is only a symptom.
    check(&out, fs, tools)?;
    merged?.with_context(|| {
        format!(
            "merging the tree's layers for partition {} ({})",
            fs.part.number, fs.part.label
        )
    })?;
    Ok(())
}

fn started(fs: &HostExt4, tools: &Path) -> String {
    format!(
        "starting the tools image's mke2fs (in {}) for partition {}",
        tools.display(),
        fs.part.number
    )
}

/// The build VM's base tree: `tree` made an ext4 filesystem of `size`
/// bytes holding the root archive `root_tar` (plain or compressed:
/// libarchive reads either), which the VM mounts read-only under the
/// layers (layers/base.rs). For the build only: no journal, and ids fixed
/// so that directories list their entries in the same order every build.
/// Times later than `epoch` are clamped to it, as mke2fs does with
/// SOURCE_DATE_EPOCH set.
pub fn make_tree(
    tools: &HostTools,
    root_tar: &Path,
    tree: &Path,
    size: u64,
    epoch: u64,
) -> Result<()> {
    let mut cmd = tools.mke2fs();
    cmd.env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string());
    cmd.args([
        "-q",
        "-F",
        "-t",
        "ext4",
        "-O",
        "^has_journal",
        "-U",
        TREE_UUID,
        "-E",
        &format!("hash_seed={TREE_HASH_SEED},root_owner=0:0,nodiscard,assume_storage_prezeroed=1"),
        "-d",
    ])
    .arg(root_tar)
    .arg(tree)
    .arg(format!("{}k", size / 1024))
    .stdin(Stdio::null());
    let out = tie(&mut cmd).output().with_context(|| {
        format!(
            "starting the tools image's mke2fs (in {})",
            tools.root().display()
        )
    })?;
    if !out.status.success() {
        bail!(
            "making the build's tree from the root archive {} failed ({}): {}\n\
             The archive is read by libarchive (mke2fs -d): it must be a tar, plain or \
             compressed (gzip, xz, zstd, bzip2), that holds each directory before what \
             is in it, as 'tar -C DIR -cf FILE .' writes one.",
            root_tar.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The tree filesystem's UUID and directory hash seed.
const TREE_UUID: &str = "5c4a7c4e-0000-4000-8000-000000000003";
const TREE_HASH_SEED: &str = "5c4a7c4e-0000-4000-8000-000000000004";

/// mke2fs's options for `fs`, before the device and the size. Everything
/// that would otherwise come from the host is fixed: no discard, and the
/// disk file taken as zeroed (it is new and sparse), so inode tables are
/// marked zeroed whatever the host kernel supports.
fn args(fs: &HostExt4) -> Vec<String> {
    let p = &fs.part;
    let mut a = vec![
        "-q".to_string(),
        "-F".to_string(),
        "-t".to_string(),
        "ext4".to_string(),
        "-L".to_string(),
        p.label.clone(),
        "-U".to_string(),
        p.fs_uuid.clone(),
        // As bookworm's own mke2fs.conf has it: the backport's defaults add
        // two features that bookworm's grub and e2fsprogs before 1.47
        // (Ubuntu 22.04's, for one) cannot handle.
        "-O".to_string(),
        "^metadata_csum_seed,^orphan_file".to_string(),
        "-E".to_string(),
        format!(
            "offset={},hash_seed={},root_owner=0:0,nodiscard,assume_storage_prezeroed=1",
            p.start, p.hash_seed
        ),
    ];
    if fs.source != Ext4Source::Empty {
        a.extend(["-d".to_string(), "-".to_string()]);
    }
    a
}

/// What the tools image's mke2fs (unpacked in `tools`) did for `fs`.
fn check(out: &std::process::Output, fs: &HostExt4, tools: &Path) -> Result<()> {
    let p = &fs.part;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    if let Some(short) = shortage(&said).filter(|_| fs.source != Ext4Source::Empty) {
        bail!(
            "partition {} ({}) is too small for its tree: its {} MiB ran out of {short}. \
             Give it a larger size in the recipe.\nmke2fs said: {}",
            p.number,
            p.label,
            p.size >> 20,
            said.trim()
        );
    }
    bail!(
        "making partition {} ({})'s ext4 filesystem failed ({}): {}\n\
         (mke2fs is the tools image's, unpacked in {}; if that copy is \
         damaged, remove it and the next build unpacks it again)",
        p.number,
        p.label,
        out.status,
        said.trim(),
        tools.display()
    );
}

/// What a filesystem ran out of while mke2fs filled it, from what mke2fs
/// said ("Could not allocate block in ext2 filesystem while writing file").
fn shortage(said: &str) -> Option<&'static str> {
    if said.contains("Could not allocate block") {
        Some("space")
    } else if said.contains("Could not allocate inode") {
        Some("inodes (too many files)")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::plan::{PartPlan, TreeArchive};

    fn ext4(archive: Option<TreeArchive>) -> HostExt4 {
        ext4_of(match archive {
            Some(a) => Ext4Source::Tree(a),
            None => Ext4Source::Empty,
        })
    }
    use crate::image::recipe::PartType;

    fn ext4_of(source: Ext4Source) -> HostExt4 {
        HostExt4 {
            part: PartPlan {
                number: 3,
                label: "root".into(),
                kind: PartType::Linux,
                fs: Some(crate::image::recipe::Filesystem::Ext4),
                mount: (source != Ext4Source::Empty).then(|| "/".into()),
                start: 2 << 20,
                size: 64 << 20,
                fs_uuid: "0b6e2c1d-8a5f-4c3e-9d7a-1f2e3d4c5b6a".into(),
                part_guid: String::new(),
                hash_seed: "6c1b0a2f-3e4d-4f5a-8b9c-0d1e2f3a4b5c".into(),
            },
            source,
        }
    }

    #[test]
    fn a_full_filesystem_is_told_apart_from_other_failures() {
        let block = "handle_entry: Could not allocate block in ext2 filesystem while \
                     writing file \"f\"\nmke2fs: Operation not permitted while populating";
        assert_eq!(shortage(block), Some("space"));
        let inode = "handle_entry: Could not allocate inode in ext2 filesystem";
        assert_eq!(shortage(inode), Some("inodes (too many files)"));
        assert_eq!(shortage("error while loading shared libraries"), None);
    }

    #[test]
    fn the_filesystem_goes_at_its_partition_with_fixed_options() {
        let a = args(&ext4(Some(TreeArchive {
            offset: 0,
            room: 1 << 30,
        })));
        let e = a.iter().position(|x| x == "-E").expect("-E");
        assert_eq!(
            a[e + 1],
            "offset=2097152,hash_seed=6c1b0a2f-3e4d-4f5a-8b9c-0d1e2f3a4b5c,root_owner=0:0,\
             nodiscard,assume_storage_prezeroed=1"
        );
        assert_eq!(a[a.len() - 2..], ["-d", "-"]);
        // An empty filesystem reads no tree.
        assert!(!args(&ext4(None)).iter().any(|x| x == "-d"));
    }
}
