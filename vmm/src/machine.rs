//! A machine: a KVM VM with guest memory, one vCPU, the serial console and
//! virtio-mmio devices, and the loop that runs the vCPU and dispatches its
//! exits to the devices.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::serial::{SerialConsole, COM1, PORTS};
use crate::devices::virtio::mmio::{MmioTransport, WINDOW};
use crate::devices::virtio::{IrqLine, VirtioDevice};
use crate::{boot, memory, vcpu};

/// Where virtio-mmio windows start in guest physical memory.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// The first interrupt line given to virtio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Writing a byte here ends the run with that byte as the guest's status
/// (like QEMU's isa-debug-exit); used by test guests.
pub const EXIT_PORT: u16 = 0xf4;
const TSS_ADDR: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("opening KVM: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("setting up the VM ({0}): {1}")]
    Setup(&'static str, kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("loading guest code at {0:#x}: {1}")]
    Load(u64, vm_memory::GuestMemoryError),
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("running the vCPU: {0}")]
    Run(kvm_ioctls::Error),
    #[error("the guest stopped with an unexpected exit: {0}")]
    UnexpectedExit(String),
    #[error("the guest did not stop within {0} exits")]
    TooManyExits(u64),
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The guest wrote its status to [`EXIT_PORT`].
    Status(u8),
    /// The guest executed HLT with nothing to wake it.
    Halted,
    /// The guest reset or triple-faulted.
    Shutdown,
}

pub struct Machine<W: Write> {
    _kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
    _memfd: File,
    serial: SerialConsole<W>,
    virtio: Vec<MmioTransport>,
}

impl<W: Write> Machine<W> {
    /// A machine with `mem_size` bytes of memory whose serial output goes
    /// to `console`.
    pub fn new(mem_size: u64, console: W) -> Result<Self, MachineError> {
        let kvm = Kvm::new().map_err(MachineError::Kvm)?;
        let vm = kvm
            .create_vm()
            .map_err(|e| MachineError::Setup("create VM", e))?;
        vm.set_tss_address(TSS_ADDR)
            .map_err(|e| MachineError::Setup("TSS address", e))?;
        vm.create_irq_chip()
            .map_err(|e| MachineError::Setup("in-kernel irqchip", e))?;
        let (mem, memfd) = memory::create(mem_size)?;
        for (slot, region) in GuestMemoryBackend::iter(&mem).enumerate() {
            let host = GuestMemoryBackend::get_host_address(&mem, region.start_addr())
                .map_err(|e| MachineError::Load(region.start_addr().raw_value(), e))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is mapped for as long as `mem` lives, and
            // `mem` lives in the machine alongside the VM.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(|e| MachineError::Setup("guest memory", e))?;
        }
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| MachineError::Setup("create vCPU", e))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| MachineError::Setup("supported CPUID", e))?;
        vcpu::filter_cpuid(&mut cpuid, 0, 1);
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| MachineError::Setup("vCPU CPUID", e))?;
        vcpu::setup_cpu_state(&vcpu)?;
        vm.create_pit2(kvm_bindings::kvm_pit_config::default())
            .map_err(|e| MachineError::Setup("PIT", e))?;
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        vm.register_irqfd(&serial_irq, 4)
            .map_err(|e| MachineError::Setup("serial irqfd", e))?;
        Ok(Machine {
            _kvm: kvm,
            vm,
            vcpu,
            mem,
            _memfd: memfd,
            serial: SerialConsole::new(serial_irq, console),
            virtio: Vec::new(),
        })
    }

    pub fn console(&self) -> &W {
        self.serial.output()
    }

    /// Copies `code` into guest memory at `addr`.
    pub fn load(&mut self, addr: u64, code: &[u8]) -> Result<(), MachineError> {
        self.mem
            .write_slice(code, GuestAddress(addr))
            .map_err(|e| MachineError::Load(addr, e))
    }

    /// Adds a virtio-mmio device; returns the base of its register window.
    pub fn add_virtio(&mut self, device: Box<dyn VirtioDevice>) -> Result<u64, MachineError> {
        let index = self.virtio.len() as u64;
        let irq = Arc::new(IrqLine::new().map_err(MachineError::EventFd)?);
        self.vm
            .register_irqfd(irq.eventfd(), VIRTIO_IRQ_BASE + index as u32)
            .map_err(|e| MachineError::Setup("virtio irqfd", e))?;
        self.virtio
            .push(MmioTransport::new(device, self.mem.clone(), irq));
        Ok(MMIO_BASE + index * WINDOW)
    }

    /// Puts the vCPU in 64-bit mode at `entry.rip`, with `entry.rsi` in RSI.
    pub fn start_at(&mut self, entry: boot::Entry) -> Result<(), MachineError> {
        vcpu::setup_long_mode(
            &self.vcpu,
            &self.mem,
            entry.rip,
            boot::BOOT_STACK,
            entry.rsi,
        )?;
        Ok(())
    }

    /// Loads a Linux kernel (vmlinux), initramfs and command line, and
    /// points the vCPU at the kernel's 64-bit entry.
    pub fn load_linux(
        &mut self,
        kernel: &mut File,
        initrd: Option<&[u8]>,
        cmdline: &str,
    ) -> Result<(), MachineError> {
        let entry = boot::load_linux(&self.mem, kernel, initrd, cmdline)?;
        self.start_at(entry)
    }

    /// Runs the vCPU until the guest stops, or until `max_exits` exits
    /// have been handled.
    pub fn run(&mut self, max_exits: u64) -> Result<Exit, MachineError> {
        for _ in 0..max_exits {
            match self.vcpu.run().map_err(MachineError::Run)? {
                VcpuExit::IoOut(port, data) => {
                    if port == EXIT_PORT {
                        return Ok(Exit::Status(data.first().copied().unwrap_or(0)));
                    }
                    if (COM1..COM1 + PORTS).contains(&port) {
                        if let Some(&b) = data.first() {
                            self.serial.write((port - COM1) as u8, b);
                        }
                    }
                }
                VcpuExit::IoIn(port, data) => {
                    let value = if (COM1..COM1 + PORTS).contains(&port) {
                        self.serial.read((port - COM1) as u8)
                    } else {
                        0xff
                    };
                    data.fill(0);
                    if let Some(b) = data.first_mut() {
                        *b = value;
                    }
                }
                VcpuExit::MmioRead(addr, data) => match virtio_at(&mut self.virtio, addr) {
                    Some((t, off)) => t.read(off, data),
                    None => data.fill(0xff),
                },
                VcpuExit::MmioWrite(addr, data) => {
                    if let Some((t, off)) = virtio_at(&mut self.virtio, addr) {
                        t.write(off, data);
                    }
                }
                VcpuExit::Hlt => return Ok(Exit::Halted),
                VcpuExit::Shutdown => return Ok(Exit::Shutdown),
                other => return Err(MachineError::UnexpectedExit(format!("{other:?}"))),
            }
        }
        Err(MachineError::TooManyExits(max_exits))
    }
}

/// The virtio device whose register window holds `addr`, and the offset.
fn virtio_at(devices: &mut [MmioTransport], addr: u64) -> Option<(&mut MmioTransport, u64)> {
    let offset = addr.checked_sub(MMIO_BASE)?;
    let index = usize::try_from(offset / WINDOW).ok()?;
    devices.get_mut(index).map(|t| (t, offset % WINDOW))
}
