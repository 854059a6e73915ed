//! The crate's front door for the `kvm` backend: a [`VmConfig`] in, a
//! booted Linux guest with its disks, agent port and shared directories,
//! run to the end.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::console::{Console, ConsoleError, PortConfig};
use crate::devices::virtio::fs::{Fs, FsError};
use crate::devices::virtio::rng::Rng;
use crate::vstate::machine::{Exit, Machine, MachineError, Stopper};
use crate::vstate::memory::Backing;

/// The first bytes of a qcow2 image.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// One virtio-blk disk.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// A raw image file.
    pub path: PathBuf,
    pub read_only: bool,
    /// The guest sees it as /dev/disk/by-id/virtio-SERIAL (at most 20 bytes).
    pub serial: String,
}

/// The agent's channel: a named virtio-console port whose host side is
/// `stream` (a connected Unix socket, a pipe, any descriptor).
#[derive(Debug)]
pub struct AgentPort {
    /// The name the guest finds in /sys/class/virtio-ports/*/name.
    pub name: String,
    pub stream: OwnedFd,
}

/// A shared directory served by a vhost-user-fs backend (virtiofsd)
/// listening on `socket_path`; the guest mounts it by `tag`.
#[derive(Debug, Clone)]
pub struct FsConfig {
    pub socket_path: PathBuf,
    pub tag: String,
}

pub struct VmConfig {
    /// An uncompressed vmlinux.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The kernel command line; the virtio-mmio devices are appended.
    pub cmdline: String,
    pub mem_mib: u32,
    pub vcpus: u8,
    pub disks: Vec<DiskConfig>,
    pub agent_port: Option<AgentPort>,
    pub fs: Vec<FsConfig>,
    /// Where the guest's serial console goes.
    pub console: Box<dyn Write + Send>,
    /// Run the VMM's threads under seccomp filters (off only to debug).
    pub seccomp: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("opening {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error(
        "{0} is a qcow2 image; kiln-vmm takes raw disks: convert it with \
         'qemu-img convert -O raw {0} OUT.raw'"
    )]
    Qcow2(PathBuf),
    #[error("disk {0}: {1}")]
    Disk(PathBuf, BlockError),
    #[error("agent port: {0}")]
    Console(#[from] ConsoleError),
    #[error("shared directory '{0}': {1}")]
    Fs(String, FsError),
    #[error("{0} MiB of guest memory is too little (at least 16 MiB)")]
    Memory(u32),
    #[error("virtio-fs needs guest memory that virtiofsd can map, and it is private")]
    PrivateMemory,
}

/// A machine built from a [`VmConfig`], ready to run.
pub struct Vm {
    machine: Machine<Box<dyn Write + Send>>,
}

impl Vm {
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        if config.mem_mib < 16 {
            return Err(VmError::Memory(config.mem_mib));
        }
        // Shared memory only for the vhost-user backends that map it.
        let backing = if config.fs.is_empty() {
            Backing::Private
        } else {
            Backing::Shared
        };
        let mut machine = Machine::with_memory(
            u64::from(config.mem_mib) << 20,
            backing,
            config.vcpus,
            config.console,
        )?;
        machine.set_seccomp(config.seccomp);
        let mut cmdline = config.cmdline.trim().to_string();
        let announce = |m: &Machine<_>, cmdline: &mut String| {
            let (base, irq) = m.next_virtio_slot();
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
        };

        for d in &config.disks {
            let file = open_raw_disk(&d.path, d.read_only)?;
            let block = Block::new(file, d.read_only, &d.serial)
                .map_err(|e| VmError::Disk(d.path.clone(), e))?;
            announce(&machine, &mut cmdline);
            machine.add_virtio(Box::new(block))?;
        }
        if let Some(agent) = config.agent_port {
            // Port 0 stays unnamed and unconnected; the agent's port is 1,
            // as with QEMU's virtio-serial (/dev/vport*p1).
            let console = Console::new(vec![
                PortConfig {
                    name: String::new(),
                    console: false,
                    host: None,
                },
                PortConfig {
                    name: agent.name,
                    console: false,
                    host: Some(agent.stream),
                },
            ])?;
            announce(&machine, &mut cmdline);
            machine.add_virtio(Box::new(console))?;
        }
        for f in &config.fs {
            let (mem, memfd) = machine.memory();
            let memfd = memfd.ok_or(VmError::PrivateMemory)?;
            let fs = Fs::connect(&f.socket_path, &f.tag, mem.clone(), memfd)
                .map_err(|e| VmError::Fs(f.tag.clone(), e))?;
            announce(&machine, &mut cmdline);
            machine.add_virtio(Box::new(fs))?;
        }
        // Entropy, so the guest's getrandom does not wait at boot.
        let urandom = File::open("/dev/urandom")
            .map_err(|e| VmError::Open(PathBuf::from("/dev/urandom"), e))?;
        announce(&machine, &mut cmdline);
        machine.add_virtio(Box::new(Rng::new(urandom)))?;

        let mut kernel =
            File::open(&config.kernel).map_err(|e| VmError::Open(config.kernel.clone(), e))?;
        let initrd = match &config.initrd {
            Some(p) => Some(std::fs::read(p).map_err(|e| VmError::Open(p.clone(), e))?),
            None => None,
        };
        machine.load_linux(&mut kernel, initrd.as_deref(), &cmdline)?;
        Ok(Vm { machine })
    }

    /// Stops the VM from another thread.
    pub fn stopper(&self) -> Stopper {
        self.machine.stopper()
    }

    /// Runs the guest to its end (blocking).
    pub fn run(mut self) -> Result<Exit, VmError> {
        Ok(self.machine.run()?)
    }
}

/// Builds the VM described by `config` and runs it to its end.
pub fn run(config: VmConfig) -> Result<Exit, VmError> {
    Vm::new(config)?.run()
}

/// Opens a disk image, refusing formats other than raw that would be
/// silently misread.
fn open_raw_disk(path: &Path, read_only: bool) -> Result<File, VmError> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| VmError::Open(path.to_path_buf(), e))?;
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_ok() && &magic == QCOW2_MAGIC {
        return Err(VmError::Qcow2(path.to_path_buf()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_disks_are_refused_with_the_conversion_to_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = dir.path().join("disk.qcow2");
        let mut data = QCOW2_MAGIC.to_vec();
        data.extend_from_slice(&[0, 0, 0, 3]);
        data.resize(4096, 0);
        std::fs::write(&q, &data).expect("write");
        let err = open_raw_disk(&q, true).expect_err("qcow2 accepted");
        let msg = err.to_string();
        assert!(msg.contains("qemu-img convert -O raw"), "{msg}");
        assert!(msg.contains("disk.qcow2"), "{msg}");

        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, vec![0u8; 4096]).expect("write");
        assert!(open_raw_disk(&raw, true).is_ok());
        // Shorter than the magic: raw, not an error.
        std::fs::write(&raw, b"ab").expect("write");
        assert!(open_raw_disk(&raw, false).is_ok());
    }
}
