//! The build's plan: the steps that run in the build VM, as root, with the
//! tools image's userland. A step installs files rendered on the host
//! ([`render`]) and runs shell scripts kept as files in `scripts/`
//! (shellchecked in CI), each given its parameters as arguments and
//! environment variables, never in its text, so nothing is ever quoted.
//!
//! Everything that varies between two builds of one recipe (UUIDs, seeds,
//! times) is fixed here from the recipe, so the steps are deterministic;
//! filesystems are populated offline (mtools, `mkfs.btrfs --rootdir`, and
//! on the host `mke2fs -d` from a tar the VM writes: [`HostExt4`]) from a
//! tree on a scratch disk, in a fixed order, never by a kernel mount whose
//! allocation depends on timing.

mod partitions;
pub mod render;

use anyhow::{bail, Result};

use crate::image::ids::Ids;
use crate::image::recipe::{BootloaderKind, Checked, Filesystem, Format, PartType, Table, MIB};

use partitions::root_part;
pub use partitions::{plan_partitions, PartPlan};

/// virtio-blk serials of the build VM's disks.
pub const TARGET_SERIAL: &str = "kiln-target";
pub const TREE_SERIAL: &str = "kiln-tree";
pub const SCRATCH_SERIAL: &str = "kiln-scratch";
pub const ISO_SERIAL: &str = "kiln-iso";
pub const TREES_SERIAL: &str = "kiln-trees";
pub const LAYERS_SERIAL: &str = "kiln-layers";
/// The tree being made into the image, in the build VM (`R` in common.sh).
pub const TREE: &str = "/build/root";

/// What the build VM's disk with `serial` holds, for a person looking.
pub fn disk_purpose(serial: &str) -> &'static str {
    match serial {
        TARGET_SERIAL => "the image being built",
        TREE_SERIAL => {
            "the base tree (ext4 the host made from the root archive), read-only at /build/base, \
             under the layers in /build/layers and the upper directory /build/upper, \
             stacked at /build/root"
        }
        LAYERS_SERIAL => "the layers' archives, reused ones and new ones, for the host",
        SCRATCH_SERIAL => "scratch, mounted at /build: the tree's copies",
        ISO_SERIAL => "where the live iso is written",
        TREES_SERIAL => "the ext4 partitions' trees, as tars for the host's mke2fs",
        _ => "",
    }
}
/// Where host files for `[[file]]` entries are put in the guest.
const FILES_DIR: &str = "/run/kiln-files";
/// Where the step scripts are put in the guest.
const SCRIPTS_DIR: &str = "/run/kiln-steps";
/// Where the files rendered for the steps are put in the guest.
const PLAN_DIR: &str = "/run/kiln-plan";
/// The line the iso step prints with the iso's size.
pub const ISO_SIZE_MARK: &str = "KILN_ISO_SIZE=";
/// The line the normalize step prints with the kernel the tree boots.
pub const KERNEL_MARK: &str = "KILN_KERNEL=";
/// The line a layer step prints with its layer's place on the layers disk:
/// "OFFSET SIZE", in bytes.
pub const LAYER_MARK: &str = "KILN_LAYER=";
/// The same for the layer the output steps make over the finished tree.
pub const ROOT_LAYER_MARK: &str = "KILN_ROOT_LAYER=";

/// Modules every grub image kiln makes needs for its menu and a kernel.
const GRUB_MENU_MODULES: &str = "normal configfile linux echo test gzio serial terminal";

/// The step scripts, embedded in kiln.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// Sourced by all the others.
    Common,
    MountRoot,
    Configure,
    Chroot,
    AuthorizedKeys,
    InstallFile,
    FirstBoot,
    Command,
    Normalize,
    LiveIso,
    Partition,
    Bootloader,
    Carve,
    MakeFs,
    ArchiveTree,
    GrubBios,
    SealLayer,
    RootLayer,
}

impl Script {
    pub const ALL: [Script; 18] = [
        Script::Common,
        Script::MountRoot,
        Script::Configure,
        Script::Chroot,
        Script::AuthorizedKeys,
        Script::InstallFile,
        Script::FirstBoot,
        Script::Command,
        Script::Normalize,
        Script::LiveIso,
        Script::Partition,
        Script::Bootloader,
        Script::Carve,
        Script::MakeFs,
        Script::ArchiveTree,
        Script::GrubBios,
        Script::SealLayer,
        Script::RootLayer,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            Script::Common => "common.sh",
            Script::MountRoot => "mount-root.sh",
            Script::Configure => "configure.sh",
            Script::Chroot => "chroot.sh",
            Script::AuthorizedKeys => "authorized-keys.sh",
            Script::InstallFile => "install-file.sh",
            Script::FirstBoot => "first-boot.sh",
            Script::Command => "command.sh",
            Script::Normalize => "normalize.sh",
            Script::LiveIso => "live-iso.sh",
            Script::Partition => "partition.sh",
            Script::Bootloader => "bootloader.sh",
            Script::Carve => "carve.sh",
            Script::MakeFs => "make-fs.sh",
            Script::ArchiveTree => "archive-tree.sh",
            Script::GrubBios => "grub-bios.sh",
            Script::SealLayer => "seal-layer.sh",
            Script::RootLayer => "root-layer.sh",
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Script::Common => include_str!("scripts/common.sh"),
            Script::MountRoot => include_str!("scripts/mount-root.sh"),
            Script::Configure => include_str!("scripts/configure.sh"),
            Script::Chroot => include_str!("scripts/chroot.sh"),
            Script::AuthorizedKeys => include_str!("scripts/authorized-keys.sh"),
            Script::InstallFile => include_str!("scripts/install-file.sh"),
            Script::FirstBoot => include_str!("scripts/first-boot.sh"),
            Script::Command => include_str!("scripts/command.sh"),
            Script::Normalize => include_str!("scripts/normalize.sh"),
            Script::LiveIso => include_str!("scripts/live-iso.sh"),
            Script::Partition => include_str!("scripts/partition.sh"),
            Script::Bootloader => include_str!("scripts/bootloader.sh"),
            Script::Carve => include_str!("scripts/carve.sh"),
            Script::MakeFs => include_str!("scripts/make-fs.sh"),
            Script::ArchiveTree => include_str!("scripts/archive-tree.sh"),
            Script::GrubBios => include_str!("scripts/grub-bios.sh"),
            Script::SealLayer => include_str!("scripts/seal-layer.sh"),
            Script::RootLayer => include_str!("scripts/root-layer.sh"),
        }
    }

    /// Where the script is in the guest.
    pub fn guest_path(self) -> String {
        format!("{SCRIPTS_DIR}/{}", self.file_name())
    }
}

/// One script run: `bash SCRIPT ARGS...` with `env` added to the plan's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub script: Script,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Run {
    fn new(script: Script) -> Run {
        Run {
            script,
            args: vec![],
            env: vec![],
        }
    }

    fn arg(mut self, a: impl Into<String>) -> Run {
        self.args.push(a.into());
        self
    }

    fn env(mut self, k: &str, v: impl Into<String>) -> Run {
        self.env.push((k.to_string(), v.into()));
        self
    }

    pub fn argv(&self) -> Vec<String> {
        let mut argv = vec!["bash".to_string(), self.script.guest_path()];
        argv.extend(self.args.iter().cloned());
        argv
    }
}

/// A file rendered for a step, put at `PLAN_DIR/name` before it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    pub name: String,
    pub contents: Vec<u8>,
}

impl GuestFile {
    fn new(name: &str, contents: impl Into<Vec<u8>>) -> GuestFile {
        GuestFile {
            name: name.to_string(),
            contents: contents.into(),
        }
    }

    pub fn guest_path(&self) -> String {
        format!("{PLAN_DIR}/{}", self.name)
    }
}

/// A named step: its files, then its runs, in order; it fails at the
/// first run that does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub files: Vec<GuestFile>,
    pub runs: Vec<Run>,
}

impl Step {
    fn new(name: &str) -> Step {
        Step {
            name: name.to_string(),
            files: vec![],
            runs: vec![],
        }
    }

    fn file(mut self, f: GuestFile) -> Step {
        self.files.push(f);
        self
    }

    fn run(mut self, r: Run) -> Step {
        self.runs.push(r);
        self
    }

    /// Everything the step is, for its layer's key: its name, its files,
    /// and each run's script text, arguments and environment; each list
    /// counted, so that no two steps run together the same.
    pub fn fingerprint(&self) -> Vec<u8> {
        let mut f = Vec::new();
        let mut put = |b: &[u8]| {
            f.extend_from_slice(&(b.len() as u64).to_le_bytes());
            f.extend_from_slice(b);
        };
        put(self.name.as_bytes());
        put(&self.files.len().to_le_bytes());
        for file in &self.files {
            put(file.name.as_bytes());
            put(&file.contents);
        }
        put(&self.runs.len().to_le_bytes());
        for run in &self.runs {
            put(run.script.file_name().as_bytes());
            put(run.script.text().as_bytes());
            put(&run.args.len().to_le_bytes());
            for a in &run.args {
                put(a.as_bytes());
            }
            put(&run.env.len().to_le_bytes());
            for (k, v) in &run.env {
                put(k.as_bytes());
                put(v.as_bytes());
            }
        }
        f
    }

    /// Whether a run of the step has the network (a recipe command that
    /// asked for it).
    pub fn has_network(&self) -> bool {
        self.runs
            .iter()
            .any(|r| r.env.iter().any(|(k, v)| k == "KILN_NETWORK" && v == "1"))
    }
}

/// Where a layer's archive is on the layers disk, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpan {
    pub offset: u64,
    pub size: u64,
}

impl LayerSpan {
    /// Parses a layer mark's value: "OFFSET SIZE".
    pub fn parse(v: &str) -> Option<LayerSpan> {
        let (o, s) = v.trim().split_once(' ')?;
        Some(LayerSpan {
            offset: o.parse().ok()?,
            size: s.parse().ok()?,
        })
    }
}

/// The file name a `[[file]]` entry's content has in the guest.
pub fn file_slot(i: usize) -> String {
    format!("{FILES_DIR}/{i}")
}

/// An ext4 filesystem the host makes in the image after the build VM,
/// with the tools image's mke2fs, from the tar of its tree the VM wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostExt4 {
    pub part: PartPlan,
    pub source: Ext4Source,
}

/// What fills an ext4 filesystem the host makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ext4Source {
    /// Nothing: a partition with no mount point.
    Empty,
    /// Its tree's tar at this place on the trees disk (a partition
    /// mounted below /, cut out of the tree).
    Tree(TreeArchive),
    /// The tree's base and layers, merged on the host (the root).
    Layers,
}

/// A region of the trees disk, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeArchive {
    pub offset: u64,
    pub room: u64,
}

/// Room for a tree's tar beyond twice its partition's size, for tar's
/// headers (a pax entry takes 1.5 KiB where an ext4 inode takes 256 bytes,
/// so many tiny files make a tar larger than the filesystem). The trees
/// disk is sparse: room costs nothing until written. A tree that does not
/// fit fails, in archive-tree.sh (the room is full) or in mke2fs (the
/// filesystem is). Not covered: large sparse files, which tar writes whole.
const ARCHIVE_SLACK: u64 = 256 * MIB;

pub struct Inputs<'a> {
    pub recipe: &'a Checked,
    pub epoch: u64,
    pub parts: &'a [PartPlan],
    pub formats: &'a [Format],
    /// Names the iso (its GPT disk GUID and the file grub looks for).
    pub iso_id: &'a str,
}

impl Inputs<'_> {
    /// What every run gets in its environment.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("KILN_EPOCH", self.epoch.to_string()),
            ("KILN_PLAN", PLAN_DIR.to_string()),
            ("KILN_TARGET_SERIAL", TARGET_SERIAL.to_string()),
            ("KILN_TREE_SERIAL", TREE_SERIAL.to_string()),
            ("KILN_SCRATCH_SERIAL", SCRATCH_SERIAL.to_string()),
            ("KILN_ISO_SERIAL", ISO_SERIAL.to_string()),
            ("KILN_TREES_SERIAL", TREES_SERIAL.to_string()),
            ("KILN_LAYERS_SERIAL", LAYERS_SERIAL.to_string()),
            ("KILN_LAYER_MARK", LAYER_MARK.to_string()),
            ("KILN_ROOT_LAYER_MARK", ROOT_LAYER_MARK.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The ext4 filesystems the host makes, in partition order, each tree's
    /// tar at its own place on the trees disk.
    pub fn host_ext4(&self) -> Vec<HostExt4> {
        if !self.formats.iter().any(|f| *f != Format::Iso) {
            return vec![];
        }
        let mut offset = 0;
        self.parts
            .iter()
            .filter(|p| p.fs == Some(Filesystem::Ext4))
            .map(|p| {
                let source = match p.mount.as_deref() {
                    None => Ext4Source::Empty,
                    Some("/") => Ext4Source::Layers,
                    Some(_) => {
                        let room = (2 * p.size + ARCHIVE_SLACK).div_ceil(MIB) * MIB;
                        let a = TreeArchive { offset, room };
                        offset += room;
                        Ext4Source::Tree(a)
                    }
                };
                HostExt4 {
                    part: p.clone(),
                    source,
                }
            })
            .collect()
    }

    /// The size of the trees disk: none is needed at 0.
    pub fn trees_disk_size(&self) -> u64 {
        self.host_ext4()
            .iter()
            .filter_map(|e| match e.source {
                Ext4Source::Tree(a) => Some(a.offset + a.room),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// The step that mounts the tree: its base, with the layers kiln
    /// reused (`reused`, oldest first, on the layers disk) over it; the
    /// layers disk is free from byte `next`.
    pub fn mount_root(&self, reused: &[LayerSpan], next: u64) -> Step {
        let layers: Vec<String> = reused
            .iter()
            .map(|l| format!("{}:{}", l.offset, l.size))
            .collect();
        Step::new("mount root").run(
            Run::new(Script::MountRoot)
                .env("KILN_LAYERS", layers.join(" "))
                .env("KILN_LAYERS_NEXT", next.to_string()),
        )
    }

    /// The steps that make the tree, each a layer of it: configure, the
    /// recipe's commands, normalize. Each ends by archiving what it
    /// changed ([`LAYER_MARK`]). The last prints [`KERNEL_MARK`] and the
    /// kernel the tree boots, which [`Inputs::output_steps`] needs.
    pub fn tree_steps(&self) -> Vec<Step> {
        let c = self.recipe;
        let mut steps = vec![self.configure()];
        for (i, cmd) in c.recipe.commands.iter().enumerate() {
            let network = if cmd.uses_network(c.recipe.network) {
                "1"
            } else {
                "0"
            };
            steps.push(
                Step::new(&format!("command {}", i + 1)).run(
                    Run::new(Script::Command)
                        .env("KILN_COMMAND", cmd.run.as_str())
                        .env("KILN_NETWORK", network),
                ),
            );
        }
        steps.push(
            Step::new("normalize")
                .run(Run::new(Script::Normalize).env("KILN_KERNEL_MARK", KERNEL_MARK)),
        );
        steps
            .into_iter()
            .map(|s| s.run(Run::new(Script::SealLayer)))
            .collect()
    }

    fn configure(&self) -> Step {
        let r = &self.recipe.recipe;
        let mut step = Step::new("configure");
        if let Some(h) = &r.system.hostname {
            step = step
                .file(GuestFile::new("hostname", render::hostname(h)))
                .file(GuestFile::new("hosts", render::hosts(h)));
        }
        let mut base = Run::new(Script::Configure);
        if !self.parts.is_empty() {
            step = step.file(GuestFile::new("fstab", render::fstab(self.parts)));
            for m in self.parts.iter().filter_map(|p| p.mount.as_deref()) {
                if m != "/" {
                    base = base.arg(m);
                }
            }
        }
        step = step.run(base);
        let keys = |step: Step, home: &str, owner: &str, keys: &[String]| {
            let file = GuestFile::new(&format!("keys-{owner}"), render::authorized_keys(keys));
            let path = file.guest_path();
            step.file(file).run(
                Run::new(Script::AuthorizedKeys)
                    .arg(home)
                    .arg(owner)
                    .arg(path),
            )
        };
        for u in &r.users {
            let mut add = Run::new(Script::Chroot).arg("useradd").arg("--create-home");
            if let Some(uid) = u.uid {
                add = add.arg("--uid").arg(uid.to_string());
            }
            add = add
                .arg("--shell")
                .arg(u.shell.as_deref().unwrap_or("/bin/bash"));
            if !u.groups.is_empty() {
                add = add.arg("--groups").arg(u.groups.join(","));
            }
            step = step.run(add.arg(u.name.as_str()));
            if !u.ssh_keys.is_empty() {
                step = keys(step, &format!("/home/{}", u.name), &u.name, &u.ssh_keys);
            }
        }
        if !r.system.root_ssh_keys.is_empty() {
            step = keys(step, "/root", "root", &r.system.root_ssh_keys);
        }
        for (i, f) in r.files.iter().enumerate() {
            step = step.run(
                Run::new(Script::InstallFile)
                    .arg(file_slot(i))
                    .arg(f.path.as_str())
                    .arg(f.mode.as_deref().unwrap_or("0644"))
                    .arg(f.owner.as_deref().unwrap_or("root:root")),
            );
        }
        let first_boot_keys = r.system.ssh_host_keys_at_first_boot.unwrap_or(true);
        step.run(Run::new(Script::FirstBoot).env(
            "KILN_SSH_HOST_KEYS_AT_FIRST_BOOT",
            if first_boot_keys { "1" } else { "0" },
        ))
    }

    /// The steps that make the outputs from the finished tree, given the
    /// kernel it boots (`vmlinuz-VERSION` in its /boot), if it has one.
    pub fn output_steps(&self, kernel: Option<&str>) -> Result<Vec<Step>> {
        let c = self.recipe;
        let kind = c.recipe.bootloader.kind;
        let mut steps = Vec::new();
        if self.formats.contains(&Format::Iso) {
            steps.push(self.live_iso(kernel));
        }
        if !self.formats.iter().any(|f| *f != Format::Iso) {
            return Ok(steps);
        }
        steps.push(self.partition());
        if kind != BootloaderKind::None {
            steps.push(self.bootloader(kernel)?);
        }
        steps.push(self.filesystems()?);
        if matches!(kind, BootloaderKind::GrubBios | BootloaderKind::Both) {
            steps.push(Step::new("grub-bios").run(Run::new(Script::GrubBios)));
        }
        Ok(steps)
    }

    fn cmdline(&self) -> &str {
        self.recipe
            .recipe
            .system
            .kernel_cmdline
            .as_deref()
            .unwrap_or_default()
    }

    fn timeout(&self) -> u32 {
        self.recipe.recipe.bootloader.timeout.unwrap_or(1)
    }

    fn live_iso(&self, kernel: Option<&str>) -> Step {
        let label: String = self
            .recipe
            .name
            .to_ascii_uppercase()
            .chars()
            .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' })
            .take(32)
            .collect();
        let marker = format!("/.kiln-{}", self.iso_id.replace('-', ""));
        let serial = self.cmdline().contains("console=ttyS");
        let mut run = Run::new(Script::LiveIso)
            .env("KILN_ISO_LABEL", label.as_str())
            .env("KILN_ISO_ID", self.iso_id)
            .env("KILN_ISO_MARKER", marker.as_str())
            .env("KILN_ISO_SIZE_MARK", ISO_SIZE_MARK)
            .env(
                "KILN_GRUB_MODULES",
                format!(
                    "iso9660 part_gpt part_msdos fat search search_fs_file {GRUB_MENU_MODULES}"
                ),
            );
        if let Some(k) = kernel {
            run = run.env("KILN_KERNEL", k);
        }
        Step::new("live iso")
            .file(GuestFile::new(
                "iso-grub.cfg",
                render::iso_grub_cfg(self.timeout(), serial, self.cmdline()),
            ))
            .file(GuestFile::new(
                "iso-early.cfg",
                render::iso_early_cfg(&marker),
            ))
            .file(GuestFile::new("iso-marker", format!("{label}\n")))
            .run(run)
    }

    fn partition(&self) -> Step {
        let ids = Ids::for_recipe(self.recipe);
        let step = Step::new("partition");
        let run = Run::new(Script::Partition).env("KILN_PARTITIONS", self.parts.len().to_string());
        match self.recipe.recipe.table {
            Table::Gpt => {
                let mut run = run.arg("gpt");
                run.args
                    .extend(render::sgdisk_args(&ids.uuid("gpt-disk"), self.parts));
                step.run(run)
            }
            Table::Mbr => step
                .file(GuestFile::new(
                    "sfdisk",
                    render::sfdisk_table(&ids.mbr_id(), self.parts),
                ))
                .run(run.arg("mbr")),
        }
    }

    fn bootloader(&self, kernel: Option<&str>) -> Result<Step> {
        let Some(root) = root_part(self.parts) else {
            bail!("the recipe's bootloader needs a partition mounted at /");
        };
        let kind = self.recipe.recipe.bootloader.kind;
        let fs_mod = match root.fs {
            Some(Filesystem::Xfs) => "xfs",
            Some(Filesystem::Btrfs) => "btrfs",
            _ => "ext2",
        };
        let part_mod = if self.recipe.recipe.table == Table::Gpt {
            "part_gpt"
        } else {
            "part_msdos"
        };
        let esp_mount = self
            .parts
            .iter()
            .find(|p| p.kind == PartType::Esp)
            .and_then(|p| p.mount.clone())
            .unwrap_or_default();
        let efi = matches!(kind, BootloaderKind::GrubEfi | BootloaderKind::Both);
        let bios = matches!(kind, BootloaderKind::GrubBios | BootloaderKind::Both);
        let flag = |on: bool| if on { "1" } else { "0" };
        let mut run = Run::new(Script::Bootloader)
            .env("KILN_GRUB_EFI", flag(efi))
            .env("KILN_GRUB_BIOS", flag(bios))
            .env("KILN_ESP_MOUNT", esp_mount)
            .env(
                "KILN_GRUB_MODULES",
                format!(
                    "{part_mod} part_msdos {fs_mod} fat search search_fs_uuid {GRUB_MENU_MODULES}"
                ),
            );
        let mut step = Step::new("bootloader files").file(GuestFile::new(
            "early.cfg",
            render::disk_early_cfg(&root.fs_uuid),
        ));
        // Without a kernel the step fails, and says so, before it reads grub.cfg.
        if let Some(k) = kernel {
            run = run.env("KILN_KERNEL", k);
            let menu = render::DiskMenu {
                title: &self.recipe.name,
                timeout: self.timeout(),
                serial: self.cmdline().contains("console=ttyS"),
                part_mod,
                fs_mod,
                root_uuid: &root.fs_uuid,
                kernel: k,
                cmdline: self.cmdline(),
            };
            step = step.file(GuestFile::new("grub.cfg", menu.render()));
        }
        Ok(step.run(run))
    }

    /// Makes each filesystem and fills it from its part of the tree,
    /// deepest mount points first so each is cut out of its parent before
    /// the parent is written.
    fn filesystems(&self) -> Result<Step> {
        let mut step = Step::new("filesystems");
        let mut mounted: Vec<&PartPlan> = self
            .parts
            .iter()
            .filter(|p| p.mount.as_deref().is_some_and(|m| m != "/"))
            .collect();
        mounted.sort_by_key(|p| std::cmp::Reverse(p.mount.as_deref().map_or(0, str::len)));
        for p in &mounted {
            step = step.run(
                Run::new(Script::Carve)
                    .arg(p.mount.as_deref().unwrap_or_default())
                    .arg(p.number.to_string()),
            );
        }
        let host_ext4 = self.host_ext4();
        for p in self.parts {
            let tree = match p.mount.as_deref() {
                Some("/") => "/".to_string(),
                Some(_) => format!("/build/parts/{}", p.number),
                None => String::new(),
            };
            if let Some(e) = host_ext4.iter().find(|e| e.part.number == p.number) {
                // Made on the host after the VM: here only its tree goes out.
                match e.source {
                    Ext4Source::Empty => {}
                    Ext4Source::Tree(a) => {
                        step = step.run(
                            Run::new(Script::ArchiveTree)
                                .env("KILN_PART", p.number.to_string())
                                .env("KILN_LABEL", p.label.as_str())
                                .env("KILN_TREE", tree)
                                .env("KILN_TREE_OFFSET", a.offset.to_string())
                                .env("KILN_TREE_ROOM", a.room.to_string()),
                        );
                    }
                    Ext4Source::Layers => {
                        step = step.run(
                            Run::new(Script::RootLayer)
                                .env("KILN_PART", p.number.to_string())
                                .env("KILN_LABEL", p.label.as_str()),
                        );
                    }
                }
                continue;
            }
            let fs = match (p.kind, p.fs) {
                (PartType::Swap, _) => "swap",
                (_, Some(f)) => f.name(),
                (_, None) => "none",
            };
            if p.fs == Some(Filesystem::Vfat) {
                let Some(id) = render::vfat_volume_id(&p.fs_uuid) else {
                    bail!("'{}' is not a vfat volume id like \"ABCD-1234\"", p.fs_uuid);
                };
                step = step.file(GuestFile::new(&format!("vfat-id-{}", p.number), id));
            }
            step = step.run(
                Run::new(Script::MakeFs)
                    .env("KILN_PART", p.number.to_string())
                    .env("KILN_FS", fs)
                    .env("KILN_LABEL", p.label.as_str())
                    .env("KILN_UUID", p.fs_uuid.as_str())
                    .env("KILN_TREE", tree)
                    .env("KILN_FAT32", if p.size >= 64 * MIB { "1" } else { "0" }),
            );
        }
        Ok(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn recipe(extra: &str) -> Checked {
        recipe_full("", r#"["echo 'it''s' \"$HOME\" > /x; ls | wc -l"]"#, extra)
    }

    fn recipe_with_commands(top: &str, commands: &str) -> Checked {
        recipe_full(top, commands, "")
    }

    fn recipe_full(top: &str, commands: &str, extra: &str) -> Checked {
        let text = format!(
            r#"name = "t"
size = "1G"
table = "gpt"
{top}
commands = {commands}
[[partition]]
label = "ESP"
size = "128M"
type = "esp"
filesystem = "vfat"
mount = "/boot/efi"
[[partition]]
label = "BIOS"
size = "1M"
type = "bios_grub"
[[partition]]
label = "root"
size = "rest"
type = "linux"
filesystem = "ext4"
mount = "/"
[root]
suite = "bookworm"
[bootloader]
type = "both"
{extra}"#
        );
        Checked::parse(Path::new("/nonexistent/t.toml"), text).expect("recipe")
    }

    fn steps(c: &Checked, formats: &[Format], kernel: Option<&str>) -> Vec<Step> {
        let ids = Ids::for_recipe(c);
        let parts = plan_partitions(c, &ids);
        let inputs = Inputs {
            recipe: c,
            epoch: 1_700_000_000,
            parts: &parts,
            formats,
            iso_id: "11111111-2222-4333-8444-555555555555",
        };
        let mut steps = vec![inputs.mount_root(&[], 0)];
        steps.extend(inputs.tree_steps());
        steps.extend(inputs.output_steps(kernel).expect("output steps"));
        steps
    }

    fn env<'a>(run: &'a Run, key: &str) -> Option<&'a str> {
        run.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_disk_build_runs_its_steps_in_order() {
        let c = recipe("");
        let names: Vec<String> = steps(&c, &[Format::Raw], Some("vmlinuz-6.1.0-1-amd64"))
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            names,
            [
                "mount root",
                "configure",
                "command 1",
                "normalize",
                "partition",
                "bootloader files",
                "filesystems",
                "grub-bios"
            ]
        );
        let iso_only = steps(&c, &[Format::Iso], None);
        assert_eq!(iso_only.last().map(|s| s.name.as_str()), Some("live iso"));
    }

    /// A command reaches the guest as one environment value, byte for
    /// byte: no quoting exists to get wrong.
    #[test]
    fn commands_go_in_untouched() {
        let c = recipe("");
        let s = steps(&c, &[Format::Raw], None);
        let run = &s[2].runs[0];
        assert_eq!(run.script, Script::Command);
        assert_eq!(
            env(run, "KILN_COMMAND"),
            Some(r#"echo 'it''s' "$HOME" > /x; ls | wc -l"#)
        );
        assert_eq!(run.argv(), ["bash", "/run/kiln-steps/command.sh"]);
    }

    /// Only the commands that ask for the network get it; the recipe's
    /// `network` is every command's default.
    #[test]
    fn each_command_says_whether_it_has_the_network() {
        let networks = |top: &str, commands: &str| {
            let c = recipe_with_commands(top, commands);
            let s = steps(&c, &[Format::Raw], None);
            s.iter()
                .filter(|s| s.name.starts_with("command "))
                .map(|s| {
                    env(&s.runs[0], "KILN_NETWORK")
                        .unwrap_or("unset")
                        .to_string()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            networks("", r#"["a", { run = "b", network = true }, { run = "c" }]"#),
            ["0", "1", "0"]
        );
        assert_eq!(
            networks(
                "network = true",
                r#"["a", { run = "b", network = false }, { run = "c" }]"#
            ),
            ["1", "0", "1"]
        );
    }

    #[test]
    fn users_files_and_keys_become_argv() {
        let c = recipe(
            r#"[system]
hostname = "box"
root_ssh_keys = ["ssh-ed25519 AAAA root@x"]
[[user]]
name = "ada"
uid = 1500
groups = ["sudo", "adm"]
ssh_keys = ["ssh-ed25519 BBBB ada@x"]
[[file]]
path = "/etc/motd file"
content = "hi"
mode = "0600"
owner = "ada:ada"
"#,
        );
        let s = steps(&c, &[Format::Raw], None);
        let configure = &s[1];
        let files: Vec<&str> = configure.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            files,
            ["hostname", "hosts", "fstab", "keys-ada", "keys-root"]
        );
        let argv: Vec<Vec<String>> = configure.runs.iter().map(|r| r.argv()).collect();
        assert_eq!(argv[0][2..], ["/boot/efi"]);
        assert_eq!(
            argv[1][2..],
            [
                "useradd",
                "--create-home",
                "--uid",
                "1500",
                "--shell",
                "/bin/bash",
                "--groups",
                "sudo,adm",
                "ada"
            ]
        );
        assert_eq!(
            argv[2][2..],
            ["/home/ada", "ada", "/run/kiln-plan/keys-ada"]
        );
        assert_eq!(argv[3][2..], ["/root", "root", "/run/kiln-plan/keys-root"]);
        assert_eq!(
            argv[4][2..],
            ["/run/kiln-files/0", "/etc/motd file", "0600", "ada:ada"]
        );
        assert_eq!(
            env(&configure.runs[5], "KILN_SSH_HOST_KEYS_AT_FIRST_BOOT"),
            Some("1")
        );
    }

    #[test]
    fn grub_cfg_is_rendered_once_the_kernel_is_known() {
        let c = recipe("");
        let with = steps(&c, &[Format::Raw], Some("vmlinuz-6.1.0-1-amd64"));
        let boot = with
            .iter()
            .find(|s| s.name == "bootloader files")
            .expect("bootloader step");
        let cfg = boot
            .files
            .iter()
            .find(|f| f.name == "grub.cfg")
            .expect("grub.cfg");
        let cfg = String::from_utf8_lossy(&cfg.contents);
        assert!(
            cfg.contains("linux /boot/vmlinuz-6.1.0-1-amd64 root=UUID="),
            "{cfg}"
        );
        assert!(
            cfg.contains("initrd /boot/initrd.img-6.1.0-1-amd64"),
            "{cfg}"
        );
        assert_eq!(env(&boot.runs[0], "KILN_ESP_MOUNT"), Some("/boot/efi"));
        assert_eq!(env(&boot.runs[0], "KILN_GRUB_BIOS"), Some("1"));

        // Without one, the step is still planned and fails in the VM with
        // the message that says which package is missing.
        let without = steps(&c, &[Format::Raw], None);
        let boot = without
            .iter()
            .find(|s| s.name == "bootloader files")
            .expect("bootloader step");
        assert!(boot.files.iter().all(|f| f.name != "grub.cfg"));
        assert_eq!(env(&boot.runs[0], "KILN_KERNEL"), None);
    }

    #[test]
    fn filesystems_cut_mounts_out_and_carry_their_ids() {
        let c = recipe("");
        let s = steps(&c, &[Format::Raw], None);
        let fs = s.iter().find(|s| s.name == "filesystems").expect("step");
        assert_eq!(fs.runs[0].argv()[2..], ["/boot/efi", "1"]);
        let esp = &fs.runs[1];
        assert_eq!(env(esp, "KILN_FS"), Some("vfat"));
        assert_eq!(env(esp, "KILN_FAT32"), Some("1"));
        assert_eq!(env(esp, "KILN_TREE"), Some("/build/parts/1"));
        assert_eq!(fs.files[0].name, "vfat-id-1");
        assert_eq!(fs.files[0].contents.len(), 4);
        assert_eq!(env(&fs.runs[2], "KILN_FS"), Some("none"));
        // Of the ext4 root only the output steps' layer goes out here: the
        // host makes it from all the layers.
        let root = &fs.runs[3];
        assert_eq!(root.script, Script::RootLayer);
        assert_eq!(env(root, "KILN_PART"), Some("3"));
        assert_eq!(fs.runs.len(), 4);
    }

    #[test]
    fn each_ext4_tree_gets_its_own_room_on_the_trees_disk() {
        let c = Checked::parse(
            Path::new("/nonexistent/t.toml"),
            r#"name = "t"
size = "2G"
table = "gpt"
[[partition]]
label = "root"
size = "1G"
type = "linux"
filesystem = "ext4"
mount = "/"
[[partition]]
label = "spare"
size = "64M"
type = "linux"
filesystem = "ext4"
[[partition]]
label = "home"
size = "rest"
type = "linux"
filesystem = "ext4"
mount = "/home"
[root]
suite = "bookworm"
"#
            .to_string(),
        )
        .expect("recipe");
        let ids = Ids::for_recipe(&c);
        let parts = plan_partitions(&c, &ids);
        let inputs = |formats| Inputs {
            recipe: &c,
            epoch: 1,
            parts: &parts,
            formats,
            iso_id: "",
        };
        let disk = inputs(&[Format::Qcow2]);
        let e = disk.host_ext4();
        assert_eq!(e.len(), 3);
        // The root is merged from the layers on the host.
        assert_eq!(e[0].source, Ext4Source::Layers);
        // No mount point, no tree: an empty filesystem.
        assert_eq!(e[1].source, Ext4Source::Empty);
        let Ext4Source::Tree(home) = e[2].source else {
            panic!("home's tree: {:?}", e[2].source);
        };
        assert_eq!(home.offset, 0);
        assert_eq!(home.room % MIB, 0);
        assert!(home.room >= 2 * e[2].part.size + ARCHIVE_SLACK);
        assert_eq!(disk.trees_disk_size(), home.offset + home.room);
        // In the VM: /home cut out, the root's last layer archived, home's
        // tree archived to its room; nothing for the empty one.
        let fs = disk.filesystems().expect("filesystems");
        let runs: Vec<(Script, Option<&str>, Option<&str>)> = fs
            .runs
            .iter()
            .map(|r| (r.script, env(r, "KILN_TREE"), env(r, "KILN_TREE_OFFSET")))
            .collect();
        let home_offset = home.offset.to_string();
        assert_eq!(
            runs,
            [
                (Script::Carve, None, None),
                (Script::RootLayer, None, None),
                (
                    Script::ArchiveTree,
                    Some("/build/parts/3"),
                    Some(home_offset.as_str())
                ),
            ]
        );
        // An iso alone makes no disk.
        assert!(inputs(&[Format::Iso]).host_ext4().is_empty());
        assert_eq!(inputs(&[Format::Iso]).trees_disk_size(), 0);
    }

    /// Each tree step archives its layer; a changed last command changes
    /// its own key and no earlier one.
    #[test]
    fn tree_steps_are_layers_keyed_by_what_came_before() {
        use crate::image::layers::keys;
        let key_of = |commands: &str| {
            let c = recipe_with_commands("", commands);
            let ids = Ids::for_recipe(&c);
            let parts = plan_partitions(&c, &ids);
            let inputs = Inputs {
                recipe: &c,
                epoch: 1,
                parts: &parts,
                formats: &[Format::Raw],
                iso_id: "",
            };
            let steps = inputs.tree_steps();
            for s in &steps {
                assert_eq!(s.runs.last().map(|r| r.script), Some(Script::SealLayer));
            }
            let env = inputs.env();
            let base = keys::Base {
                root: "root",
                tools: "tools",
                env: &env,
                files: &[],
                scripts: &[],
            };
            keys::keys(&base, &steps)
        };
        let a = key_of(r#"["echo a", "echo b"]"#);
        let b = key_of(r#"["echo a", "echo c"]"#);
        assert_eq!(a.len(), 4, "configure, 2 commands, normalize");
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        assert_ne!(a[3], b[3]);
        assert_eq!(a, key_of(r#"["echo a", "echo b"]"#));
        let first = key_of(r#"["echo z", "echo b"]"#);
        assert_eq!(a[0], first[0]);
        assert_ne!(a[1], first[1]);
    }

    /// Every script in scripts/ is one kiln puts in the VM, and the other
    /// way round.
    #[test]
    fn every_script_file_is_embedded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/image/plan/scripts");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .expect("scripts dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = Script::ALL
            .iter()
            .map(|s| s.file_name().to_string())
            .collect();
        embedded.sort();
        assert_eq!(on_disk, embedded);
        for s in Script::ALL {
            let text = std::fs::read_to_string(dir.join(s.file_name())).expect("read");
            assert_eq!(text, s.text());
        }
    }
}
