//! The seam between kiln and the hypervisor that runs its guest. Both
//! backends boot the same kernel and initramfs with the same virtio-mmio
//! devices, so the guest (and the agent) cannot tell them apart.

pub mod kvm;
pub mod qemu;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use anyhow::{bail, Result};
use kiln_vmm::host::{self, KvmSupport};

use crate::console::Console;
use crate::disk::DiskFormat;

/// Everything a backend needs to start the build VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Uncompressed kernel with a PVH entry point.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Kernel command line, without the device announcements the backend adds.
    pub cmdline: String,
    pub mem_mib: u64,
    pub cpus: u32,
    /// virtio-blk disks in the order the guest should see them (vda, vdb, ...).
    pub disks: Vec<DiskSpec>,
    /// virtio-fs devices served by vhost-user backends (virtiofsd).
    pub shares: Vec<ShareSpec>,
    /// Unix socket kiln listens on; the VM's agent console port connects to it.
    pub agent_socket: PathBuf,
    /// Echo the guest console to stderr as it arrives.
    pub echo_console: bool,
}

#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub readonly: bool,
    /// virtio-blk serial (at most 20 bytes): the guest's /dev/disk/by-id name.
    pub serial: String,
}

#[derive(Debug, Clone)]
pub struct ShareSpec {
    /// The vhost-user socket of the virtiofsd serving this share.
    pub socket: PathBuf,
    pub tag: String,
}

/// A started VM.
pub trait Vm {
    /// Whether the VM has ended, and how.
    fn try_wait(&mut self) -> Result<Option<ExitStatus>>;
    /// The guest's serial console.
    fn console(&self) -> &Console;
    /// What the hypervisor itself reported on its error stream, if anything.
    fn diagnostics(&self) -> Vec<String>;
}

pub trait Backend {
    fn name(&self) -> String;
    fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// kiln-vmm where KVM runs unmodified guests, otherwise QEMU.
    Auto,
    /// kiln-vmm, kiln's own KVM microVM.
    Kvm,
    /// QEMU's microvm machine, with KVM when it is usable, else TCG.
    Qemu,
}

/// The KVM device kiln probes; `KILN_KVM_DEVICE` overrides it (useful to
/// check the fallback path, or for a host with the device elsewhere).
pub fn kvm_device() -> PathBuf {
    std::env::var_os("KILN_KVM_DEVICE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"))
}

/// Picks the backend. The note, if any, is the one line kiln prints to say
/// it is falling back to something slower.
pub fn select(choice: BackendChoice) -> Result<(Box<dyn Backend>, Option<String>)> {
    let device = kvm_device();
    let kvm = host::probe(&device, Path::new("/sys/module"));
    let kiln_vmm = match choice {
        BackendChoice::Kvm if !kvm.is_usable() => bail!(
            "the kvm backend cannot run here: {}; use '--backend qemu' \
             (software emulation) instead",
            kvm.explain(&device)
        ),
        BackendChoice::Kvm => true,
        BackendChoice::Auto => kvm.is_usable(),
        BackendChoice::Qemu => false,
    };
    if kiln_vmm {
        return Ok((Box::new(kvm::Kvm::new()?), None));
    }
    let qemu = qemu::Qemu::find(kvm.is_usable())?;
    let note = match &kvm {
        KvmSupport::Usable => None,
        other => Some(format!(
            "kiln: using QEMU with TCG software emulation (slower): {}",
            other.explain(&device)
        )),
    };
    Ok((Box::new(qemu), note))
}
