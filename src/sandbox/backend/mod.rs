//! The seam between kiln and the hypervisor that runs its guest. Both
//! backends boot the same kernel and initramfs with the same virtio-mmio
//! devices, so the guest (and the agent) cannot tell them apart.

pub mod kvm;
pub mod qemu;
pub mod qemu_command;
mod tsc;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{bail, Context, Result};
use kiln_vmm::host::{self, KvmSupport};
use kiln_vmm::{DiskConfig, DiskFormat, FsConfig, VmError};

use crate::sandbox::net::NetSpec;
use crate::util::process::{detach_and_tie, Guarded};
use crate::util::stream_tail::StreamTail;

/// Everything a backend needs to start the build VM. The sizes are in
/// range for both backends: the flags that set them are checked as they
/// are parsed (`cli::vm_args`).
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Uncompressed kernel with a PVH entry point.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Kernel command line, without the device announcements the backend adds.
    pub cmdline: String,
    pub mem_mib: u32,
    pub cpus: u8,
    /// virtio-blk disks in the order the guest should see them (vda, vdb,
    /// ...), as kiln-vmm takes them; QEMU gets the same fields.
    pub disks: Vec<DiskConfig>,
    /// Shared directories, each through the device the backend takes.
    pub shares: Vec<ShareSpec>,
    /// Unix socket kiln listens on; the VM's agent console port connects to it.
    pub agent_socket: PathBuf,
    /// Echo the guest console to stderr as it arrives.
    pub echo_console: bool,
    /// A virtio-net interface on user-mode networking (see `sandbox::net`).
    pub net: Option<NetSpec>,
}

/// A shared directory and the device it reaches the guest through; the
/// guest mounts it by its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShareSpec {
    /// virtio-fs, served by a vhost-user backend (virtiofsd) on the
    /// config's socket, as kiln-vmm takes it; QEMU gets the same fields.
    Virtiofs(FsConfig),
    /// virtio-9p, served by QEMU itself from `dir`.
    NineP {
        tag: String,
        dir: PathBuf,
        readonly: bool,
    },
}

impl ShareSpec {
    /// The mount tag the guest finds the share by.
    pub fn tag(&self) -> &str {
        match self {
            ShareSpec::Virtiofs(fs) => &fs.tag,
            ShareSpec::NineP { tag, .. } => tag,
        }
    }
}

/// Which share device a backend takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareTransport {
    Virtiofs,
    NineP,
}

/// A started VM.
pub trait Vm {
    /// Whether the VM has ended, and how.
    fn try_wait(&mut self) -> Result<Option<ExitStatus>>;
    /// The guest's serial console.
    fn console(&self) -> &StreamTail;
    /// What the hypervisor itself reported on its error stream, if anything.
    fn diagnostics(&self) -> Vec<String>;
}

/// A hypervisor running as kiln's child process (QEMU, or kiln-vmm in
/// `kiln __vmm`): its stdout is the guest's serial console, its stderr what
/// it says about itself, and it is killed with its process group on drop.
struct ChildVm {
    process: Guarded,
    console: StreamTail,
    diagnostics: StreamTail,
}

impl Vm for ChildVm {
    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.process.try_wait()?)
    }

    fn console(&self) -> &StreamTail {
        &self.console
    }

    fn diagnostics(&self) -> Vec<String> {
        self.diagnostics.tail(20)
    }
}

/// Starts `cmd` as a [`ChildVm`]; `what` names it in the error if it
/// cannot start.
fn spawn_child(cmd: Command, what: &str, echo_console: bool) -> Result<Box<dyn Vm>> {
    let mut process = spawn_hypervisor(cmd, what)?;
    let console = StreamTail::new();
    let diagnostics = StreamTail::new();
    if let Some(out) = process.child.stdout.take() {
        console.capture(out, echo_console);
    }
    if let Some(err) = process.child.stderr.take() {
        diagnostics.capture(err, false);
    }
    Ok(Box::new(ChildVm {
        process,
        console,
        diagnostics,
    }))
}

/// Starts a hypervisor (or `kiln boot`'s QEMU): no stdin, its stdout (the
/// guest's serial console) and stderr piped for the caller to read, and
/// killed with its process group when the [`Guarded`] is dropped or kiln
/// dies. `what` names it in the error if it cannot start.
pub fn spawn_hypervisor(mut cmd: Command, what: &str) -> Result<Guarded> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    detach_and_tie(&mut cmd);
    let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    Ok(Guarded::new(child))
}

pub trait Backend {
    fn name(&self) -> String;
    /// The device `--share` goes through on this backend, and why, in the
    /// words of the one line kiln prints when there are shares.
    fn share_transport(&self) -> (ShareTransport, &'static str);
    /// Whether `--net` needs passt started for the VM (else the
    /// hypervisor serves user-mode networking itself).
    fn net_needs_passt(&self) -> bool;
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

/// The KVM device and whether it runs unmodified guests.
pub fn probe_kvm() -> (PathBuf, KvmSupport) {
    let device = kvm_device();
    let kvm = host::probe(&device, Path::new("/sys/module"));
    (device, kvm)
}

/// Picks the backend for a VM with `disks`. The note, if any, is the one
/// line kiln prints to say it is falling back to something slower. An
/// explicit `--backend kvm` that cannot run here, or with a qcow2 disk
/// (kiln-vmm reads raw images only), is an error.
pub fn select(
    choice: BackendChoice,
    disks: &[DiskConfig],
    net: bool,
) -> Result<(Box<dyn Backend>, Option<String>)> {
    let (device, kvm) = probe_kvm();
    let pick = pick(choice, &kvm, &device, disks)?;
    let passt_found = !(net && pick == Pick::KilnVmm) || crate::sandbox::net::find_passt().is_ok();
    let pick = for_net(pick, choice, passt_found);
    match pick {
        Pick::KilnVmm => Ok((Box::new(kvm::Kvm::new()?), None)),
        Pick::Qemu(note) => Ok((Box::new(qemu::Qemu::find(kvm.is_usable())?), note)),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Pick {
    KilnVmm,
    /// QEMU, with the line that says why if it is a fallback.
    Qemu(Option<String>),
}

/// kiln-vmm's network is passt: where it is missing, auto takes QEMU's
/// own user networking (an explicit kvm then fails, naming passt).
fn for_net(pick: Pick, choice: BackendChoice, passt_found: bool) -> Pick {
    match pick {
        Pick::KilnVmm if choice == BackendChoice::Auto && !passt_found => Pick::Qemu(Some(
            "kiln: using QEMU with KVM for --net: kiln-vmm's network needs passt, which \
             is not installed ('sudo apt-get install passt')"
                .into(),
        )),
        p => p,
    }
}

fn pick(
    choice: BackendChoice,
    kvm: &KvmSupport,
    device: &Path,
    disks: &[DiskConfig],
) -> Result<Pick> {
    let qcow2 = disks.iter().find(|d| d.format == DiskFormat::Qcow2);
    match (choice, kvm) {
        // kiln-vmm takes raw images only: refused here, before anything
        // starts, in kiln-vmm's own words (which name the conversion).
        (BackendChoice::Kvm, KvmSupport::Usable) => match qcow2 {
            None => Ok(Pick::KilnVmm),
            Some(d) => bail!(VmError::Qcow2(d.path.clone())),
        },
        (BackendChoice::Kvm, _) => bail!(
            "the kvm backend cannot run here: {}; use '--backend qemu' \
             (software emulation) instead",
            kvm.explain(device)
        ),
        (BackendChoice::Auto, KvmSupport::Usable) => match qcow2 {
            None => Ok(Pick::KilnVmm),
            // kiln-vmm takes raw images only; QEMU with KVM reads qcow2.
            Some(d) => Ok(Pick::Qemu(Some(format!(
                "kiln: using QEMU with KVM: kiln-vmm takes raw disks only and {} is qcow2",
                d.path.display()
            )))),
        },
        (_, KvmSupport::Usable) => Ok(Pick::Qemu(None)),
        (_, other) => Ok(Pick::Qemu(Some(format!(
            "kiln: using QEMU with TCG software emulation (slower): {}",
            other.explain(device)
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(format: DiskFormat) -> DiskConfig {
        DiskConfig {
            path: PathBuf::from("/d/disk.img"),
            format,
            read_only: false,
            serial: "kiln0".into(),
        }
    }

    #[test]
    fn net_without_passt_takes_qemu_under_auto_only() {
        use BackendChoice::{Auto, Kvm};
        assert_eq!(for_net(Pick::KilnVmm, Auto, true), Pick::KilnVmm);
        assert_eq!(for_net(Pick::KilnVmm, Kvm, false), Pick::KilnVmm);
        match for_net(Pick::KilnVmm, Auto, false) {
            Pick::Qemu(Some(note)) => assert!(note.contains("apt-get install passt"), "{note}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(for_net(Pick::Qemu(None), Auto, false), Pick::Qemu(None));
    }

    #[test]
    fn auto_picks_kiln_vmm_where_kvm_runs_unmodified_guests() {
        let dev = Path::new("/dev/kvm");
        let usable = KvmSupport::Usable;
        let raw = [disk(DiskFormat::Raw)];
        let pick = |c, k: &KvmSupport, d: &[DiskConfig]| pick(c, k, dev, d).expect("pick");
        assert_eq!(pick(BackendChoice::Auto, &usable, &raw), Pick::KilnVmm);
        assert_eq!(pick(BackendChoice::Kvm, &usable, &raw), Pick::KilnVmm);
        assert_eq!(pick(BackendChoice::Qemu, &usable, &raw), Pick::Qemu(None));

        // A qcow2 disk: auto says in one line why it takes QEMU; an explicit
        // kvm is refused with kiln-vmm's error, which names the conversion.
        let qcow2 = [disk(DiskFormat::Raw), disk(DiskFormat::Qcow2)];
        match pick(BackendChoice::Auto, &usable, &qcow2) {
            Pick::Qemu(Some(note)) => {
                assert!(note.contains("/d/disk.img is qcow2"), "{note}");
                assert!(note.contains("QEMU with KVM"), "{note}");
            }
            other => panic!("{other:?}"),
        }
        let e = super::pick(BackendChoice::Kvm, &usable, dev, &qcow2).expect_err("kvm on qcow2");
        let msg = e.to_string();
        assert!(msg.contains("/d/disk.img is a qcow2 image"), "{msg}");
        assert!(msg.contains("qemu-img convert -O raw /d/disk.img"), "{msg}");

        let pvm = KvmSupport::Restricted("it is provided by kvm_pvm".into());
        for c in [BackendChoice::Auto, BackendChoice::Qemu] {
            match pick(c, &pvm, &raw) {
                Pick::Qemu(Some(note)) => {
                    assert!(note.contains("TCG"), "{note}");
                    assert!(note.contains("kvm_pvm"), "{note}");
                }
                other => panic!("{other:?}"),
            }
        }
        let e = super::pick(BackendChoice::Kvm, &pvm, dev, &raw).expect_err("kvm on pvm");
        let msg = e.to_string();
        assert!(msg.contains("the kvm backend cannot run here"), "{msg}");
        assert!(msg.contains("kvm_pvm"), "{msg}");
        assert!(msg.contains("use '--backend qemu'"), "{msg}");
    }
}
