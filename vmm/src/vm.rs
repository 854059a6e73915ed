//! The crate's front door for the `kvm` backend: a [`VmConfig`] and a
//! console in, a booted Linux guest with its disks, agent port, shared
//! directories and network, run to the end. The configuration is plain data
//! (see [`crate::config`]); what it names is opened here: the disks, the
//! agent's and passt's sockets, the vhost-user backends, the kernel and
//! initrd.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use crate::config::{DiskConfig, DiskFormat, NetConfig, NetPeer, VmConfig};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::console::{Console, ConsoleError, PortConfig};
use crate::devices::virtio::fs::{Fs, FsError};
use crate::devices::virtio::net::{Net, NetError};
use crate::devices::virtio::rng::Rng;
use crate::vstate::machine::{Exit, Machine, MachineError, Stopper};
use crate::vstate::memory::Backing;

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
    #[error("connecting the agent port to {0}: {1}")]
    AgentPort(PathBuf, std::io::Error),
    #[error("agent port: {0}")]
    Console(#[from] ConsoleError),
    #[error("shared directory '{0}': {1}")]
    Fs(String, FsError),
    #[error("connecting the network to its {0}: {1}")]
    NetConnect(NetPeer, std::io::Error),
    #[error("network ({0}): {1}")]
    Net(NetPeer, NetError),
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
    /// Builds the machine `config` describes, with the guest's serial
    /// console going to `console`.
    pub fn new(config: VmConfig, console: Box<dyn Write + Send>) -> Result<Vm, VmError> {
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
            console,
        )?;
        machine.set_seccomp(config.seccomp);
        let mut cmdline = config.cmdline.trim().to_string();
        let announce = |m: &Machine<_>, cmdline: &mut String| {
            let (base, irq) = m.next_virtio_slot();
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
        };

        for d in &config.disks {
            let file = open_raw_disk(d)?;
            let block = Block::new(file, d.read_only, &d.serial)
                .map_err(|e| VmError::Disk(d.path.clone(), e))?;
            announce(&machine, &mut cmdline);
            machine.add_virtio(Box::new(block))?;
        }
        if let Some(agent) = config.agent_port {
            let stream = UnixStream::connect(&agent.socket)
                .map_err(|e| VmError::AgentPort(agent.socket.clone(), e))?;
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
                    host: Some(stream.into()),
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
        if let Some(net) = &config.net {
            let device = connect_net(net)?;
            announce(&machine, &mut cmdline);
            machine.add_virtio(Box::new(device))?;
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

/// Builds the VM described by `config`, its serial console going to
/// `console`, and runs it to its end.
pub fn run(config: VmConfig, console: Box<dyn Write + Send>) -> Result<Exit, VmError> {
    Vm::new(config, console)?.run()
}

/// The network device, on its peer's stream socket.
fn connect_net(net: &NetConfig) -> Result<Net, VmError> {
    let stream = match &net.peer {
        NetPeer::Socket(path) => UnixStream::connect(path),
        NetPeer::Fd(fd) => take_stream_socket(*fd),
    }
    .map_err(|e| VmError::NetConnect(net.peer.clone(), e))?;
    Net::new(stream, net.mac).map_err(|e| VmError::Net(net.peer.clone(), e))
}

/// Takes over the inherited descriptor `fd` after checking it is a Unix
/// stream socket, and makes it close-on-exec.
fn take_stream_socket(fd: i32) -> std::io::Result<UnixStream> {
    let option = |name: libc::c_int| -> std::io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes to `value`, which
        // has that size; a descriptor that is not an open socket is an
        // error return, touching nothing.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r == 0 {
            Ok(value)
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    if option(libc::SO_DOMAIN)? != libc::AF_UNIX || option(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a Unix stream socket",
        ));
    }
    // SAFETY: `fd` is open (getsockopt answered for it) and was passed to
    // this process for the VM alone, which owns it from here on; nothing
    // else in the process uses or closes it.
    let stream = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // Inherited without close-on-exec; the VMM starts nothing, but a
    // descriptor it owns should not leak if it ever does.
    // SAFETY: F_SETFD on a descriptor this function owns; no memory passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// Opens a disk, refusing formats other than raw that would be silently
/// misread. The format is the one in the config, decided by whoever wrote
/// it (kiln, from the image's magic or the user's `format=`): reading the
/// image's first bytes again here would only tell the same thing.
fn open_raw_disk(disk: &DiskConfig) -> Result<File, VmError> {
    match disk.format {
        DiskFormat::Raw => {}
        DiskFormat::Qcow2 => return Err(VmError::Qcow2(disk.path.clone())),
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(!disk.read_only)
        .open(&disk.path)
        .map_err(|e| VmError::Open(disk.path.clone(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: PathBuf, format: DiskFormat, read_only: bool) -> DiskConfig {
        DiskConfig {
            path,
            format,
            read_only,
            serial: "kiln0".into(),
        }
    }

    #[test]
    fn qcow2_disks_are_refused_with_the_conversion_to_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Refused by its format alone, before it is opened (it need not
        // exist).
        let q = dir.path().join("disk.qcow2");
        let err = open_raw_disk(&disk(q, DiskFormat::Qcow2, true)).expect_err("qcow2 accepted");
        let msg = err.to_string();
        assert!(msg.contains("qemu-img convert -O raw"), "{msg}");
        assert!(msg.contains("disk.qcow2"), "{msg}");

        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, vec![0u8; 4096]).expect("write");
        assert!(open_raw_disk(&disk(raw.clone(), DiskFormat::Raw, true)).is_ok());
        assert!(open_raw_disk(&disk(raw, DiskFormat::Raw, false)).is_ok());
        let missing = dir.path().join("missing.raw");
        let err = open_raw_disk(&disk(missing, DiskFormat::Raw, true)).expect_err("opened");
        assert!(err.to_string().contains("missing.raw"), "{err}");
    }

    #[test]
    fn the_network_connects_to_its_socket_or_names_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("passt.sock");
        let mac = [0x52, 0x54, 0, 0, 0, 1];
        let at = |peer: NetPeer, mac| connect_net(&NetConfig { peer, mac });
        let err = at(NetPeer::Socket(socket.clone()), mac)
            .err()
            .expect("connected to nothing");
        assert!(matches!(err, VmError::NetConnect(..)), "{err}");
        assert!(err.to_string().contains("passt.sock"), "{err}");

        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        assert!(at(NetPeer::Socket(socket.clone()), mac).is_ok());
        let err = at(NetPeer::Socket(socket), [0xff; 6])
            .err()
            .expect("a broadcast MAC accepted");
        assert!(err.to_string().contains("ff:ff:ff:ff:ff:ff"), "{err}");
    }

    /// An inherited descriptor is taken only if it is a Unix stream
    /// socket; anything else is named and left alone.
    #[test]
    fn the_network_takes_over_an_inherited_stream_socket_only() {
        use std::os::fd::{AsRawFd, IntoRawFd};
        let mac = [0x52, 0x54, 0, 0, 0, 1];
        let (ours, _peer) = UnixStream::pair().expect("pair");
        let fd = ours.into_raw_fd();
        assert!(connect_net(&NetConfig {
            peer: NetPeer::Fd(fd),
            mac
        })
        .is_ok());

        let file = tempfile::tempfile().expect("tempfile");
        let err = connect_net(&NetConfig {
            peer: NetPeer::Fd(file.as_raw_fd()),
            mac,
        })
        .err()
        .expect("a file taken as the network");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("descriptor {}", file.as_raw_fd())),
            "{msg}"
        );
        let datagram = std::os::unix::net::UnixDatagram::unbound().expect("datagram");
        let err = connect_net(&NetConfig {
            peer: NetPeer::Fd(datagram.as_raw_fd()),
            mac,
        })
        .err()
        .expect("a datagram socket taken");
        assert!(
            err.to_string().contains("not a Unix stream socket"),
            "{err}"
        );
        // Both are still open: a refused descriptor is not closed.
        assert!(file.metadata().is_ok());
    }
}
