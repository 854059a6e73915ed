//! virtio devices over the virtio-mmio transport (virtio 1.2, "modern"
//! only): the transport is written once ([`mmio`]) and every device
//! implements [`VirtioDevice`].

pub mod block;
pub mod console;
pub mod fs;
pub mod mmio;
pub mod rng;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Feature bit every modern device offers and every driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// InterruptStatus bits of the mmio transport.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt: the status bits the driver reads from the
/// transport, and the eventfd the VMM registers as an irqfd.
pub struct IrqLine {
    status: AtomicU32,
    eventfd: EventFd,
}

impl IrqLine {
    pub fn new() -> io::Result<IrqLine> {
        Ok(IrqLine {
            status: AtomicU32::new(0),
            eventfd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.eventfd.write(1)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: the driver has handled `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not valid (size, alignment or addresses outside guest memory)")]
    InvalidQueue(usize),
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("the device's backend refused the queues")]
    Backend,
}

/// The one queue of a single-queue device, checked against guest memory.
pub fn single_queue(mem: &GuestMemoryMmap, queues: Vec<Queue>) -> Result<Queue, ActivateError> {
    let got = queues.len();
    let Some(queue) = queues.into_iter().next().filter(|_| got == 1) else {
        return Err(ActivateError::QueueCount { expected: 1, got });
    };
    if !virtio_queue::QueueT::is_valid(&queue, mem) {
        return Err(ActivateError::InvalidQueue(0));
    }
    Ok(queue)
}

/// Serves every chain the driver made available on `queue`: `handle` runs
/// each request and returns how many bytes it wrote into the guest's
/// buffers; the chain then goes on the used ring, and the driver is
/// interrupted once if it asked to be. Returns how many were served.
pub fn serve_queue(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    irq: &IrqLine,
    mut handle: impl FnMut(virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> usize {
    use virtio_queue::QueueT;
    let mut done = 0;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let used_len = handle(chain);
        if queue.add_used(mem, head, used_len).is_err() {
            // The used ring is not writable: nothing more can be done on
            // this queue until the driver resets it.
            break;
        }
        done += 1;
    }
    if done > 0 && queue.needs_notification(mem).unwrap_or(true) {
        let _ = irq.trigger(INT_VRING);
    }
    done
}

/// A host-side descriptor a device waits on, and for what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostInterest {
    pub fd: std::os::fd::RawFd,
    pub read: bool,
    pub write: bool,
}

/// Copies the driver's read window `offset..offset + data.len()` of a
/// device's configuration space `config`; bytes beyond it read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// What the transport needs from a device.
pub trait VirtioDevice: Send {
    /// virtio device ID (2 = block, 3 = console, 4 = entropy, 26 = fs).
    fn device_type(&self) -> u32;
    /// The largest size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of [`Self::features`]).
    fn ack_features(&mut self, features: u64);
    /// Reads device configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; most devices ignore writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: start using the queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: std::sync::Arc<IrqLine>,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index`: process what it made available.
    fn queue_notify(&mut self, index: u32);
    /// The driver reset the device: forget the queues and negotiated state.
    fn reset(&mut self);
    /// Host-side descriptors (sockets, pipes) the event loop should watch
    /// for this device; asked again after every event the device handles.
    fn host_interest(&self) -> Vec<HostInterest> {
        Vec::new()
    }
    /// One of the [`Self::host_interest`] descriptors is ready.
    fn host_ready(&mut self) {}
    /// A device served by another process (vhost-user) may take the
    /// queues' notification eventfds (one per queue, in order) to hand them
    /// on; returning true keeps the event loop off them.
    fn take_queue_notifiers(&mut self, _notifiers: &[EventFd]) -> bool {
        false
    }
}
