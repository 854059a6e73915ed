//! The QEMU backend: `qemu-system-x86_64 -M microvm`, direct kernel boot
//! through the PVH entry (no firmware), virtio-mmio devices only.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use kiln_agent::AGENT_PORT_NAME;

use super::{spawn_child, Backend, ShareDevice, ShareTransport, Vm, VmSpec};
use crate::which::which;

/// qemu-system-x86_64: `$KILN_QEMU`, else from PATH.
pub fn binary() -> Result<PathBuf> {
    match std::env::var_os("KILN_QEMU").filter(|v| !v.is_empty()) {
        Some(p) => Ok(PathBuf::from(p)),
        None => which("qemu-system-x86_64").context(
            "qemu-system-x86_64 not found: install it with 'sudo apt-get install qemu-system-x86'",
        ),
    }
}

#[derive(Clone)]
pub struct Qemu {
    binary: PathBuf,
    kvm: bool,
    /// Under TCG, the host's TSC rate for the guest's `tsc_early_khz=`
    /// (see tsc.rs); `None` with KVM (kvmclock) or a TSC of unknown rate.
    tsc_khz: Option<u32>,
}

impl Qemu {
    /// Finds qemu-system-x86_64 (or `$KILN_QEMU`).
    pub fn find(kvm: bool) -> Result<Qemu> {
        Ok(Qemu {
            binary: binary()?,
            kvm,
            tsc_khz: if kvm {
                None
            } else {
                super::tsc::host_tsc_khz()
            },
        })
    }

    /// The full QEMU command line for `spec`.
    pub fn args(&self, spec: &VmSpec) -> Vec<String> {
        let mem = spec.mem_mib;
        let mut a: Vec<String> = Vec::new();
        let mut push = |parts: &[&str]| a.extend(parts.iter().map(|s| s.to_string()));
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        // With virtio-fs shares, the guest's memory is a shared memfd that
        // vhost-user backends (virtiofsd) can map; without, plain anonymous
        // memory is faster to set up.
        let vhost_user = spec
            .shares
            .iter()
            .any(|s| matches!(s.device, ShareDevice::Virtiofs { .. }));
        if !vhost_user {
            push(&[
                "-M",
                "microvm,x-option-roms=off,rtc=on,acpi=off,isa-serial=on",
            ]);
        } else {
            push(&[
                "-M",
                "microvm,x-option-roms=off,rtc=on,acpi=off,isa-serial=on,memory-backend=mem",
            ]);
            push(&[
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            ]);
        }
        push(&["-m", &format!("{mem}M"), "-smp", &spec.cpus.to_string()]);
        if self.kvm {
            push(&["-accel", "kvm", "-cpu", "host"]);
        } else {
            push(&["-accel", "tcg", "-cpu", "max"]);
        }
        push(&["-serial", "stdio"]);
        push(&["-kernel", &spec.kernel.to_string_lossy()]);
        push(&["-initrd", &spec.initramfs.to_string_lossy()]);
        let cmdline = match self.tsc_khz {
            Some(khz) => format!("{} tsc_early_khz={khz}", spec.cmdline),
            None => spec.cmdline.clone(),
        };
        push(&["-append", &cmdline]);
        for (i, d) in spec.disks.iter().enumerate() {
            let mut drive = format!(
                "file={},if=none,id=disk{i},format={},cache=writeback,discard=unmap",
                escape_path(&d.path),
                d.format
            );
            if d.readonly {
                drive.push_str(",readonly=on");
            }
            push(&["-drive", &drive]);
            push(&[
                "-device",
                &format!("virtio-blk-device,drive=disk{i},serial={}", d.serial),
            ]);
        }
        push(&[
            "-chardev",
            &format!("socket,id=agent,path={}", escape_path(&spec.agent_socket)),
        ]);
        push(&["-device", "virtio-serial-device,max_ports=2"]);
        push(&[
            "-device",
            &format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
        ]);
        push(&["-device", "virtio-rng-device"]);
        for (i, s) in spec.shares.iter().enumerate() {
            match &s.device {
                ShareDevice::Virtiofs { socket } => {
                    push(&[
                        "-chardev",
                        &format!("socket,id=fs{i},path={}", escape_path(socket)),
                    ]);
                    push(&[
                        "-device",
                        &format!("vhost-user-fs-device,chardev=fs{i},tag={}", s.tag),
                    ]);
                }
                ShareDevice::NineP { dir, readonly } => {
                    // security_model=none: files are created as the user
                    // kiln runs as, and a guest chown that user may not make
                    // is not an error (as with virtiofsd unprivileged).
                    let mut fsdev = format!(
                        "local,id=fs{i},path={},security_model=none",
                        escape_path(dir)
                    );
                    if *readonly {
                        fsdev.push_str(",readonly=on");
                    }
                    push(&["-fsdev", &fsdev]);
                    push(&[
                        "-device",
                        &format!("virtio-9p-device,fsdev=fs{i},mount_tag={}", s.tag),
                    ]);
                }
            }
        }
        a
    }
}

/// A path as a value in a QEMU option list (`-drive file=PATH,if=none`),
/// where a comma inside a value is written twice.
pub fn escape_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

impl Backend for Qemu {
    fn name(&self) -> String {
        format!("qemu ({})", if self.kvm { "kvm" } else { "tcg" })
    }

    fn share_transport(&self) -> (ShareTransport, &'static str) {
        if self.kvm {
            (
                ShareTransport::Virtiofs,
                "virtio-fs through virtiofsd (QEMU runs guest code on KVM, which sees \
                 virtiofsd's writes to guest memory)",
            )
        } else {
            // TCG drops translated code when a page is written through
            // QEMU; virtiofsd writes file data into guest memory from its
            // own process, so code read through virtio-fs could run stale.
            (
                ShareTransport::NineP,
                "virtio-9p served by QEMU (under TCG, code read through virtio-fs can \
                 run stale: virtiofsd's writes to guest memory bypass QEMU's code cache)",
            )
        }
    }

    fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.args(spec));
        spawn_child(cmd, &self.binary.display().to_string(), spec.echo_console)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ShareSpec;

    fn spec() -> VmSpec {
        VmSpec {
            kernel: PathBuf::from("/k"),
            initramfs: PathBuf::from("/i"),
            cmdline: "console=ttyS0".into(),
            mem_mib: 512,
            cpus: 1,
            disks: Vec::new(),
            shares: Vec::new(),
            agent_socket: PathBuf::from("/s"),
            echo_console: false,
        }
    }

    fn append(q: &Qemu) -> String {
        let args = q.args(&spec());
        let i = args.iter().position(|a| a == "-append").expect("-append");
        args[i + 1].clone()
    }

    #[test]
    fn tcg_guests_get_the_host_tsc_rate_and_kvm_guests_do_not() {
        let tcg = Qemu {
            binary: PathBuf::from("qemu"),
            kvm: false,
            tsc_khz: Some(2_100_000),
        };
        assert_eq!(append(&tcg), "console=ttyS0 tsc_early_khz=2100000");
        let kvm = Qemu {
            binary: PathBuf::from("qemu"),
            kvm: true,
            tsc_khz: None,
        };
        assert_eq!(append(&kvm), "console=ttyS0");
        let unknown = Qemu { kvm: false, ..kvm };
        assert_eq!(append(&unknown), "console=ttyS0");
    }

    #[test]
    fn commas_in_paths_are_doubled() {
        assert_eq!(escape_path(Path::new("/a,b/c.raw")), "/a,,b/c.raw");
        assert_eq!(escape_path(Path::new("/a/b.raw")), "/a/b.raw");
        assert_eq!(escape_path(Path::new(",,")), ",,,,");
    }

    fn shared(q: &Qemu, device: ShareDevice) -> String {
        let spec = VmSpec {
            shares: vec![ShareSpec {
                tag: "kiln-share0".into(),
                device,
            }],
            ..spec()
        };
        q.args(&spec).join(" ")
    }

    #[test]
    fn shares_are_9p_under_tcg_and_virtio_fs_under_kvm() {
        let tcg = Qemu {
            binary: PathBuf::from("qemu"),
            kvm: false,
            tsc_khz: None,
        };
        let kvm = Qemu {
            kvm: true,
            ..tcg.clone()
        };
        assert_eq!(tcg.share_transport().0, ShareTransport::NineP);
        assert_eq!(kvm.share_transport().0, ShareTransport::Virtiofs);

        let nine_p = shared(
            &tcg,
            ShareDevice::NineP {
                dir: "/a,b".into(),
                readonly: true,
            },
        );
        assert!(
            nine_p.contains("-fsdev local,id=fs0,path=/a,,b,security_model=none,readonly=on"),
            "{nine_p}"
        );
        assert!(
            nine_p.contains("-device virtio-9p-device,fsdev=fs0,mount_tag=kiln-share0"),
            "{nine_p}"
        );
        // QEMU serves 9p itself: no shared memfd, no vhost-user.
        assert!(!nine_p.contains("memory-backend"), "{nine_p}");

        let fs = shared(
            &kvm,
            ShareDevice::Virtiofs {
                socket: "/r/fs0.sock".into(),
            },
        );
        assert!(fs.contains("memory-backend-memfd,id=mem"), "{fs}");
        assert!(
            fs.contains("-chardev socket,id=fs0,path=/r/fs0.sock"),
            "{fs}"
        );
        assert!(
            fs.contains("vhost-user-fs-device,chardev=fs0,tag=kiln-share0"),
            "{fs}"
        );
    }
}
