//! A machine: a KVM VM with guest memory, N vCPUs, the serial console and
//! virtio-mmio devices. [`Machine::run`] runs one thread per vCPU and one
//! device thread (the [`EventLoop`]) until the guest stops, then stops and
//! joins them all.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::vstate::memory::GuestMemoryMmap;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::Bus;
pub use super::bus::Exit;
use super::memory::{self, Backing};
use super::vcpu::{install_kick_handler, kick_signal, run_vcpu};
use crate::arch::layout::{BOOT_STACK, IRQ_BASE, IRQ_MAX, MMIO_BASE, MMIO_WINDOW_SIZE, SERIAL_IRQ};
use crate::arch::{boot, cpuid, mptable, regs, vm as arch_vm};
use crate::devices::serial::SerialConsole;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{IrqLine, VirtioDevice};
use crate::event_loop::{EventLoop, QueueNotifier};
use crate::seccomp;

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("opening KVM: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("setting up the VM ({0}): {1}")]
    Setup(&'static str, kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Vcpu(#[from] regs::RegsError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("loading guest code at {0:#x}: {1}")]
    Load(u64, vm_memory::GuestMemoryError),
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("{0} vCPUs: kiln-vmm runs 1 to {max}", max = mptable::MAX_CPUS)]
    VcpuCount(u8),
    #[error("no interrupt line left for another virtio device")]
    TooManyDevices,
    #[error("the device thread: {0}")]
    EventLoop(std::io::Error),
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    #[error("running vCPU {0}: {1}")]
    Run(usize, kvm_ioctls::Error),
    #[error("vCPU {0} stopped with an unexpected exit: {1}")]
    UnexpectedExit(usize, String),
}

/// Ends a running machine from another thread; [`Machine::run`] then
/// returns [`Exit::Stopped`].
#[derive(Clone)]
pub struct Stopper(Arc<RunState>);

impl Stopper {
    pub fn stop(&self) {
        self.0.finish(Ok(Exit::Stopped));
    }
}

/// How the threads of a run agree that it is over.
pub(super) struct RunState {
    stopping: AtomicBool,
    outcome: Mutex<Option<Result<Exit, MachineError>>>,
    done: Condvar,
}

impl RunState {
    fn new() -> RunState {
        RunState {
            stopping: AtomicBool::new(false),
            outcome: Mutex::new(None),
            done: Condvar::new(),
        }
    }

    /// Records how the run ended; the first outcome wins.
    pub(super) fn finish(&self, outcome: Result<Exit, MachineError>) {
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if o.is_none() {
            *o = Some(outcome);
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.done.notify_all();
    }

    fn wait(&self) -> Result<Exit, MachineError> {
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(outcome) = o.take() {
                return outcome;
            }
            o = self.done.wait(o).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// How long each step of starting a machine took, up to the guest's first
/// exit, in the order the steps ran; a step repeated (per vCPU, per call)
/// is summed. Only the machine's own work counts, not the caller's
/// between calls.
#[derive(Debug, Clone, Default)]
pub struct StartupTimes {
    steps: Vec<(&'static str, Duration)>,
}

impl StartupTimes {
    pub fn steps(&self) -> &[(&'static str, Duration)] {
        &self.steps
    }

    /// Adds the time since `since` to step `name`; returns now, the start
    /// of the next step.
    fn record(&mut self, name: &'static str, since: Instant) -> Instant {
        let now = Instant::now();
        self.add(name, now.saturating_duration_since(since));
        now
    }

    fn add(&mut self, name: &'static str, d: Duration) {
        match self.steps.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += d,
            None => self.steps.push((name, d)),
        }
    }
}

pub struct Machine<W: Write> {
    _kvm: Kvm,
    vm: VmFd,
    vcpus: Vec<VcpuFd>,
    mem: GuestMemoryMmap,
    /// Behind `mem` when it is shared ([`Backing::Shared`]).
    memfd: Option<File>,
    bus: Bus<W>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    notifiers: Vec<QueueNotifier>,
    wake: EventFd,
    state: Arc<RunState>,
    seccomp: bool,
    times: StartupTimes,
}

impl<W: Write + Send> Machine<W> {
    /// A one-vCPU machine with `mem_size` bytes of memory whose serial
    /// output goes to `console`.
    pub fn new(mem_size: u64, console: W) -> Result<Self, MachineError> {
        Self::with_vcpus(mem_size, 1, console)
    }

    /// A machine with `vcpus` vCPUs and private memory. vCPU 0 boots; the
    /// others wait in KVM's initial state for the guest's INIT/SIPI.
    pub fn with_vcpus(mem_size: u64, vcpus: u8, console: W) -> Result<Self, MachineError> {
        Self::with_memory(mem_size, Backing::Private, vcpus, console)
    }

    /// A machine with `vcpus` vCPUs and memory made of `backing`.
    pub fn with_memory(
        mem_size: u64,
        backing: Backing,
        vcpus: u8,
        console: W,
    ) -> Result<Self, MachineError> {
        if vcpus == 0 || vcpus > mptable::MAX_CPUS {
            return Err(MachineError::VcpuCount(vcpus));
        }
        let mut times = StartupTimes::default();
        let t = Instant::now();
        let kvm = Kvm::new().map_err(MachineError::Kvm)?;
        let t = times.record("open /dev/kvm", t);
        let vm = kvm
            .create_vm()
            .map_err(|e| MachineError::Setup("create VM", e))?;
        let t = times.record("KVM_CREATE_VM", t);
        let (mem, memfd) = memory::create(mem_size, backing)?;
        let t = times.record("memory: mmap", t);
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
        let t = times.record("memory: KVM memory slot", t);
        // The irqchip only after the memory slot: the first slot change
        // after KVM_CREATE_IRQCHIP waits 5-10 ms in the kernel (an SRCU
        // grace period; measured on 6.18), before it ~0.1 ms. Firecracker
        // uses the same order.
        arch_vm::set_tss_address(&vm).map_err(|e| MachineError::Setup("TSS address", e))?;
        let t = times.record("TSS address", t);
        arch_vm::create_irqchip(&vm).map_err(|e| MachineError::Setup("in-kernel irqchip", e))?;
        let t = times.record("irqchip", t);
        let supported =
            cpuid::supported(&kvm).map_err(|e| MachineError::Setup("supported CPUID", e))?;
        let mut t = times.record("KVM_GET_SUPPORTED_CPUID", t);
        let tsc_deadline = cpuid::tsc_deadline_timer(&kvm);
        let mut fds = Vec::with_capacity(usize::from(vcpus));
        for index in 0..vcpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(|e| MachineError::Setup("create vCPU", e))?;
            t = times.record("vCPU: create", t);
            cpuid::set_vcpu_cpuid(&fd, &supported, index, vcpus, tsc_deadline)
                .map_err(|e| MachineError::Setup("vCPU CPUID", e))?;
            t = times.record("vCPU: CPUID", t);
            regs::setup_cpu_state(&fd)?;
            t = times.record("vCPU: FPU, MSRs, LAPIC", t);
            fds.push(fd);
        }
        arch_vm::create_pit(&vm).map_err(|e| MachineError::Setup("PIT", e))?;
        let t = times.record("PIT", t);
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|e| MachineError::Setup("serial irqfd", e))?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        let bus_wake = wake.try_clone().map_err(MachineError::EventFd)?;
        times.record("serial + eventfds", t);
        Ok(Machine {
            _kvm: kvm,
            vm,
            vcpus: fds,
            mem,
            memfd,
            bus: Bus::new(
                SerialConsole::new(serial_irq, console),
                Vec::new(),
                bus_wake,
            ),
            transports: Vec::new(),
            notifiers: Vec::new(),
            wake,
            state: Arc::new(RunState::new()),
            seccomp: false,
            times,
        })
    }

    /// How long start-up took so far, step by step: [`Self::with_vcpus`],
    /// [`Self::load`], [`Self::start_at`] and, once [`Self::run`] has run,
    /// its way to vCPU 0's first exit from the guest.
    pub fn startup_times(&self) -> &StartupTimes {
        &self.times
    }

    /// Runs the vCPU and device threads under seccomp filters.
    pub fn set_seccomp(&mut self, on: bool) {
        self.seccomp = on;
    }

    /// Reads the serial console's output sink.
    pub fn with_console<R>(&self, f: impl FnOnce(&W) -> R) -> R {
        f(self.bus.serial().output())
    }

    pub fn stopper(&self) -> Stopper {
        Stopper(self.state.clone())
    }

    /// The guest memory and, if it is shared, the memfd behind it
    /// (vhost-user backends map it).
    pub fn memory(&self) -> (&GuestMemoryMmap, Option<&File>) {
        (&self.mem, self.memfd.as_ref())
    }

    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// Copies `code` into guest memory at `addr`.
    pub fn load(&mut self, addr: u64, code: &[u8]) -> Result<(), MachineError> {
        let t = Instant::now();
        self.mem
            .write_slice(code, GuestAddress(addr))
            .map_err(|e| MachineError::Load(addr, e))?;
        self.times.record("load guest code", t);
        Ok(())
    }

    /// The base address and interrupt line the next virtio device gets.
    pub fn next_virtio_slot(&self) -> (u64, u32) {
        let index = self.transports.len() as u64;
        (
            MMIO_BASE + index * MMIO_WINDOW_SIZE,
            IRQ_BASE + index as u32,
        )
    }

    /// Adds a virtio-mmio device; returns the base of its register window.
    /// Its queue notifications arrive through ioeventfds, its interrupt
    /// through an irqfd.
    pub fn add_virtio(&mut self, device: Box<dyn VirtioDevice>) -> Result<u64, MachineError> {
        let (base, line) = self.next_virtio_slot();
        if line > IRQ_MAX {
            return Err(MachineError::TooManyDevices);
        }
        let index = self.transports.len();
        let irq = Arc::new(IrqLine::new().map_err(MachineError::EventFd)?);
        self.vm
            .register_irqfd(irq.eventfd(), line)
            .map_err(|e| MachineError::Setup("virtio irqfd", e))?;
        let mut device = device;
        let mut eventfds = Vec::new();
        for queue in 0..device.queue_max_sizes().len() as u32 {
            let eventfd = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
            // A 4-byte write of the queue's index to QueueNotify.
            self.vm
                .register_ioevent(
                    &eventfd,
                    &IoEventAddress::Mmio(base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY)),
                    queue,
                )
                .map_err(|e| MachineError::Setup("queue ioeventfd", e))?;
            eventfds.push(eventfd);
        }
        if !device.take_queue_notifiers(&eventfds) {
            for (queue, eventfd) in eventfds.into_iter().enumerate() {
                self.notifiers.push(QueueNotifier {
                    device: index,
                    queue: queue as u32,
                    eventfd,
                });
            }
        }
        let transport = MmioTransport::new(device, self.mem.clone(), irq);
        self.transports.push(Arc::new(Mutex::new(transport)));
        Ok(base)
    }

    /// Puts vCPU 0 in 64-bit mode at `entry.rip`, with `entry.rsi` in RSI.
    pub fn start_at(&mut self, entry: boot::Entry) -> Result<(), MachineError> {
        let Some(bsp) = self.vcpus.first() else {
            return Err(MachineError::VcpuCount(0));
        };
        let t = Instant::now();
        regs::setup_long_mode(bsp, &self.mem, entry.rip, BOOT_STACK, entry.rsi)?;
        self.times.record("long mode: page tables, sregs", t);
        Ok(())
    }

    /// Loads a Linux kernel (vmlinux), initramfs and command line, writes
    /// the MP table for the vCPUs, and points vCPU 0 at the kernel's entry.
    pub fn load_linux(
        &mut self,
        kernel: &mut File,
        initrd: Option<&[u8]>,
        cmdline: &str,
    ) -> Result<(), MachineError> {
        let t = Instant::now();
        let entry = boot::load_linux(&self.mem, kernel, initrd, cmdline)?;
        let t = self.times.record("load kernel + initrd", t);
        mptable::write(&self.mem, self.vcpus.len() as u8)?;
        self.times.record("MP table", t);
        self.start_at(entry)
    }

    /// Runs the machine until the guest stops (or a [`Stopper`] stops it),
    /// then ends every thread it started.
    pub fn run(&mut self) -> Result<Exit, MachineError> {
        let t = Instant::now();
        install_kick_handler().map_err(MachineError::Thread)?;
        let t = self.times.record("run: kick signal handler", t);

        let filters = if self.seccomp {
            Some(seccomp::Filters::new()?)
        } else {
            None
        };
        let t = self.times.record("run: seccomp compile", t);
        self.bus.set_virtio(self.transports.clone());
        let stop = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        let mut event_loop = EventLoop::new(
            stop.try_clone().map_err(MachineError::EventFd)?,
            self.wake.try_clone().map_err(MachineError::EventFd)?,
            self.transports.clone(),
            std::mem::take(&mut self.notifiers),
        )
        .map_err(MachineError::EventLoop)?;
        self.times.record("run: event loop set-up", t);
        let state = self.state.clone();
        let bus = &self.bus;
        let threads: Mutex<Vec<Option<libc::pthread_t>>> = Mutex::new(vec![None; self.vcpus.len()]);
        // Instants on vCPU 0's way into the guest, some taken on its thread.
        let marks: Mutex<Vec<(&'static str, Instant)>> = Mutex::new(vec![("", Instant::now())]);
        let mark = |name| {
            marks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((name, Instant::now()))
        };
        let mark: &(dyn Fn(&'static str) + Sync) = &mark;

        let result = std::thread::scope(|s| -> Result<Exit, MachineError> {
            let el_state = state.clone();
            let el_filter = filters.as_ref().map(|f| f.event_loop.clone());
            let el = std::thread::Builder::new()
                .name("kiln-devices".into())
                .spawn_scoped(s, move || {
                    if let Some(f) = el_filter {
                        if let Err(e) = seccomp::apply(&f) {
                            el_state.finish(Err(e.into()));
                            return;
                        }
                    }
                    if let Err(e) = event_loop.run() {
                        el_state.finish(Err(MachineError::EventLoop(e)));
                    }
                })
                .map_err(MachineError::Thread)?;
            mark("run: spawn device thread");
            let mut vcpu_threads = Vec::new();
            for (index, vcpu) in self.vcpus.iter_mut().enumerate() {
                let vcpu_state = state.clone();
                let threads = &threads;
                let filter = filters.as_ref().map(|f| f.vcpu.clone());
                let mark = (index == 0).then_some(mark);
                let spawned = std::thread::Builder::new()
                    .name(format!("kiln-vcpu{index}"))
                    .spawn_scoped(s, move || {
                        if let Some(slot) = threads
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_mut(index)
                        {
                            // SAFETY: pthread_self has no preconditions.
                            *slot = Some(unsafe { libc::pthread_self() });
                        }
                        if let Some(m) = mark {
                            m("run: spawn vCPU thread");
                        }
                        if let Some(f) = filter {
                            if let Err(e) = seccomp::apply(&f) {
                                vcpu_state.finish(Err(e.into()));
                                return;
                            }
                        }
                        if let Some(m) = mark {
                            m("run: seccomp install");
                        }
                        run_vcpu(index, vcpu, bus, &vcpu_state, mark);
                    });
                match spawned {
                    Ok(h) => vcpu_threads.push(h),
                    Err(e) => {
                        state.finish(Err(MachineError::Thread(e)));
                        break;
                    }
                }
            }

            let outcome = state.wait();
            // Stop the device thread, then kick the vCPUs out of KVM_RUN
            // until each has seen the stop flag. A kick that lands just
            // before a thread enters KVM_RUN is lost, hence the repeats.
            let _ = stop.write(1);
            while vcpu_threads.iter().any(|h| !h.is_finished()) {
                let tids = threads.lock().unwrap_or_else(|p| p.into_inner()).clone();
                for (h, tid) in vcpu_threads.iter().zip(tids) {
                    if let (false, Some(tid)) = (h.is_finished(), tid) {
                        // SAFETY: the thread is not joined yet, so its id is
                        // valid; the signal's handler does nothing.
                        unsafe { libc::pthread_kill(tid, kick_signal()) };
                    }
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            for h in vcpu_threads {
                let _ = h.join();
            }
            let _ = el.join();
            outcome
        });
        let marks = marks.into_inner().unwrap_or_else(|p| p.into_inner());
        for pair in marks.windows(2) {
            if let [(_, from), (name, to)] = pair {
                self.times.add(name, to.saturating_duration_since(*from));
            }
        }
        // A machine runs once; a second run reports the first outcome's end.
        self.state = Arc::new(RunState::new());
        self.state.stopping.store(false, Ordering::SeqCst);
        result
    }
}
