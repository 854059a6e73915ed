//! Identifiers an image needs that would otherwise be random (disk and
//! partition GUIDs, filesystem UUIDs, hash seeds, the vfat volume id),
//! derived from the recipe so that the same recipe gives the same image.
//!
//! They come from the recipe's name and disk layout only, not from its
//! whole text: a recipe that differs in a command, a file or a user keeps
//! its disk's identifiers, so its fstab, GPT and boot files stay as they
//! were (what lets a step's result be reused, and keeps a qcow2 delta
//! against the previous image small).

use sha2::{Digest, Sha256};

use crate::image::recipe::{Checked, PartType, RootSource, Table};

/// Derives identifiers from a seed.
pub struct Ids {
    seed: Vec<u8>,
}

impl Ids {
    pub fn new(seed: &[u8]) -> Ids {
        Ids {
            seed: seed.to_vec(),
        }
    }

    /// The identifiers of `c`'s disk: seeded by its name, partition table,
    /// disk size and partitions (label, size, type, filesystem, mount
    /// point, a UUID the recipe gives).
    pub fn for_recipe(c: &Checked) -> Ids {
        Ids::new(layout_seed(c).as_bytes())
    }

    fn bytes(&self, what: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"kiln-ids-v1\0");
        h.update(&self.seed);
        h.update(b"\0");
        h.update(what.as_bytes());
        h.finalize().into()
    }

    /// A random-looking (version 4, RFC 4122 variant) UUID named `what`.
    pub fn uuid(&self, what: &str) -> String {
        let mut b = self.bytes(what);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h = hex::encode(&b[..16]);
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    /// A vfat volume id: "ABCD-1234".
    pub fn vfat_id(&self, what: &str) -> String {
        let h = hex::encode_upper(&self.bytes(what)[..4]);
        format!("{}-{}", &h[..4], &h[4..])
    }

    /// A 32-bit MBR disk identifier.
    pub fn mbr_id(&self) -> String {
        format!("0x{}", hex::encode(&self.bytes("mbr-disk-id")[..4]))
    }
}

/// The canonical text of what [`Ids::for_recipe`] goes by, one field per
/// line so that no two layouts run together.
fn layout_seed(c: &Checked) -> String {
    let table = match c.recipe.table {
        Table::Gpt => "gpt",
        Table::Mbr => "mbr",
    };
    let mut seed = format!("name={}\ntable={table}\ndisk={}\n", c.name, c.disk_size);
    // Each field spelled out (not Debug output, which a renamed variant
    // would change), strings with their lengths so none runs into the next.
    let text = |s: Option<&str>| s.map_or("-".to_string(), |s| format!("{}:{s}", s.len()));
    for (p, size) in c.recipe.partitions.iter().zip(&c.sizes) {
        let kind = match p.kind {
            PartType::Esp => "esp",
            PartType::BiosGrub => "bios_grub",
            PartType::Linux => "linux",
            PartType::Swap => "swap",
            PartType::Data => "data",
        };
        seed.push_str(&format!(
            "partition={} {size} {kind} {} {} {}\n",
            text(Some(&p.label)),
            p.filesystem.map_or("-", |f| f.name()),
            text(p.mount.as_deref()),
            text(p.uuid.as_deref())
        ));
    }
    seed
}

/// The date a recipe without `source_date_epoch` is clamped to, when the
/// environment gives no `SOURCE_DATE_EPOCH`: in 2020-2025, picked by the
/// recipe's name and what its root is made from, so that editing a step
/// does not move every file's time.
pub fn fallback_epoch(c: &Checked) -> u64 {
    let root = match &c.root {
        RootSource::Debian {
            suite,
            variant,
            packages,
            mirror,
            components,
        } => format!(
            "debian {suite} {variant} {mirror} {} {}",
            components.join(","),
            packages.join(",")
        ),
        RootSource::Tarball(p) => format!("tarball {}", p.display()),
        RootSource::Directory(d) => format!("directory {}", d.display()),
    };
    let h = Ids::new(format!("name={}\nroot={root}\n", c.name).as_bytes()).bytes("epoch");
    let n = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
    1_577_836_800 + n % (5 * 365 * 86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_distinct_and_well_formed() {
        let a = Ids::new(b"recipe");
        assert_eq!(a.uuid("root"), Ids::new(b"recipe").uuid("root"));
        assert_ne!(a.uuid("root"), a.uuid("esp"));
        assert_ne!(a.uuid("root"), Ids::new(b"other").uuid("root"));
        let u = a.uuid("root");
        assert!(crate::image::recipe::is_uuid(&u), "{u}");
        assert_eq!(&u[14..15], "4");
        assert!("89ab".contains(&u[19..20]));
        let v = a.vfat_id("esp");
        assert_eq!(v.len(), 9);
        assert_eq!(&v[4..5], "-");
        assert_eq!(a.mbr_id().len(), 10);
    }

    fn recipe(text: &str) -> Checked {
        Checked::parse(
            std::path::Path::new("/nonexistent/seed.toml"),
            text.to_string(),
        )
        .expect("recipe")
    }

    const BASE: &str = r#"
size = "64M"
[root]
suite = "bookworm"
[[partition]]
label = "root"
size = "rest"
type = "linux"
filesystem = "ext4"
mount = "/"
"#;

    #[test]
    fn steps_and_files_keep_the_disk_ids_and_the_date_but_the_layout_does_not() {
        let base = recipe(BASE);
        let id = |c: &Checked| Ids::for_recipe(c).uuid("root");
        let edited = recipe(&format!(
            "commands = [\"true\"]\n{BASE}\n[[file]]\npath = \"/etc/x\"\ncontent = \"x\"\n"
        ));
        assert_eq!(id(&base), id(&edited));
        assert_eq!(fallback_epoch(&base), fallback_epoch(&edited));
        let epoch = fallback_epoch(&base);
        assert!((1_577_836_800..1_577_836_800 + 5 * 365 * 86_400).contains(&epoch));

        let bigger = recipe(&BASE.replace("64M", "128M"));
        assert_ne!(id(&base), id(&bigger));
        let relabelled = recipe(&BASE.replace("label = \"root\"", "label = \"rootfs\""));
        assert_ne!(id(&base), id(&relabelled));
        let named = recipe(&format!("name = \"other\"\n{BASE}"));
        assert_ne!(id(&base), id(&named));
        assert_ne!(fallback_epoch(&base), fallback_epoch(&named));
        let more = recipe(&BASE.replace(
            "suite = \"bookworm\"",
            "suite = \"bookworm\"\npackages = [\"less\"]",
        ));
        assert_eq!(id(&base), id(&more));
        assert_ne!(fallback_epoch(&base), fallback_epoch(&more));
    }
}
