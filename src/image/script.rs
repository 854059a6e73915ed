//! The build's steps as shell scripts that run in the VM, as root, with the
//! tools image's userland. Everything that varies between two builds of one
//! recipe (UUIDs, seeds, times) is fixed here from the recipe, so the steps
//! are deterministic; filesystems are populated offline (`mke2fs -d`,
//! mtools, `mkfs.btrfs --rootdir`) from a tree on a scratch disk, in a fixed
//! order, never by a kernel mount whose allocation depends on timing.

use std::fmt::Write as _;

use crate::image::recipe::{
    BootloaderKind, Checked, FileEntry, Filesystem, Format, PartType, Table, ALIGN,
};

use super::ids::Ids;

/// virtio-blk serials of the build VM's disks.
pub const TARGET_SERIAL: &str = "kiln-target";
pub const ROOTFS_SERIAL: &str = "kiln-rootfs";
pub const SCRATCH_SERIAL: &str = "kiln-scratch";
pub const ISO_SERIAL: &str = "kiln-iso";
/// Where host files for `[[file]]` entries are put in the guest.
pub const FILES_DIR: &str = "/run/kiln-files";
/// The line the iso step prints with the iso's size.
pub const ISO_SIZE_MARK: &str = "KILN_ISO_SIZE=";

pub struct Step {
    pub name: String,
    pub script: String,
}

/// A partition with everything decided.
pub struct PartPlan {
    pub number: usize,
    pub label: String,
    pub kind: PartType,
    pub fs: Option<Filesystem>,
    pub mount: Option<String>,
    pub start: u64,
    pub size: u64,
    pub fs_uuid: String,
    pub part_guid: String,
    pub hash_seed: String,
}

/// Single-quotes `s` for the shell.
pub fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
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
            // blkid reports vfat ids in upper case and UUIDs in lower
            // case; fstab and root= must match it exactly.
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

fn preamble(epoch: u64) -> String {
    format!(
        r#"set -euo pipefail
export LC_ALL=C TZ=UTC SOURCE_DATE_EPOCH={epoch} E2FSPROGS_FAKE_TIME={epoch} MTOOLS_SKIP_CHECK=1
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
R=/build/root
disk() {{ readlink -f "/dev/disk/by-id/virtio-$1"; }}
part() {{
    local p="$(disk {TARGET_SERIAL})$1" i=0
    # The kernel adds partition nodes right after the table is re-read.
    while [ ! -b "$p" ]; do
        i=$((i + 1)); [ $i -lt 100 ] || {{ echo "partition $p did not appear" >&2; exit 1; }}
        sleep 0.05
    done
    echo "$p"
}}
"#
    )
}

/// Mounts /proc, /sys and /dev into the root for chroot commands.
const CHROOT_UP: &str = r#"
for d in proc sys dev; do mkdir -p "$R/$d"; done
mount -t proc proc "$R/proc"
mount -t sysfs sys "$R/sys"
mount --bind /dev "$R/dev"
KILN_POLICY=
trap 'umount -l "$R/dev" "$R/sys" "$R/proc" 2>/dev/null || true; [ -z "$KILN_POLICY" ] || rm -f "$R/usr/sbin/policy-rc.d"' EXIT
# No service starts while packages are configured in the chroot.
if [ -d "$R/usr/sbin" ] && [ ! -e "$R/usr/sbin/policy-rc.d" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"; chmod 755 "$R/usr/sbin/policy-rc.d"
    KILN_POLICY=1
fi
export DEBIAN_FRONTEND=noninteractive HOME=/root
"#;

pub struct Inputs<'a> {
    pub recipe: &'a Checked,
    pub epoch: u64,
    pub parts: &'a [PartPlan],
    /// Compression flag for tar when reading the root archive ("" for none).
    pub root_tar_flag: &'a str,
    pub formats: &'a [Format],
    /// Names the iso (its GPT disk GUID and the file grub looks for).
    pub iso_id: &'a str,
}

pub fn steps(inp: &Inputs) -> Vec<Step> {
    let c = inp.recipe;
    let pre = preamble(inp.epoch);
    let mut steps = Vec::new();
    let mut add = |name: &str, body: String| {
        steps.push(Step {
            name: name.to_string(),
            script: format!("{pre}{body}"),
        })
    };

    add(
        "unpack root",
        format!(
            r#"S=$(disk {SCRATCH_SERIAL})
# The scratch filesystem's seed and UUID are fixed too: the order in which
# directories list their entries (and so the populated images) follows them.
mkfs.ext4 -q -F -O ^has_journal -U {scratch_uuid} -E hash_seed={scratch_seed} "$S"
mkdir -p /build && mount -o noatime "$S" /build
mkdir -p "$R" && chmod 755 "$R"
tar -x {flag} --numeric-owner -p --xattrs --xattrs-include='*' -f "$(disk {ROOTFS_SERIAL})" -C "$R"
echo "unpacked $(du -sh --apparent-size "$R" | cut -f1)"
"#,
            scratch_uuid = "5c4a7c4e-0000-4000-8000-000000000001",
            scratch_seed = "5c4a7c4e-0000-4000-8000-000000000002",
            flag = inp.root_tar_flag,
        ),
    );

    add("configure", configure(c, inp.parts));

    for (i, cmd) in c.recipe.commands.iter().enumerate() {
        add(
            &format!("command {}", i + 1),
            format!(
                "{CHROOT_UP}echo {shown}\nchroot \"$R\" /bin/sh -c {cmd}\n",
                shown = sq(&format!("+ {cmd}")),
                cmd = sq(cmd)
            ),
        );
    }

    add(
        "normalize",
        r#"# What would differ between two builds: caches, logs, seeds.
rm -f "$R/var/cache/ldconfig/aux-cache" "$R/var/lib/systemd/random-seed" \
      "$R"/var/cache/apt/*.bin "$R"/var/cache/debconf/*-old "$R"/var/lib/dpkg/*-old \
      2>/dev/null || true
[ ! -d "$R/var/log" ] || find "$R/var/log" -type f -exec truncate -s 0 {} +
find "$R" -depth -newermt "@$SOURCE_DATE_EPOCH" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
"#
        .to_string(),
    );

    let disk = inp.formats.iter().any(|f| *f != Format::Iso);
    if inp.formats.contains(&Format::Iso) {
        add("live iso", live_iso(c, inp.iso_id));
    }
    if !disk {
        return steps;
    }
    add("partition", partition(c, inp.parts));
    if c.recipe.bootloader.kind != BootloaderKind::None {
        add("bootloader files", bootloader_files(c, inp.parts));
    }
    add("filesystems", filesystems(inp.parts));
    if matches!(
        c.recipe.bootloader.kind,
        BootloaderKind::GrubBios | BootloaderKind::Both
    ) {
        add(
            "grub-bios",
            format!(
                r#"T=$(disk {TARGET_SERIAL})
echo "(hd0) $T" > /build/grub-i386/device.map
/usr/lib/grub/i386-pc/grub-bios-setup --directory=/build/grub-i386 --device-map=/build/grub-i386/device.map "$T"
"#
            ),
        );
    }
    steps
}

fn configure(c: &Checked, parts: &[PartPlan]) -> String {
    let r = &c.recipe;
    let mut s = String::new();
    if let Some(h) = &r.system.hostname {
        let _ = write!(
            s,
            "printf '%s\\n' {h} > \"$R/etc/hostname\"\n\
             printf '127.0.0.1\\tlocalhost\\n127.0.1.1\\t%s\\n::1\\tlocalhost ip6-localhost ip6-loopback\\n' {h} > \"$R/etc/hosts\"\n",
            h = sq(h)
        );
    }
    // fstab from the partitions, by UUID.
    let mut fstab = String::new();
    for p in parts {
        let line = match (p.kind, p.fs, &p.mount) {
            (PartType::Swap, _, _) => format!("UUID={} none swap sw 0 0", p.fs_uuid),
            (_, Some(fs), Some(m)) => {
                let (opts, pass) = match fs {
                    Filesystem::Ext4 if m == "/" => ("errors=remount-ro", 1),
                    Filesystem::Ext4 => ("defaults", 2),
                    Filesystem::Vfat => ("umask=0077", 2),
                    Filesystem::Xfs => ("defaults", 0),
                    Filesystem::Btrfs => ("defaults", 0),
                };
                format!("UUID={} {m} {} {opts} 0 {pass}", p.fs_uuid, fs.name())
            }
            _ => continue,
        };
        fstab.push_str(&line);
        fstab.push('\n');
    }
    if !parts.is_empty() {
        let _ = writeln!(
            s,
            "mkdir -p \"$R/etc\"\nprintf '%s' {} > \"$R/etc/fstab\"",
            sq(&format!("# written by kiln from the recipe\n{fstab}"))
        );
        for p in parts {
            if let Some(m) = p.mount.as_deref().filter(|m| *m != "/") {
                let _ = writeln!(s, "mkdir -p \"$R\"{}", sq(m));
            }
        }
    }
    if !r.users.is_empty() || !r.files.is_empty() || !r.system.root_ssh_keys.is_empty() {
        s.push_str(CHROOT_UP);
    }
    for u in &r.users {
        let mut cmd = String::from("useradd --create-home");
        if let Some(uid) = u.uid {
            let _ = write!(cmd, " --uid {uid}");
        }
        let _ = write!(
            cmd,
            " --shell {}",
            sq(u.shell.as_deref().unwrap_or("/bin/bash"))
        );
        if !u.groups.is_empty() {
            let _ = write!(cmd, " --groups {}", sq(&u.groups.join(",")));
        }
        let _ = write!(cmd, " {}", sq(&u.name));
        let _ = writeln!(s, "chroot \"$R\" {cmd}");
        if !u.ssh_keys.is_empty() {
            authorized_keys(&mut s, &format!("/home/{}", u.name), &u.name, &u.ssh_keys);
        }
    }
    if !r.system.root_ssh_keys.is_empty() {
        authorized_keys(&mut s, "/root", "root", &r.system.root_ssh_keys);
    }
    for (i, f) in r.files.iter().enumerate() {
        install_file(&mut s, i, f);
    }
    s.push_str(
        r#"# systemd makes a machine id at first boot when the file is empty.
if [ -e "$R/etc/machine-id" ]; then : > "$R/etc/machine-id"; fi
if [ -f "$R/var/lib/dbus/machine-id" ] && [ ! -L "$R/var/lib/dbus/machine-id" ]; then
    rm -f "$R/var/lib/dbus/machine-id"
fi
"#,
    );
    if r.system.ssh_host_keys_at_first_boot.unwrap_or(true) {
        s.push_str(
            r#"if [ -d "$R/etc/ssh" ]; then
    # Host keys are made on the machine that boots the image, not baked in.
    rm -f "$R/etc/ssh/ssh_host_"*_key*
    mkdir -p "$R/etc/systemd/system/multi-user.target.wants"
    cat > "$R/etc/systemd/system/kiln-ssh-host-keys.service" <<'UNIT'
[Unit]
Description=Generate SSH host keys on first boot
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
UNIT
    ln -sf /etc/systemd/system/kiln-ssh-host-keys.service \
        "$R/etc/systemd/system/multi-user.target.wants/kiln-ssh-host-keys.service"
fi
"#,
        );
    }
    s
}

fn authorized_keys(s: &mut String, home: &str, owner: &str, keys: &[String]) {
    let _ = writeln!(
        s,
        "install -d -m 700 \"$R\"{home}/.ssh\n\
         printf '%s\\n' {keys} > \"$R\"{home}/.ssh/authorized_keys\n\
         chmod 600 \"$R\"{home}/.ssh/authorized_keys\n\
         chroot \"$R\" chown -R {owner}: {home}/.ssh",
        home = sq(home),
        owner = sq(owner),
        keys = keys.iter().map(|k| sq(k)).collect::<Vec<_>>().join(" ")
    );
}

fn install_file(s: &mut String, i: usize, f: &FileEntry) {
    let mode = f.mode.as_deref().unwrap_or("0644");
    let owner = f.owner.as_deref().unwrap_or("root:root");
    let dest = sq(&f.path);
    let _ = writeln!(
        s,
        "install -D -m {mode} {FILES_DIR}/{i} \"$R\"{dest}\nchroot \"$R\" chown {owner} {dest}",
        mode = sq(mode),
        owner = sq(owner),
    );
}

/// The file name a `[[file]]` entry's content has in [`FILES_DIR`].
pub fn file_slot(i: usize) -> String {
    format!("{FILES_DIR}/{i}")
}

fn partition(c: &Checked, parts: &[PartPlan]) -> String {
    let ids = Ids::new(c.text.as_bytes());
    let mut s = format!("T=$(disk {TARGET_SERIAL})\n");
    match c.recipe.table {
        Table::Gpt => {
            let mut cmd = format!("sgdisk --clear --disk-guid={}", ids.uuid("gpt-disk"));
            for p in parts {
                let code = match p.kind {
                    PartType::Esp => "ef00",
                    PartType::BiosGrub => "ef02",
                    PartType::Swap => "8200",
                    PartType::Linux if p.mount.as_deref() == Some("/") => "8304",
                    PartType::Linux | PartType::Data => "8300",
                };
                let (first, last) = (p.start / 512, (p.start + p.size) / 512 - 1);
                let n = p.number;
                let _ = write!(
                    cmd,
                    " \\\n  --new={n}:{first}:{last} --typecode={n}:{code} \
                     --change-name={n}:{label} --partition-guid={n}:{guid}",
                    label = sq(&p.label),
                    guid = p.part_guid
                );
            }
            let _ = writeln!(s, "{cmd} \"$T\"");
        }
        Table::Mbr => {
            let mut table = format!("label: dos\nlabel-id: {}\nunit: sectors\n", ids.mbr_id());
            for p in parts {
                let ty = match p.kind {
                    PartType::Esp => "ef",
                    PartType::Swap => "82",
                    _ => "83",
                };
                let boot = if p.mount.as_deref() == Some("/") {
                    ", bootable"
                } else {
                    ""
                };
                let _ = writeln!(
                    table,
                    "start={}, size={}, type={ty}{boot}",
                    p.start / 512,
                    p.size / 512
                );
            }
            let _ = writeln!(s, "printf '%s' {} | sfdisk --quiet \"$T\"", sq(&table));
        }
    }
    s.push_str("blockdev --rereadpt \"$T\" 2>/dev/null || true\n");
    for p in parts {
        let _ = writeln!(s, "part {} >/dev/null", p.number);
    }
    s
}

fn root_part(parts: &[PartPlan]) -> Option<&PartPlan> {
    parts.iter().find(|p| p.mount.as_deref() == Some("/"))
}

fn cmdline(c: &Checked) -> String {
    c.recipe.system.kernel_cmdline.clone().unwrap_or_default()
}

/// grub.cfg on the root filesystem, the EFI binary on the ESP, and the
/// BIOS core image; all with the root found by its (fixed) UUID.
/// Sets K and V to the newest kernel in the tree's /boot and its version.
const FIND_KERNEL: &str = r#"K=$(cd "$R/boot" && ls vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
[ -n "$K" ] || { echo "no kernel in /boot of the image: add a kernel package (linux-image-amd64) to root.packages" >&2; exit 1; }
V=${K#vmlinuz-}
"#;

/// grub.cfg lines that put grub's menu on the serial console too.
const GRUB_SERIAL: &str =
    "serial --unit=0 --speed=115200\nterminal_input console serial\nterminal_output console serial\n";

/// Modules every grub image kiln makes needs for its menu and a kernel.
const GRUB_MENU_MODULES: &str = "normal configfile linux echo test gzio serial terminal";

/// Copies grub's modules for `platform` (i386-pc, x86_64-efi) to `dest`.
fn copy_grub_modules(platform: &str, dest: &str) -> String {
    format!("cp /usr/lib/grub/{platform}/*.mod /usr/lib/grub/{platform}/*.lst {dest}/\n")
}

fn bootloader_files(c: &Checked, parts: &[PartPlan]) -> String {
    let Some(root) = root_part(parts) else {
        return "echo 'no root partition' >&2; exit 1\n".into();
    };
    let kind = c.recipe.bootloader.kind;
    let timeout = c.recipe.bootloader.timeout.unwrap_or(1);
    let serial = cmdline(c).contains("console=ttyS");
    let fs_mod = match root.fs {
        Some(Filesystem::Xfs) => "xfs",
        Some(Filesystem::Btrfs) => "btrfs",
        _ => "ext2",
    };
    let part_mod = if c.recipe.table == Table::Gpt {
        "part_gpt"
    } else {
        "part_msdos"
    };
    let title = c.name.clone();
    let mut s = FIND_KERNEL.to_string();
    let _ = write!(
        s,
        r#"[ -e "$R/boot/initrd.img-$V" ] || {{ echo "no /boot/initrd.img-$V in the image: add initramfs-tools" >&2; exit 1; }}
mkdir -p "$R/boot/grub"
{{
echo 'set default=0'
echo 'set timeout={timeout}'
{serial_cfg}echo 'insmod {part_mod}'
echo 'insmod {fs_mod}'
echo 'search --no-floppy --fs-uuid --set=root {uuid}'
echo "menuentry {title} {{"
echo "    linux /boot/$K root=UUID={uuid} ro {cmdline}"
echo "    initrd /boot/initrd.img-$V"
echo '}}'
}} > "$R/boot/grub/grub.cfg"
printf 'search --no-floppy --fs-uuid --set=root {uuid}\nset prefix=($root)/boot/grub\n' > /build/early.cfg
"#,
        uuid = root.fs_uuid,
        title = sq(&title),
        cmdline = cmdline(c).replace(['"', '$', '`', '\\'], ""),
        serial_cfg = if serial {
            format!("printf '%s' {}\n", sq(GRUB_SERIAL))
        } else {
            String::new()
        },
    );
    let common =
        format!("{part_mod} part_msdos {fs_mod} fat search search_fs_uuid {GRUB_MENU_MODULES}");
    if matches!(kind, BootloaderKind::GrubEfi | BootloaderKind::Both) {
        let esp = parts
            .iter()
            .find(|p| p.kind == PartType::Esp)
            .and_then(|p| p.mount.clone());
        let esp_dir = match esp {
            Some(m) => format!("\"$R\"{}", sq(&m)),
            None => "/build/esp".into(),
        };
        let _ = write!(
            s,
            r#"mkdir -p {esp_dir}/EFI/BOOT "$R/boot/grub/x86_64-efi"
{copy}# The removable-media path: firmware finds it without NVRAM entries.
grub-mkimage -O x86_64-efi -o {esp_dir}/EFI/BOOT/BOOTX64.EFI -p /boot/grub -c /build/early.cfg {common} efi_gop all_video
"#,
            copy = copy_grub_modules("x86_64-efi", "\"$R/boot/grub/x86_64-efi\""),
        );
    }
    if matches!(kind, BootloaderKind::GrubBios | BootloaderKind::Both) {
        let _ = write!(
            s,
            r#"mkdir -p /build/grub-i386 "$R/boot/grub/i386-pc"
{copy}cp /usr/lib/grub/i386-pc/boot.img /build/grub-i386/
grub-mkimage -O i386-pc -o /build/grub-i386/core.img -p /boot/grub -c /build/early.cfg biosdisk {common}
"#,
            copy = copy_grub_modules("i386-pc", "\"$R/boot/grub/i386-pc\""),
        );
    }
    s.push_str(
        "find \"$R/boot\" -depth -newermt \"@$SOURCE_DATE_EPOCH\" -exec touch --no-dereference --date=\"@$SOURCE_DATE_EPOCH\" {} +\n",
    );
    s
}

/// Makes each filesystem and fills it from its part of the tree, deepest
/// mount points first so each is cut out of its parent before the parent
/// is written.
fn filesystems(parts: &[PartPlan]) -> String {
    let mut s = String::from("mkdir -p /build/parts\n");
    let mut mounted: Vec<&PartPlan> = parts
        .iter()
        .filter(|p| p.mount.as_deref().is_some_and(|m| m != "/"))
        .collect();
    mounted.sort_by_key(|p| std::cmp::Reverse(p.mount.as_deref().map_or(0, |m| m.len())));
    for p in &mounted {
        let m = sq(p.mount.as_deref().unwrap_or_default());
        let _ = writeln!(
            s,
            "mkdir -p \"$R\"{m}\nmv \"$R\"{m} /build/parts/{n}\n\
             mkdir \"$R\"{m}\nchmod --reference=/build/parts/{n} \"$R\"{m}\n\
             touch --no-dereference --date=\"@$SOURCE_DATE_EPOCH\" \"$R\"{m} \"$(dirname \"$R\"{m})\"",
            n = p.number
        );
    }
    // Each tree is read back through a squashfs: its files report ctime
    // and atime equal to mtime, which the populating tools copy; on the
    // scratch filesystem they would be whenever the build touched them.
    s.push_str(
        "frozen() {\n\
         \x20   mksquashfs \"$1\" \"/build/frozen-$2.sqfs\" -noappend -no-progress -quiet -noI -noD -noF -noX >/dev/null\n\
         \x20   mkdir -p \"/build/frozen-$2\"\n\
         \x20   mount -o loop,ro \"/build/frozen-$2.sqfs\" \"/build/frozen-$2\"\n\
         }\n",
    );
    for p in parts {
        let tree = match p.mount.as_deref() {
            Some("/") => "\"$R\"".to_string(),
            Some(_) => format!("/build/parts/{}", p.number),
            None => String::new(),
        };
        let tree = if tree.is_empty() {
            tree
        } else {
            let _ = writeln!(s, "frozen {tree} {}", p.number);
            format!("/build/frozen-{}", p.number)
        };
        let dev = format!("\"$(part {})\"", p.number);
        let label = sq(&p.label);
        let uuid = &p.fs_uuid;
        let _ = writeln!(s, "echo 'partition {}: {}'", p.number, p.label);
        match (p.kind, p.fs) {
            (PartType::Swap, _) => {
                let _ = writeln!(s, "mkswap --label {label} --uuid {uuid} {dev}");
            }
            (_, Some(Filesystem::Ext4)) => {
                let populate = if tree.is_empty() {
                    String::new()
                } else {
                    format!(" -d {tree}")
                };
                let _ = writeln!(
                    s,
                    "mkfs.ext4 -q -F -L {label} -U {uuid} -E hash_seed={seed},root_owner=0:0{populate} {dev}",
                    seed = p.hash_seed
                );
            }
            (_, Some(Filesystem::Vfat)) => {
                let fat = if p.size >= 64 * crate::image::recipe::MIB {
                    "-F 32 "
                } else {
                    ""
                };
                let id = uuid.replace('-', "");
                // --invariant fixes the times mkfs.fat would take from the
                // clock, but also the volume id: that is patched in after,
                // in the boot sector (and FAT32's backup copy at sector 6).
                let le: String = (0..4)
                    .rev()
                    .map(|i| format!("\\x{}", &id[i * 2..i * 2 + 2]))
                    .collect();
                let offsets: &[u64] = if fat.is_empty() {
                    &[0x27]
                } else {
                    &[0x43, 6 * 512 + 0x43]
                };
                let _ = writeln!(s, "mkfs.fat {fat}-n {label} --invariant {dev} >/dev/null");
                for off in offsets {
                    let _ = writeln!(
                        s,
                        "printf '{le}' | dd of={dev} bs=1 seek={off} conv=notrunc status=none"
                    );
                }
                if !tree.is_empty() {
                    let _ = writeln!(
                        s,
                        "if [ -n \"$(ls -A {tree})\" ]; then\n\
                         \x20   (cd {tree} && LC_ALL=C ls -A | sort | while read -r f; do mcopy -s -p -m -Q -i {dev} \"$f\" ::/; done)\n\
                         fi"
                    );
                }
            }
            (_, Some(Filesystem::Btrfs)) => {
                let populate = if tree.is_empty() {
                    String::new()
                } else {
                    format!(" --rootdir {tree}")
                };
                let _ = writeln!(s, "mkfs.btrfs -q -f -L {label} -U {uuid}{populate} {dev}");
            }
            (_, Some(Filesystem::Xfs)) => {
                let _ = writeln!(s, "mkfs.xfs -q -f -L {label} -m uuid={uuid} {dev}");
                if !tree.is_empty() {
                    // xfsprogs here cannot populate offline: copy through a mount.
                    let _ = writeln!(
                        s,
                        "mkdir -p /build/mnt && mount {dev} /build/mnt\n\
                         tar -C {tree} --numeric-owner --xattrs -cf - . | tar -C /build/mnt --numeric-owner -p --xattrs --xattrs-include='*' -xf -\n\
                         umount /build/mnt"
                    );
                }
            }
            (_, None) => {}
        }
    }
    s
}

/// A hybrid iso made from parts kiln controls rather than by grub-mkrescue,
/// which stamps the clock into its EFI image and file times: El Torito
/// for BIOS (with an MBR so a USB stick boots too), an EFI system image for
/// UEFI (also a GPT partition), all times and GUIDs from the recipe.
fn live_iso(c: &Checked, iso_id: &str) -> String {
    let label: String = c
        .name
        .to_ascii_uppercase()
        .chars()
        .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' })
        .take(32)
        .collect();
    let cmdline = cmdline(c).replace(['"', '$', '`', '\\'], "");
    let timeout = c.recipe.bootloader.timeout.unwrap_or(1);
    let serial = if cmdline.contains("console=ttyS") {
        GRUB_SERIAL
    } else {
        ""
    };
    let marker = format!("/.kiln-{}", iso_id.replace('-', ""));
    let common =
        format!("iso9660 part_gpt part_msdos fat search search_fs_file {GRUB_MENU_MODULES}");
    let copy_bios = copy_grub_modules("i386-pc", "\"$I/boot/grub/i386-pc\"");
    let copy_efi = copy_grub_modules("x86_64-efi", "\"$I/boot/grub/x86_64-efi\"");
    format!(
        r#"{FIND_KERNEL}[ -e "$R/usr/share/initramfs-tools/scripts/live" ] || \
    {{ echo "the root has no live-boot: add live-boot to root.packages" >&2; exit 1; }}
I=/build/iso-tree
rm -rf "$I" /build/efi-tree && mkdir -p "$I/live" "$I/boot/grub/i386-pc" "$I/boot/grub/x86_64-efi" /build/efi-tree/EFI/BOOT
cp "$R/boot/$K" "$I/live/vmlinuz"
cp "$R/boot/initrd.img-$V" "$I/live/initrd.img"
# mksquashfs takes its times from SOURCE_DATE_EPOCH. zstd, not xz: several
# times faster to compress under emulation, and the kernel reads it natively.
# squashfs cannot hold POSIX ACLs (system.* xattrs); mksquashfs drops them
# with a line each, which is noise here.
mksquashfs "$R" "$I/live/filesystem.squashfs" -noappend -no-progress -comp zstd -Xcompression-level 6 \
    -e boot/efi >/dev/null 2>/build/mksquashfs.log || {{ cat /build/mksquashfs.log >&2; exit 1; }}
grep -v '^Unrecognised xattr prefix system\.' /build/mksquashfs.log >&2 || true
cat > "$I/boot/grub/grub.cfg" <<'CFG'
set default=0
set timeout={timeout}
{serial}menuentry 'Live system' {{
    linux /live/vmlinuz boot=live {cmdline}
    initrd /live/initrd.img
}}
CFG
# grub finds the iso by a file only it has, whether it booted from CD or USB.
echo {label} > "$I{marker}"
printf 'search --no-floppy --file --set=root {marker}\nset prefix=($root)/boot/grub\n' > /build/iso-early.cfg
{copy_bios}{copy_efi}grub-mkimage -O i386-pc-eltorito -o "$I/boot/grub/i386-pc/eltorito.img" -p /boot/grub -c /build/iso-early.cfg biosdisk {common}
grub-mkimage -O x86_64-efi -o /build/efi-tree/EFI/BOOT/BOOTX64.EFI -p /boot/grub -c /build/iso-early.cfg {common} efi_gop all_video
find "$I" /build/efi-tree -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {{}} +
# The EFI system image: FAT with fixed times and volume id, filled by mtools.
kib=$(( ( $(stat -c %s /build/efi-tree/EFI/BOOT/BOOTX64.EFI) / 1024 + 512 ) / 32 * 32 ))
mkfs.fat -C -n EFIBOOT --invariant "$I/efi.img" "$kib" >/dev/null
mcopy -s -p -m -Q -i "$I/efi.img" /build/efi-tree/EFI ::/
touch --date="@$SOURCE_DATE_EPOCH" "$I/efi.img"
D=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y%m%d%H%M%S00)
xorriso -as mkisofs -graft-points -r -V {label} \
    --modification-date="$D" --set_all_file_dates "$D" --gpt_disk_guid {iso_id} \
    -b boot/grub/i386-pc/eltorito.img -no-emul-boot -boot-load-size 4 -boot-info-table \
    --grub2-boot-info --grub2-mbr /usr/lib/grub/i386-pc/boot_hybrid.img \
    --efi-boot efi.img -efi-boot-part --efi-boot-image --protective-msdos-label \
    -o /build/live.iso "$I" >/dev/null 2>/build/xorriso.log || {{ cat /build/xorriso.log >&2; exit 1; }}
O=$(disk {ISO_SERIAL})
size=$(stat -c %s /build/live.iso)
[ "$size" -le "$(blockdev --getsize64 "$O")" ] || {{ echo "the iso ($size bytes) is larger than its output disk" >&2; exit 1; }}
dd if=/build/live.iso of="$O" bs=1M conv=fsync status=none
echo "{ISO_SIZE_MARK}$size"
"#
    )
}
