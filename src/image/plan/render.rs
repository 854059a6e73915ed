//! The files the build steps install, rendered on the host: /etc/hostname,
//! /etc/hosts, /etc/fstab, authorized_keys, the partition table, grub's
//! configurations, the vfat volume id. Plain text (or bytes) from plain
//! data, so each is unit-tested here and no shell ever quotes it.

use std::fmt::Write as _;

use super::partitions::PartPlan;
use crate::image::recipe::{Filesystem, PartType};

pub fn hostname(name: &str) -> String {
    format!("{name}\n")
}

pub fn hosts(name: &str) -> String {
    format!("127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n")
}

/// /etc/fstab: every mounted filesystem and swap, by UUID.
pub fn fstab(parts: &[PartPlan]) -> String {
    let mut s = String::from("# written by kiln from the recipe\n");
    for p in parts {
        match (p.kind, p.fs, &p.mount) {
            (PartType::Swap, _, _) => {
                let _ = writeln!(s, "UUID={} none swap sw 0 0", p.fs_uuid);
            }
            (_, Some(fs), Some(m)) => {
                let (opts, pass) = match fs {
                    Filesystem::Ext4 if m == "/" => ("errors=remount-ro", 1),
                    Filesystem::Ext4 => ("defaults", 2),
                    Filesystem::Vfat => ("umask=0077", 2),
                    Filesystem::Xfs | Filesystem::Btrfs => ("defaults", 0),
                };
                let _ = writeln!(s, "UUID={} {m} {} {opts} 0 {pass}", p.fs_uuid, fs.name());
            }
            _ => {}
        }
    }
    s
}

/// An authorized_keys file: one key per line.
pub fn authorized_keys(keys: &[String]) -> String {
    keys.iter().map(|k| format!("{k}\n")).collect()
}

/// sgdisk's options for a GPT with `parts` (the device is added by the step).
pub fn sgdisk_args(disk_guid: &str, parts: &[PartPlan]) -> Vec<String> {
    let mut args = vec!["--clear".to_string(), format!("--disk-guid={disk_guid}")];
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
        args.extend([
            format!("--new={n}:{first}:{last}"),
            format!("--typecode={n}:{code}"),
            format!("--change-name={n}:{}", p.label),
            format!("--partition-guid={n}:{}", p.part_guid),
        ]);
    }
    args
}

/// An MBR table in sfdisk's script format.
pub fn sfdisk_table(disk_id: &str, parts: &[PartPlan]) -> String {
    let mut s = format!("label: dos\nlabel-id: {disk_id}\nunit: sectors\n");
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
            s,
            "start={}, size={}, type={ty}{boot}",
            p.start / 512,
            p.size / 512
        );
    }
    s
}

/// grub.cfg lines that put grub's menu on the serial console too.
const GRUB_SERIAL: &str =
    "serial --unit=0 --speed=115200\nterminal_input console serial\nterminal_output console serial\n";

/// A word for grub's script language, in single quotes.
fn grub_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The disk image's grub.cfg: one entry booting `kernel` (a file name in
/// /boot, `vmlinuz-VERSION`) with its initrd, the root found by UUID.
pub struct DiskMenu<'a> {
    pub title: &'a str,
    pub timeout: u32,
    /// Also show the menu on the serial console.
    pub serial: bool,
    /// grub's modules for the partition table and the root's filesystem.
    pub part_mod: &'a str,
    pub fs_mod: &'a str,
    pub root_uuid: &'a str,
    pub kernel: &'a str,
    pub cmdline: &'a str,
}

impl DiskMenu<'_> {
    pub fn render(&self) -> String {
        let version = self.kernel.strip_prefix("vmlinuz-").unwrap_or(self.kernel);
        let mut s = format!("set default=0\nset timeout={}\n", self.timeout);
        if self.serial {
            s.push_str(GRUB_SERIAL);
        }
        let _ = write!(
            s,
            "insmod {part}\ninsmod {fs}\nsearch --no-floppy --fs-uuid --set=root {uuid}\n\
             menuentry {title} {{\n    linux /boot/{kernel} root=UUID={uuid} ro {cmdline}\n    \
             initrd /boot/initrd.img-{version}\n}}\n",
            part = self.part_mod,
            fs = self.fs_mod,
            uuid = self.root_uuid,
            title = grub_quote(self.title),
            kernel = self.kernel,
            cmdline = self.cmdline,
        );
        s
    }
}

/// The configuration built into a disk image's grub: find the root by UUID
/// and read grub.cfg from it.
pub fn disk_early_cfg(root_uuid: &str) -> String {
    format!("search --no-floppy --fs-uuid --set=root {root_uuid}\nset prefix=($root)/boot/grub\n")
}

/// The live iso's grub.cfg.
pub fn iso_grub_cfg(timeout: u32, serial: bool, cmdline: &str) -> String {
    format!(
        "set default=0\nset timeout={timeout}\n{serial}menuentry 'Live system' {{\n    \
         linux /live/vmlinuz boot=live {cmdline}\n    initrd /live/initrd.img\n}}\n",
        serial = if serial { GRUB_SERIAL } else { "" },
    )
}

/// The configuration built into the iso's grub: find the iso by `marker`,
/// a file only it has, whether booted from CD or USB.
pub fn iso_early_cfg(marker: &str) -> String {
    format!("search --no-floppy --file --set=root {marker}\nset prefix=($root)/boot/grub\n")
}

/// A vfat volume id ("ABCD-1234") as the boot sector stores it: 32 bits,
/// little-endian. None if it is not one.
pub fn vfat_volume_id(id: &str) -> Option<[u8; 4]> {
    let hex: String = id.chars().filter(|c| *c != '-').collect();
    if hex.len() != 8 {
        return None;
    }
    u32::from_str_radix(&hex, 16).ok().map(u32::to_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(n: usize, kind: PartType, fs: Option<Filesystem>, mount: Option<&str>) -> PartPlan {
        PartPlan {
            number: n,
            label: format!("p{n}"),
            kind,
            fs,
            mount: mount.map(str::to_string),
            start: (n as u64) << 20,
            size: 1 << 20,
            fs_uuid: format!("uuid-{n}"),
            part_guid: format!("guid-{n}"),
            hash_seed: format!("seed-{n}"),
        }
    }

    fn layout() -> Vec<PartPlan> {
        vec![
            part(1, PartType::Esp, Some(Filesystem::Vfat), Some("/boot/efi")),
            part(2, PartType::BiosGrub, None, None),
            part(3, PartType::Swap, None, None),
            part(4, PartType::Linux, Some(Filesystem::Ext4), Some("/")),
            part(5, PartType::Data, Some(Filesystem::Xfs), Some("/srv")),
            part(6, PartType::Data, Some(Filesystem::Ext4), None),
        ]
    }

    #[test]
    fn fstab_lists_mounted_filesystems_and_swap_by_uuid() {
        assert_eq!(
            fstab(&layout()),
            "# written by kiln from the recipe\n\
             UUID=uuid-1 /boot/efi vfat umask=0077 0 2\n\
             UUID=uuid-3 none swap sw 0 0\n\
             UUID=uuid-4 / ext4 errors=remount-ro 0 1\n\
             UUID=uuid-5 /srv xfs defaults 0 0\n"
        );
    }

    #[test]
    fn host_files() {
        assert_eq!(hostname("debian"), "debian\n");
        assert_eq!(
            hosts("web-1"),
            "127.0.0.1\tlocalhost\n127.0.1.1\tweb-1\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        );
        let keys = [
            "ssh-ed25519 AAAA a@b".to_string(),
            "ssh-rsa BBBB 'q'".into(),
        ];
        assert_eq!(
            authorized_keys(&keys),
            "ssh-ed25519 AAAA a@b\nssh-rsa BBBB 'q'\n"
        );
    }

    #[test]
    fn gpt_is_one_sgdisk_argument_per_option() {
        let args = sgdisk_args("disk-guid", &layout()[..4]);
        assert_eq!(&args[..2], ["--clear", "--disk-guid=disk-guid"]);
        assert_eq!(
            &args[2..6],
            [
                "--new=1:2048:4095",
                "--typecode=1:ef00",
                "--change-name=1:p1",
                "--partition-guid=1:guid-1"
            ]
        );
        assert_eq!(args[7], "--typecode=2:ef02");
        assert_eq!(args[11], "--typecode=3:8200");
        assert_eq!(args[15], "--typecode=4:8304");
        assert_eq!(args.len(), 2 + 4 * 4);
    }

    #[test]
    fn mbr_table_marks_the_root_bootable() {
        let parts = layout();
        let t = sfdisk_table("0x0badcafe", &[parts[0].clone(), parts[3].clone()]);
        assert_eq!(
            t,
            "label: dos\nlabel-id: 0x0badcafe\nunit: sectors\n\
             start=2048, size=2048, type=ef\n\
             start=8192, size=2048, type=83, bootable\n"
        );
    }

    #[test]
    fn disk_menu_boots_the_kernel_and_its_initrd() {
        let menu = DiskMenu {
            title: "debian-bookworm-minimal",
            timeout: 1,
            serial: true,
            part_mod: "part_gpt",
            fs_mod: "ext2",
            root_uuid: "0b3d1f8e-1111-4222-8333-444455556666",
            kernel: "vmlinuz-6.1.0-28-amd64",
            cmdline: "console=tty0 console=ttyS0,115200n8",
        };
        assert_eq!(
            menu.render(),
            "set default=0\nset timeout=1\n\
             serial --unit=0 --speed=115200\nterminal_input console serial\n\
             terminal_output console serial\n\
             insmod part_gpt\ninsmod ext2\n\
             search --no-floppy --fs-uuid --set=root 0b3d1f8e-1111-4222-8333-444455556666\n\
             menuentry 'debian-bookworm-minimal' {\n    \
             linux /boot/vmlinuz-6.1.0-28-amd64 root=UUID=0b3d1f8e-1111-4222-8333-444455556666 \
             ro console=tty0 console=ttyS0,115200n8\n    \
             initrd /boot/initrd.img-6.1.0-28-amd64\n}\n"
        );
        // No serial console asked for: no serial lines; an empty command
        // line leaves "ro " as kiln always wrote it.
        let plain = DiskMenu {
            serial: false,
            cmdline: "",
            title: "it's",
            ..menu
        }
        .render();
        assert!(!plain.contains("serial"), "{plain}");
        assert!(plain.contains(" ro \n"), "{plain}");
        assert!(plain.contains("menuentry 'it'\\''s' {"), "{plain}");
    }

    #[test]
    fn early_configs_find_their_root() {
        assert_eq!(
            disk_early_cfg("u-1"),
            "search --no-floppy --fs-uuid --set=root u-1\nset prefix=($root)/boot/grub\n"
        );
        assert_eq!(
            iso_early_cfg("/.kiln-abc"),
            "search --no-floppy --file --set=root /.kiln-abc\nset prefix=($root)/boot/grub\n"
        );
    }

    #[test]
    fn iso_menu() {
        assert_eq!(
            iso_grub_cfg(3, false, "quiet"),
            "set default=0\nset timeout=3\nmenuentry 'Live system' {\n    \
             linux /live/vmlinuz boot=live quiet\n    initrd /live/initrd.img\n}\n"
        );
        assert!(iso_grub_cfg(3, true, "").contains("terminal_output console serial\nmenuentry"));
    }

    #[test]
    fn vfat_id_is_stored_little_endian() {
        assert_eq!(vfat_volume_id("ABCD-1234"), Some([0x34, 0x12, 0xcd, 0xab]));
        assert_eq!(vfat_volume_id("abcd-12"), None);
        assert_eq!(vfat_volume_id("ABCD-123G"), None);
    }
}
