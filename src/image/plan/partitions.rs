//! Where each partition goes and what it is called: offsets, sizes and
//! every identifier, decided once on the host from the recipe.

use crate::image::ids::Ids;
use crate::image::recipe::{Checked, Filesystem, PartType, ALIGN};

/// A partition with everything decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartPlan {
    pub number: usize,
    pub label: String,
    pub kind: PartType,
    pub fs: Option<Filesystem>,
    pub mount: Option<String>,
    /// Offset and size in bytes.
    pub start: u64,
    pub size: u64,
    /// As blkid reports it: vfat ids upper case, UUIDs lower case.
    pub fs_uuid: String,
    pub part_guid: String,
    pub hash_seed: String,
}

pub fn plan_partitions(c: &Checked, ids: &Ids) -> Vec<PartPlan> {
    let mut start = ALIGN;
    c.recipe
        .partitions
        .iter()
        .zip(&c.sizes)
        .enumerate()
        .map(|(i, (p, &size))| {
            let name = format!("partition-{}", p.label);
            // fstab and root= must match what blkid reports exactly.
            let fs_uuid = match (&p.uuid, p.filesystem) {
                (Some(u), Some(Filesystem::Vfat)) => u.to_ascii_uppercase(),
                (Some(u), _) => u.to_ascii_lowercase(),
                (None, Some(Filesystem::Vfat)) => ids.vfat_id(&name),
                (None, _) => ids.uuid(&format!("{name}-fs")),
            };
            let plan = PartPlan {
                number: i + 1,
                label: p.label.clone(),
                kind: p.kind,
                fs: p.filesystem,
                mount: p.mount.clone(),
                start,
                size,
                fs_uuid,
                part_guid: ids.uuid(&format!("{name}-guid")),
                hash_seed: ids.uuid(&format!("{name}-hash-seed")),
            };
            start += size;
            plan
        })
        .collect()
}

/// The partition mounted at `/`.
pub fn root_part(parts: &[PartPlan]) -> Option<&PartPlan> {
    parts.iter().find(|p| p.mount.as_deref() == Some("/"))
}
