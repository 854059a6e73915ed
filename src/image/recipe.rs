//! Image recipes: the TOML format users write (documented key by key in
//! images/README.md), parsed strictly and checked as a whole before any
//! work starts, so a mistake is reported with the file, the key and what
//! is allowed, and nothing is built.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::util::size;

pub const MIB: u64 = 1 << 20;

/// Keys that live at the top of a recipe, before any table.
const TOP_LEVEL_KEYS: &[&str] = &[
    "name",
    "size",
    "table",
    "source_date_epoch",
    "network",
    "commands",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Base name of the outputs (default: the recipe's file name).
    pub name: Option<String>,
    /// Size of the disk image: "4G", "2048M".
    pub size: Option<Size>,
    #[serde(default)]
    pub table: Table,
    /// Seconds since 1970 for every timestamp in the image.
    pub source_date_epoch: Option<u64>,
    #[serde(default, rename = "partition")]
    pub partitions: Vec<Partition>,
    pub root: Root,
    #[serde(default)]
    pub system: System,
    #[serde(default, rename = "user")]
    pub users: Vec<User>,
    #[serde(default, rename = "file")]
    pub files: Vec<FileEntry>,
    /// Whether every command may reach the network (one command can ask
    /// for it alone: `{ run = "...", network = true }`).
    #[serde(default)]
    pub network: bool,
    /// Shell commands run in the image's root (chroot), in order.
    #[serde(default)]
    pub commands: Vec<Command>,
    #[serde(default)]
    pub bootloader: Bootloader,
    #[serde(default)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    #[default]
    Gpt,
    Mbr,
}

/// A size in bytes, written "512M", "4G" (binary units) or "rest".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Bytes(u64),
    Rest,
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_size(&s).map_err(serde::de::Error::custom)
    }
}

pub fn parse_size(s: &str) -> Result<Size, String> {
    let t = s.trim();
    if t == "rest" {
        return Ok(Size::Rest);
    }
    let (n, unit) = size::parse(t).ok_or_else(|| {
        format!(
            "invalid size '{s}': expected a number with K, M, G or T (e.g. 512M, 4G), or \"rest\""
        )
    })?;
    n.checked_mul(unit.bytes())
        .map(Size::Bytes)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// One of the recipe's commands: a string, or a table that also says
/// whether it may reach the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub run: String,
    /// `None`: as the recipe's `network` says.
    pub network: Option<bool>,
}

impl Command {
    /// Whether the command runs with the build VM's network, given the
    /// recipe-wide `network`.
    pub fn uses_network(&self, recipe_network: bool) -> bool {
        self.network.unwrap_or(recipe_network)
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor rather than an untagged enum, so a mistake inside the
        // table is reported as itself (unknown field, wrong type).
        struct V;
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            run: String,
            network: Option<bool>,
        }
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Command;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a command string, or a table { run = \"...\", network = true }")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Command, E> {
                Ok(Command {
                    run: s.to_string(),
                    network: None,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Command, A::Error> {
                let t = Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Command {
                    run: t.run,
                    network: t.network,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartType {
    Esp,
    BiosGrub,
    Linux,
    Swap,
    Data,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    Ext4,
    Vfat,
    Xfs,
    Btrfs,
}

impl Filesystem {
    pub fn name(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Vfat => "vfat",
            Filesystem::Xfs => "xfs",
            Filesystem::Btrfs => "btrfs",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    pub label: String,
    pub size: Size,
    #[serde(rename = "type")]
    pub kind: PartType,
    pub filesystem: Option<Filesystem>,
    /// Where it is mounted in the image ("/", "/boot/efi", "/srv").
    pub mount: Option<String>,
    /// Filesystem UUID (default: derived from the recipe).
    pub uuid: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// Debian suite to bootstrap with mmdebstrap ("bookworm").
    pub suite: Option<String>,
    #[serde(default)]
    pub packages: Vec<String>,
    /// mmdebstrap variant (default "minbase").
    pub variant: Option<String>,
    pub mirror: Option<String>,
    #[serde(default)]
    pub components: Vec<String>,
    /// A tar archive (optionally gzip, xz, zstd or bzip2 compressed).
    pub tarball: Option<PathBuf>,
    /// A directory whose contents become the root (owned by root).
    pub directory: Option<PathBuf>,
}

/// Where the root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    Debian {
        suite: String,
        variant: String,
        packages: Vec<String>,
        mirror: String,
        components: Vec<String>,
    },
    Tarball(PathBuf),
    Directory(PathBuf),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct System {
    pub hostname: Option<String>,
    /// Appended to the kernel command line in grub.cfg.
    pub kernel_cmdline: Option<String>,
    #[serde(default)]
    pub root_ssh_keys: Vec<String>,
    /// Remove baked-in SSH host keys and generate them at first boot
    /// (default true).
    pub ssh_host_keys_at_first_boot: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub uid: Option<u32>,
    #[serde(default)]
    pub groups: Vec<String>,
    pub shell: Option<String>,
    #[serde(default)]
    pub ssh_keys: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Absolute path in the image.
    pub path: String,
    /// The file's text...
    pub content: Option<String>,
    /// ...or a host file, relative to the recipe.
    pub source: Option<PathBuf>,
    /// Octal, e.g. "0644" (default "0644").
    pub mode: Option<String>,
    /// "user:group" as names or numbers (default "root:root").
    pub owner: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootloaderKind {
    GrubEfi,
    GrubBios,
    Both,
    #[default]
    None,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootloader {
    #[serde(default, rename = "type")]
    pub kind: BootloaderKind,
    /// Seconds grub's menu waits (default 1).
    pub timeout: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
    Vmdk,
    Vhdx,
    Vpc,
    Ova,
    Iso,
}

impl Format {
    pub const ALL: &'static [&'static str] = &["raw", "qcow2", "vmdk", "vhdx", "vpc", "ova", "iso"];

    pub fn ext(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhdx => "vhdx",
            Format::Vpc => "vhd",
            Format::Ova => "ova",
            Format::Iso => "iso",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Format::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s))
            .map_err(|_| format!("unknown format '{s}'; allowed: {}", Format::ALL.join(", ")))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Xz,
    Zstd,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    #[serde(default)]
    pub formats: Vec<Format>,
    #[serde(default)]
    pub compress: Compression,
    /// The qcow2 output is an overlay on this image (relative to the recipe).
    pub qcow2_backing: Option<PathBuf>,
}

/// A parsed and checked recipe, with paths resolved against its directory.
#[derive(Debug, Clone)]
pub struct Checked {
    pub file: PathBuf,
    pub name: String,
    pub recipe: Recipe,
    pub root: RootSource,
    /// Partition sizes in bytes, "rest" resolved.
    pub sizes: Vec<u64>,
    pub disk_size: u64,
}

/// Space kept before the first partition and, for GPT, after the last.
pub const ALIGN: u64 = MIB;

/// Largest disk a recipe may ask for: beyond what any output format or
/// host filesystem takes, and far from where the build's size arithmetic
/// (a scratch disk twice as large) would overflow.
pub const MAX_DISK: u64 = 1 << 50;

impl Checked {
    /// Whether any command may reach the network, so the build VM needs one.
    pub fn needs_network(&self) -> bool {
        let all = self.recipe.network;
        self.recipe.commands.iter().any(|c| c.uses_network(all))
    }

    pub fn load(file: &Path) -> Result<Checked> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading recipe {}", file.display()))?;
        Checked::parse(file, text)
    }

    /// Parses and checks `text` as the recipe `file` (which names it in
    /// errors and against whose directory its relative paths resolve).
    pub fn parse(file: &Path, text: String) -> Result<Checked> {
        let recipe: Recipe = toml::from_str(&text).map_err(|e| {
            let msg = e.to_string();
            let top = TOP_LEVEL_KEYS
                .iter()
                .find(|k| msg.contains(&format!("unknown field `{k}`")));
            let hint = match top {
                Some(k) => format!(
                    "\nhint: `{k}` is a top-level key; in TOML it must come before the \
                     first [table] or [[table]] header"
                ),
                None => String::new(),
            };
            anyhow!("{}: {}{hint}", file.display(), msg.trim_end())
        })?;
        let dir = file.parent().unwrap_or(Path::new("."));
        check(file, dir, recipe)
    }

    pub fn formats(&self) -> Vec<Format> {
        if self.recipe.output.formats.is_empty() {
            vec![Format::Raw]
        } else {
            self.recipe.output.formats.clone()
        }
    }
}

fn check(file: &Path, dir: &Path, mut recipe: Recipe) -> Result<Checked> {
    let at = |key: &str, msg: String| anyhow!("{}: {key}: {msg}", file.display());
    let name = match &recipe.name {
        Some(n) => n.clone(),
        None => file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into()),
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || name.starts_with('.')
    {
        bail!(at(
            "name",
            format!("'{name}' may use only letters, digits, '-', '_' and '.'")
        ));
    }

    let resolve = |p: &Path| -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        }
    };
    let r = &recipe.root;
    let root = match (&r.suite, &r.tarball, &r.directory) {
        (Some(suite), None, None) => RootSource::Debian {
            suite: suite.clone(),
            variant: r.variant.clone().unwrap_or_else(|| "minbase".into()),
            packages: r.packages.clone(),
            mirror: r
                .mirror
                .clone()
                .unwrap_or_else(crate::sandbox::tools::mirror),
            components: if r.components.is_empty() {
                vec!["main".into()]
            } else {
                r.components.clone()
            },
        },
        (None, Some(t), None) => {
            let p = resolve(t);
            if !p.is_file() {
                bail!(at(
                    "root.tarball",
                    format!("{} does not exist or is not a file", p.display())
                ));
            }
            RootSource::Tarball(p)
        }
        (None, None, Some(d)) => {
            let p = resolve(d);
            if !p.is_dir() {
                bail!(at(
                    "root.directory",
                    format!("{} does not exist or is not a directory", p.display())
                ));
            }
            RootSource::Directory(p)
        }
        _ => bail!(at(
            "root",
            "give exactly one of suite (with packages), tarball or directory".into()
        )),
    };
    if !matches!(root, RootSource::Debian { .. })
        && (!r.packages.is_empty()
            || r.variant.is_some()
            || r.mirror.is_some()
            || !r.components.is_empty())
    {
        bail!(at(
            "root",
            "packages, variant, mirror and components go only with suite".into()
        ));
    }

    for (i, f) in recipe.files.iter_mut().enumerate() {
        let key = format!("file[{i}]");
        if !f.path.starts_with('/') || f.path.contains("/../") || f.path.ends_with("/..") {
            bail!(at(
                &format!("{key}.path"),
                format!("'{}' must be an absolute path without '..'", f.path)
            ));
        }
        match (&f.content, &f.source) {
            (Some(_), None) => {}
            (None, Some(s)) => {
                let p = resolve(s);
                if !p.is_file() {
                    bail!(at(
                        &format!("{key}.source"),
                        format!("{} does not exist or is not a file", p.display())
                    ));
                }
                f.source = Some(p);
            }
            _ => bail!(at(&key, "give exactly one of content or source".into())),
        }
        if let Some(m) = &f.mode {
            if u32::from_str_radix(m, 8).map_or(true, |m| m > 0o7777) {
                bail!(at(
                    &format!("{key}.mode"),
                    format!("'{m}' is not an octal mode such as \"0644\"")
                ));
            }
        }
        if let Some(o) = &f.owner {
            if !valid_owner(o) {
                bail!(at(
                    &format!("{key}.owner"),
                    format!("'{o}' is not USER:GROUP (names or numbers)")
                ));
            }
        }
    }
    if let Some(b) = &recipe.output.qcow2_backing {
        let p = resolve(b);
        if !p.is_file() {
            bail!(at(
                "output.qcow2_backing",
                format!("{} does not exist", p.display())
            ));
        }
        // qemu-img resolves a relative backing path against the overlay's
        // directory, not ours.
        recipe.output.qcow2_backing = Some(p.canonicalize()?);
    }
    if let Some(h) = &recipe.system.hostname {
        if h.is_empty()
            || h.len() > 63
            || h.starts_with('-')
            || h.ends_with('-')
            || !h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            bail!(at(
                "system.hostname",
                format!("'{h}' is not a host name (letters, digits and '-', at most 63)")
            ));
        }
    }
    if let Some(k) = &recipe.system.kernel_cmdline {
        if k.chars()
            .any(|c| c.is_control() || "\"'$`\\;{}".contains(c))
        {
            bail!(at(
                "system.kernel_cmdline",
                "may not contain quotes, '$', '`', '\\', ';', braces or control characters".into()
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for (i, u) in recipe.users.iter().enumerate() {
        if !valid_name(&u.name) || !seen.insert(u.name.clone()) {
            bail!(at(
                &format!("user[{i}].name"),
                format!("'{}' is not a valid, unique user name", u.name)
            ));
        }
        for g in &u.groups {
            if !valid_name(g) {
                bail!(at(
                    &format!("user[{i}].groups"),
                    format!("'{g}' is not a valid group name")
                ));
            }
        }
    }
    for (i, k) in recipe
        .system
        .root_ssh_keys
        .iter()
        .chain(recipe.users.iter().flat_map(|u| &u.ssh_keys))
        .enumerate()
    {
        if k.contains('\n') || k.split_whitespace().count() < 2 {
            bail!(at(
                "ssh keys",
                format!("key {i} is not one line of the form 'TYPE BASE64 [COMMENT]'")
            ));
        }
    }

    let formats = if recipe.output.formats.is_empty() {
        vec![Format::Raw]
    } else {
        recipe.output.formats.clone()
    };
    let needs_disk = formats.iter().any(|f| *f != Format::Iso);
    let (sizes, disk_size) = if needs_disk {
        check_layout(&recipe, &at)?
    } else {
        (vec![], 0)
    };
    let bl = recipe.bootloader.kind;
    if bl != BootloaderKind::None {
        if !recipe
            .partitions
            .iter()
            .any(|p| p.mount.as_deref() == Some("/"))
        {
            bail!(at(
                "bootloader",
                "grub needs a partition mounted at \"/\"".into()
            ));
        }
        let efi = matches!(bl, BootloaderKind::GrubEfi | BootloaderKind::Both);
        let bios = matches!(bl, BootloaderKind::GrubBios | BootloaderKind::Both);
        if efi
            && !recipe.partitions.iter().any(|p| {
                p.kind == PartType::Esp
                    && p.filesystem == Some(Filesystem::Vfat)
                    && p.mount.is_some()
            })
        {
            bail!(at(
                "bootloader.type",
                "grub-efi needs a partition of type \"esp\" with filesystem \"vfat\" and a \
                 mount (e.g. \"/boot/efi\")"
                    .into()
            ));
        }
        if let Some(i) = recipe.partitions.iter().position(|p| {
            p.mount
                .as_deref()
                .is_some_and(|m| m == "/boot" || m == "/boot/grub")
        }) {
            bail!(at(
                &format!("partition[{i}].mount"),
                "a separate /boot is not supported with a bootloader: keep /boot on the root"
                    .into()
            ));
        }
        if bios
            && recipe.table == Table::Gpt
            && !recipe
                .partitions
                .iter()
                .any(|p| p.kind == PartType::BiosGrub)
        {
            bail!(at(
                "bootloader.type",
                "grub-bios on a gpt table needs a partition of type \"bios_grub\" (1M)".into()
            ));
        }
    }
    Ok(Checked {
        file: file.to_path_buf(),
        name,
        recipe,
        root,
        sizes,
        disk_size,
    })
}

fn check_layout(
    recipe: &Recipe,
    at: &dyn Fn(&str, String) -> anyhow::Error,
) -> Result<(Vec<u64>, u64)> {
    let disk = match recipe.size {
        Some(Size::Bytes(b)) => b,
        Some(Size::Rest) => bail!(at(
            "size",
            "the disk needs a fixed size, e.g. \"4G\"".into()
        )),
        None => bail!(at(
            "size",
            "missing: the disk image's size, e.g. \"4G\"".into()
        )),
    };
    if disk % MIB != 0 || disk < 4 * MIB {
        bail!(at(
            "size",
            "must be a whole number of MiB, at least 4M".into()
        ));
    }
    if disk > MAX_DISK {
        bail!(at("size", "may be at most 1024T".into()));
    }
    if recipe.partitions.is_empty() {
        bail!(at(
            "partition",
            "at least one [[partition]] is needed for a disk image".into()
        ));
    }
    if recipe.table == Table::Mbr && recipe.partitions.len() > 4 {
        bail!(at(
            "partition",
            "an mbr table holds at most 4 partitions here; use table = \"gpt\"".into()
        ));
    }
    let mut labels = BTreeSet::new();
    let mut mounts = BTreeSet::new();
    let mut uuids = BTreeSet::new();
    if recipe.table == Table::Mbr && disk > (u64::from(u32::MAX) + 1) * 512 {
        bail!(at(
            "size",
            "an mbr table addresses at most 2T; use table = \"gpt\"".into()
        ));
    }
    let mut fixed = 0u64;
    let mut rest = None;
    for (i, p) in recipe.partitions.iter().enumerate() {
        let key = |k: &str| format!("partition[{i}].{k}");
        if p.label.is_empty()
            || p.label.len() > 11
            || !p
                .label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
            || !labels.insert(p.label.to_ascii_lowercase())
        {
            bail!(at(
                &key("label"),
                format!(
                    "'{}' must be unique, 1 to 11 letters, digits, '-' or '_' \
                     (11 is what vfat allows)",
                    p.label
                )
            ));
        }
        match p.size {
            Size::Rest if rest.is_some() => {
                bail!(at(
                    &key("size"),
                    "only one partition can be \"rest\"".into()
                ))
            }
            Size::Rest => rest = Some(i),
            Size::Bytes(b) if b == 0 || b % MIB != 0 => {
                bail!(at(&key("size"), "must be a whole number of MiB".into()))
            }
            Size::Bytes(b) => fixed = fixed.saturating_add(b),
        }
        let fs_ok = match p.kind {
            PartType::Esp => p.filesystem == Some(Filesystem::Vfat),
            PartType::BiosGrub | PartType::Swap => p.filesystem.is_none(),
            PartType::Linux | PartType::Data => true,
        };
        if !fs_ok {
            bail!(at(
                &key("filesystem"),
                match p.kind {
                    PartType::Esp => "an esp partition needs filesystem = \"vfat\"".into(),
                    _ => "bios_grub and swap partitions take no filesystem".into(),
                }
            ));
        }
        if p.kind == PartType::BiosGrub && recipe.table == Table::Mbr {
            bail!(at(
                &key("type"),
                "bios_grub partitions exist only on gpt tables".into()
            ));
        }
        if let Some(m) = &p.mount {
            if p.filesystem.is_none() {
                bail!(at(&key("mount"), "a mount point needs a filesystem".into()));
            }
            let bad_part = m
                .split('/')
                .skip(1)
                .any(|c| (c.is_empty() && m != "/") || c == "." || c == "..");
            if !m.starts_with('/')
                || bad_part
                || m.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                bail!(at(
                    &key("mount"),
                    format!(
                        "'{m}' must be a plain absolute path such as \"/\" or \"/boot/efi\" \
                         (no spaces, '.', '..' or '//')"
                    )
                ));
            }
            if !mounts.insert(m.clone()) {
                bail!(at(&key("mount"), format!("'{m}' is used twice")));
            }
        }
        let min_mib = match p.filesystem {
            Some(Filesystem::Btrfs) => 128,
            Some(Filesystem::Xfs) => 300,
            _ => 0,
        };
        if matches!(p.size, Size::Bytes(b) if b < min_mib * MIB) {
            bail!(at(
                &key("size"),
                format!(
                    "{} needs at least {min_mib}M",
                    p.filesystem.map_or("", |f| f.name())
                )
            ));
        }
        if let Some(u) = &p.uuid {
            let ok = match p.filesystem {
                Some(Filesystem::Vfat) => {
                    let b = u.as_bytes();
                    b.len() == 9
                        && b[4] == b'-'
                        && b.iter()
                            .enumerate()
                            .all(|(i, c)| i == 4 || c.is_ascii_hexdigit())
                }
                _ => is_uuid(u),
            };
            if ok && !uuids.insert(u.to_ascii_lowercase()) {
                bail!(at(&key("uuid"), format!("'{u}' is used twice")));
            }
            if !ok {
                bail!(at(
                    &key("uuid"),
                    format!(
                        "'{u}' is not a {}",
                        if p.filesystem == Some(Filesystem::Vfat) {
                            "vfat volume id like \"ABCD-1234\""
                        } else {
                            "UUID like \"0b3d1f8e-...\""
                        }
                    )
                ));
            }
        }
    }
    // 1 MiB before the first partition; GPT keeps its backup at the end.
    let overhead = ALIGN + if recipe.table == Table::Gpt { ALIGN } else { 0 };
    let need = fixed.saturating_add(overhead);
    // Saturating: with a disk near 2^64 bytes, `need + MIB` could wrap and
    // let a "rest" partition of 0 bytes through.
    let least = need.saturating_add(if rest.is_some() { MIB } else { 0 });
    if least > disk {
        bail!(at(
            "partition",
            format!(
                "the partitions need {} MiB (with {} MiB for the partition table) \
                 but size is {} MiB: grow size or shrink the partitions",
                need.div_ceil(MIB) + u64::from(rest.is_some()),
                overhead / MIB,
                disk / MIB
            )
        ));
    }
    let sizes = recipe
        .partitions
        .iter()
        .map(|p| match p.size {
            Size::Bytes(b) => b,
            Size::Rest => disk - need,
        })
        .collect();
    Ok((sizes, disk))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_".contains(c))
}

fn valid_owner(o: &str) -> bool {
    let ok = |s: &str| valid_name(s) || (!s.is_empty() && s.chars().all(|c| c.is_ascii_digit()));
    matches!(o.split_once(':'), Some((u, g)) if ok(u) && ok(g))
}

pub fn is_uuid(u: &str) -> bool {
    let parts: Vec<&str> = u.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Entry point of the fuzz target in `fuzz/` (cargo fuzz), kept here so the
/// unit tests run it on mutated recipes on stable Rust. Any text must be
/// refused with an error, or accepted with a layout `kiln build` can
/// partition as it is; never a panic.
#[cfg_attr(not(test), allow(dead_code))] // Not called by the CLI itself.
pub fn fuzz_check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A directory that does not exist: relative paths in the text resolve
    // to nothing, wherever the fuzzer runs.
    let file = Path::new("/nonexistent/kiln-fuzz/recipe.toml");
    let Ok(c) = Checked::parse(file, text.to_owned()) else {
        return;
    };
    assert!(
        !c.name.is_empty()
            && !c.name.starts_with('.')
            && c.name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)),
        "name {:?}",
        c.name
    );
    if c.formats().iter().all(|f| *f == Format::Iso) {
        return;
    }
    let overhead = ALIGN
        + if c.recipe.table == Table::Gpt {
            ALIGN
        } else {
            0
        };
    let used = c
        .sizes
        .iter()
        .try_fold(overhead, |total, size| total.checked_add(*size));
    assert!(
        c.sizes.len() == c.recipe.partitions.len()
            && c.disk_size % MIB == 0
            && c.disk_size >= 4 * MIB
            && c.disk_size <= MAX_DISK
            && c.sizes.iter().all(|size| *size >= MIB && size % MIB == 0)
            && used.is_some_and(|used| used <= c.disk_size),
        "layout {:?} on a disk of {}",
        c.sizes,
        c.disk_size
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Checked> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("r.toml");
        std::fs::write(&f, text).unwrap();
        Checked::load(&f)
    }

    const GOOD: &str = r#"
size = "64M"
[[partition]]
label = "ESP"
size = "8M"
type = "esp"
filesystem = "vfat"
mount = "/boot/efi"
[[partition]]
label = "root"
size = "rest"
type = "linux"
filesystem = "ext4"
mount = "/"
[root]
suite = "bookworm"
[bootloader]
type = "grub-efi"
"#;

    #[test]
    fn sizes_resolve_with_rest() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.disk_size, 64 * MIB);
        assert_eq!(c.sizes, vec![8 * MIB, 64 * MIB - 8 * MIB - 2 * MIB]);
        assert_eq!(c.name, "r");
        assert_eq!(c.formats(), vec![Format::Raw]);
    }

    #[test]
    fn unknown_key_names_file_key_and_allowed() {
        let e = load(&GOOD.replace("type = \"grub-efi\"", "type = \"grub-efi\"\ncolour = 1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.toml"), "{e}");
        assert!(e.contains("colour"), "{e}");
        assert!(e.contains("timeout"), "lists what is allowed: {e}");
    }

    #[test]
    fn commands_are_strings_or_tables_that_ask_for_the_network() {
        let with = |top: &str| load(&format!("{top}\n{GOOD}"));
        let c = with(r#"commands = ["a", { run = "b", network = true }]"#).unwrap();
        let cmds = &c.recipe.commands;
        assert_eq!((cmds[0].run.as_str(), cmds[0].network), ("a", None));
        assert_eq!((cmds[1].run.as_str(), cmds[1].network), ("b", Some(true)));
        assert!(c.needs_network());
        let c = with(
            r#"network = true
commands = [{ run = "a", network = false }]"#,
        )
        .unwrap();
        assert!(!c.needs_network());
        assert!(with(r#"commands = ["a"]"#).unwrap().recipe.commands[0].uses_network(true));
        for (top, want) in [
            (
                r#"commands = [{ run = "a", net = true }]"#,
                "unknown field `net`",
            ),
            (r#"commands = [{ network = true }]"#, "missing field `run`"),
            (r#"commands = [1]"#, "a command string, or a table"),
            (r#"network = "yes""#, "network"),
        ] {
            let e = with(top).unwrap_err().to_string();
            assert!(e.contains(want), "{top}: {e}");
        }
    }

    #[test]
    fn partitions_too_large_for_the_disk() {
        let e = load(&GOOD.replace("size = \"8M\"", "size = \"100M\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("partition") && e.contains("64 MiB"), "{e}");
    }

    #[test]
    fn missing_input_file() {
        let e = load(&format!(
            "{GOOD}\n[[file]]\npath = \"/etc/x\"\nsource = \"nope.txt\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("file[0].source") && e.contains("nope.txt"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        for (from, to, want) in [
            ("type = \"esp\"", "type = \"efi\"", "esp"),
            ("filesystem = \"ext4\"", "filesystem = \"zfs\"", "btrfs"),
            ("size = \"64M\"", "size = \"64Q\"", "invalid size"),
            ("suite = \"bookworm\"", "", "exactly one of"),
            ("type = \"grub-efi\"", "type = \"grub-bios\"", "bios_grub"),
        ] {
            let e = load(&GOOD.replacen(from, to, 1)).unwrap_err().to_string();
            assert!(e.contains(want), "{from} -> {to}: {e}");
        }
    }

    /// The shipped recipes, changed a few places at a time (bytes, lines,
    /// values swapped for edge cases), through the fuzz target's harness:
    /// the parser and checker must answer every one without panicking.
    #[test]
    fn mutated_shipped_recipes_never_panic() {
        let shipped = [
            include_str!("../../images/debian-bookworm-minimal.toml"),
            include_str!("../../images/debian-bookworm-cloud.toml"),
            include_str!("../../images/virtualbox-appliance.toml"),
            include_str!("../../images/live-iso.toml"),
        ];
        for text in shipped {
            assert!(
                load(text).is_ok(),
                "a shipped recipe checks: {}",
                &text[..60]
            );
        }
        const VALUES: &[&str] = &[
            "\"rest\"",
            "\"0\"",
            "\"1M\"",
            "\"3M\"",
            "\"4M\"",
            "\"2T\"",
            "\"17592186044415M\"",
            "\"16383T\"",
            "\"18446744073709551615\"",
            "18446744073709551615",
            "-1",
            "\"\"",
            "\"/\"",
            "\"..\"",
            "\"esp\"",
            "\"bios_grub\"",
            "\"mbr\"",
            "\"iso\"",
            "[\"iso\"]",
            "\"both\"",
            "\"vfat\"",
            "\"ABCD-1234\"",
            "\"0b3d1f8e-0000-4000-8000-000000000000\"",
            "\"\u{e9}\u{1f600}\"",
            "[]",
            "{}",
        ];
        const BYTES: &[u8] = b"\"'[]{}=.,#\n\\ 0123456789MGTrest-_/";
        let mut x: u64 = 0x5851_f42d_4c95_7f2d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as usize
        };
        for i in 0..2000 {
            let mut lines: Vec<String> = shipped[i % shipped.len()]
                .lines()
                .map(str::to_owned)
                .collect();
            for _ in 0..1 + next() % 4 {
                let at = next() % lines.len();
                match next() % 6 {
                    0 => {
                        lines.remove(at);
                    }
                    1 => {
                        let line = lines[next() % lines.len()].clone();
                        lines.insert(at, line);
                    }
                    2 => {
                        let other = shipped[next() % shipped.len()].lines();
                        let line = other.clone().nth(next() % other.count());
                        lines.insert(at, line.unwrap_or_default().to_owned());
                    }
                    3 | 4 => {
                        if let Some((key, _)) = lines[at].split_once(" = ") {
                            lines[at] = format!("{key} = {}", VALUES[next() % VALUES.len()]);
                        }
                    }
                    _ => {
                        let mut bytes = std::mem::take(&mut lines[at]).into_bytes();
                        let b = BYTES[next() % BYTES.len()];
                        if bytes.is_empty() || next() % 2 == 0 {
                            bytes.insert(next() % (bytes.len() + 1), b);
                        } else {
                            let j = next() % bytes.len();
                            bytes[j] = b;
                        }
                        lines[at] = String::from_utf8_lossy(&bytes).into_owned();
                    }
                }
                if lines.is_empty() {
                    break;
                }
            }
            fuzz_check(lines.join("\n").as_bytes());
        }
    }

    /// A disk near 2^64 bytes whose fixed partitions fill it exactly left
    /// the "rest" partition 0 bytes: the check `need + MIB > disk`
    /// overflowed (a panic in debug builds, accepted in release). Such a
    /// disk is now over MAX_DISK too; `rest_partition_needs_a_mib` checks
    /// the layout rule itself.
    #[test]
    fn rest_partition_on_a_full_huge_disk_is_refused() {
        let text = r#"
size = "17592186044415M"
[[partition]]
label = "a"
size = "17592186044413M"
type = "data"
[[partition]]
label = "b"
size = "rest"
type = "data"
[root]
suite = "bookworm"
"#;
        fuzz_check(text.as_bytes());
        assert!(load(text).is_err());
    }

    #[test]
    fn rest_partition_needs_a_mib() {
        let text = |fixed: &str| {
            format!(
                "size = \"1024T\"\n\
                 [[partition]]\nlabel = \"a\"\nsize = \"{fixed}\"\ntype = \"data\"\n\
                 [[partition]]\nlabel = \"b\"\nsize = \"rest\"\ntype = \"data\"\n\
                 [root]\nsuite = \"bookworm\"\n"
            )
        };
        // 1024T less 2 MiB of GPT overhead leaves nothing for "rest"...
        let e = load(&text("1073741822M")).unwrap_err().to_string();
        assert!(e.contains("partitions need"), "{e}");
        // ...1 MiB less leaves it 1 MiB.
        let c = load(&text("1073741821M")).unwrap();
        assert_eq!(c.sizes[1], MIB);
        assert_eq!(c.disk_size, MAX_DISK);
    }

    #[test]
    fn disk_size_is_bounded() {
        let e = load(&GOOD.replace("size = \"64M\"", "size = \"1025T\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("size") && e.contains("1024T"), "{e}");
    }

    #[test]
    fn size_parsing() {
        assert_eq!(parse_size("4G"), Ok(Size::Bytes(4 << 30)));
        assert_eq!(parse_size("512M"), Ok(Size::Bytes(512 << 20)));
        assert_eq!(parse_size("rest"), Ok(Size::Rest));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
