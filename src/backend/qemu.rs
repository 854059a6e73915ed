//! The QEMU backend: `qemu-system-x86_64 -M microvm`, direct kernel boot
//! through the PVH entry (no firmware), virtio-mmio devices only.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use kiln_agent::AGENT_PORT_NAME;

use super::{spawn_child, Backend, Vm, VmSpec};

/// qemu-system-x86_64: `$KILN_QEMU`, else from PATH.
pub fn binary() -> Result<PathBuf> {
    match std::env::var_os("KILN_QEMU").filter(|v| !v.is_empty()) {
        Some(p) => Ok(PathBuf::from(p)),
        None => which("qemu-system-x86_64").context(
            "qemu-system-x86_64 not found: install it with 'sudo apt-get install qemu-system-x86'",
        ),
    }
}

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
        // With shares, the guest's memory is a shared memfd that vhost-user
        // backends (virtiofsd) can map; without, plain anonymous memory is
        // faster to set up.
        if spec.shares.is_empty() {
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
                escape(&d.path.to_string_lossy()),
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
            &format!(
                "socket,id=agent,path={}",
                escape(&spec.agent_socket.to_string_lossy())
            ),
        ]);
        push(&["-device", "virtio-serial-device,max_ports=2"]);
        push(&[
            "-device",
            &format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
        ]);
        push(&["-device", "virtio-rng-device"]);
        for (i, s) in spec.shares.iter().enumerate() {
            push(&[
                "-chardev",
                &format!(
                    "socket,id=fs{i},path={}",
                    escape(&s.socket.to_string_lossy())
                ),
            ]);
            push(&[
                "-device",
                &format!("vhost-user-fs-device,chardev=fs{i},tag={}", s.tag),
            ]);
        }
        a
    }
}

/// QEMU's option syntax doubles commas inside values.
fn escape(s: &str) -> String {
    s.replace(',', ",,")
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Backend for Qemu {
    fn name(&self) -> String {
        format!("qemu ({})", if self.kvm { "kvm" } else { "tcg" })
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
}
