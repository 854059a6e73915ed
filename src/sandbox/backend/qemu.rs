//! The QEMU backend: `qemu-system-x86_64 -M microvm`, direct kernel boot
//! through the PVH entry (no firmware), virtio-mmio devices only.

use std::path::PathBuf;

use anyhow::Result;
use kiln_agent::AGENT_PORT_NAME;

use super::qemu_command::{binary, escape_path, Accel, Display, QemuCommand, Serial};
use super::{spawn_child, Backend, ShareSpec, ShareTransport, Vm, VmSpec};
use crate::sandbox::net;

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
    pub fn command(&self, spec: &VmSpec) -> QemuCommand {
        let mem = spec.mem_mib;
        let mut q = QemuCommand::new(self.binary.clone(), Display::None);
        q.flag("-no-reboot");
        // With virtio-fs shares, the guest's memory is a shared memfd that
        // vhost-user backends (virtiofsd) can map; without, plain anonymous
        // memory is faster to set up.
        let vhost_user = spec
            .shares
            .iter()
            .any(|s| matches!(s, ShareSpec::Virtiofs(_)));
        if !vhost_user {
            q.opt(
                "-M",
                "microvm,x-option-roms=off,rtc=on,acpi=off,isa-serial=on",
            );
        } else {
            q.opt(
                "-M",
                "microvm,x-option-roms=off,rtc=on,acpi=off,isa-serial=on,memory-backend=mem",
            );
            q.opt(
                "-object",
                format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            );
        }
        q.opt("-m", format!("{mem}M"))
            .opt("-smp", spec.cpus.to_string());
        q.accel(if self.kvm {
            Accel::Kvm
        } else {
            Accel::Tcg {
                thread_per_vcpu: false,
            }
        });
        q.serial(Serial::Stdio);
        q.opt("-kernel", spec.kernel.to_string_lossy());
        q.opt("-initrd", spec.initramfs.to_string_lossy());
        let cmdline = match self.tsc_khz {
            Some(khz) => format!("{} tsc_early_khz={khz}", spec.cmdline),
            None => spec.cmdline.clone(),
        };
        q.opt("-append", cmdline);
        for (i, d) in spec.disks.iter().enumerate() {
            let mut drive = format!(
                "if=none,id=disk{i},format={},cache=writeback,discard=unmap",
                d.format
            );
            if d.read_only {
                drive.push_str(",readonly=on");
            }
            q.drive(&d.path, &drive);
            q.opt(
                "-device",
                format!("virtio-blk-device,drive=disk{i},serial={}", d.serial),
            );
        }
        q.opt(
            "-chardev",
            format!("socket,id=agent,path={}", escape_path(&spec.agent_socket)),
        );
        q.opt("-device", "virtio-serial-device,max_ports=2");
        q.opt(
            "-device",
            format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
        );
        q.opt("-device", "virtio-rng-device");
        if spec.net.is_some() {
            // User-mode networking: QEMU's own NAT, no privileges (so it
            // never asks for passt); the guest's IPv4 addresses are its
            // defaults (see sandbox::net), its IPv6 prefix a unique local
            // one rather than the default deprecated site-local fec0::,
            // which programs that pick a global address ignore (passt
            // among them, which then gives a VM inside no IPv6).
            q.opt(
                "-netdev",
                format!("user,id=net0,ipv6-net={}", net::IPV6_NET),
            );
            q.opt(
                "-device",
                format!("virtio-net-device,netdev=net0,mac={}", net::mac_string()),
            );
        }
        for (i, s) in spec.shares.iter().enumerate() {
            match s {
                ShareSpec::Virtiofs(fs) => {
                    q.opt(
                        "-chardev",
                        format!("socket,id=fs{i},path={}", escape_path(&fs.socket_path)),
                    );
                    q.opt(
                        "-device",
                        format!("vhost-user-fs-device,chardev=fs{i},tag={}", fs.tag),
                    );
                }
                ShareSpec::NineP { tag, dir, readonly } => {
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
                    q.opt("-fsdev", fsdev);
                    q.opt(
                        "-device",
                        format!("virtio-9p-device,fsdev=fs{i},mount_tag={tag}"),
                    );
                }
            }
        }
        q
    }

    /// The arguments of [`Qemu::command`].
    #[cfg(test)]
    pub fn args(&self, spec: &VmSpec) -> Vec<String> {
        self.command(spec).args().to_vec()
    }
}

impl Backend for Qemu {
    fn net_needs_passt(&self) -> bool {
        false
    }

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
        let cmd = self.command(spec).into_command();
        spawn_child(cmd, &self.binary.display().to_string(), spec.echo_console)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::net::NetSpec;
    use kiln_vmm::FsConfig;
    use std::path::Path;

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
            net: None,
        }
    }

    fn append(q: &Qemu) -> String {
        let args = q.args(&spec());
        let i = args.iter().position(|a| a == "-append").expect("-append");
        args[i + 1].clone()
    }

    #[test]
    fn net_is_user_networking_on_virtio_mmio_with_kilns_mac() {
        let q = Qemu {
            binary: PathBuf::from("qemu"),
            kvm: true,
            tsc_khz: None,
        };
        let without = q.args(&spec());
        assert!(!without.iter().any(|a| a.contains("netdev")), "{without:?}");
        let with = q.args(&VmSpec {
            net: Some(NetSpec::Builtin),
            ..spec()
        });
        let joined = with.join(" ");
        assert!(
            joined.contains("-netdev user,id=net0,ipv6-net=fd00:0:0:2::/64"),
            "{joined}"
        );
        assert!(
            joined.contains("-device virtio-net-device,netdev=net0,mac=52:54:00:12:34:56"),
            "{joined}"
        );
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

    fn shared(q: &Qemu, share: ShareSpec) -> String {
        let spec = VmSpec {
            shares: vec![share],
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
            ShareSpec::NineP {
                tag: "kiln-share0".into(),
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
            ShareSpec::Virtiofs(FsConfig {
                socket_path: "/r/fs0.sock".into(),
                tag: "kiln-share0".into(),
            }),
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
