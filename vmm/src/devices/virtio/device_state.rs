//! What a device holds between the driver's DRIVER_OK and a reset, in the
//! same shape for every device: the guest memory, the queues as the driver
//! set them up, and the interrupt line. The one queue loop every device
//! uses lives here too ([`ActiveState::serve`]).

use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_queue::{DescriptorChain, Queue, QueueT};

use super::{ActivateError, IrqLine};

/// Whether the driver has started the device.
#[derive(Default)]
pub enum DeviceState {
    /// Before DRIVER_OK, and after a reset.
    #[default]
    Inactive,
    Activated(ActiveState),
}

impl DeviceState {
    /// The device's state once started with `queues`.
    pub fn activated(mem: GuestMemoryMmap, queues: Vec<Queue>, irq: Arc<IrqLine>) -> Self {
        let used = vec![false; queues.len()];
        DeviceState::Activated(ActiveState {
            mem,
            queues,
            irq,
            used,
        })
    }

    pub fn active(&self) -> Option<&ActiveState> {
        match self {
            DeviceState::Activated(a) => Some(a),
            DeviceState::Inactive => None,
        }
    }

    pub fn active_mut(&mut self) -> Option<&mut ActiveState> {
        match self {
            DeviceState::Activated(a) => Some(a),
            DeviceState::Inactive => None,
        }
    }
}

/// A started device's guest-facing side.
pub struct ActiveState {
    pub mem: GuestMemoryMmap,
    /// In the device's queue order; the ones the driver did not set up
    /// stay not ready.
    pub queues: Vec<Queue>,
    pub irq: Arc<IrqLine>,
    /// Queues that got used entries since the last [`Self::signal_used`].
    used: Vec<bool>,
}

/// What a device did with one descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Bytes written into the chain's device-writable buffers.
    pub len: u32,
    /// Whether the device takes another chain now.
    pub more: bool,
}

impl Served {
    /// `len` bytes written, and the device takes the next chain.
    pub fn more(len: u32) -> Served {
        Served { len, more: true }
    }
}

impl ActiveState {
    /// Serves the chains the driver made available on queue `index`:
    /// `handle` runs each and says how many bytes it wrote and whether to
    /// go on; the chain then goes on the used ring. Returns how many were
    /// served. A queue that does not exist or is not ready has none; a used
    /// ring the device cannot write ends the pass.
    pub fn serve(
        &mut self,
        index: usize,
        mut handle: impl FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> Served,
    ) -> usize {
        let Some(queue) = self.queues.get_mut(index) else {
            return 0;
        };
        if !queue.ready() {
            return 0;
        }
        let mut done = 0;
        while let Some(chain) = queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let served = handle(&self.mem, chain);
            if queue.add_used(&self.mem, head, served.len).is_err() {
                // Nothing more can be done on this queue until the driver
                // resets it.
                break;
            }
            done += 1;
            if let Some(u) = self.used.get_mut(index) {
                *u = true;
            }
            if !served.more {
                break;
            }
        }
        done
    }

    /// Interrupts the driver once if a queue that got used entries since
    /// the last call asks for it.
    pub fn signal_used(&mut self) {
        for (q, used) in self.queues.iter_mut().zip(&self.used) {
            if *used && q.needs_notification(&self.mem).unwrap_or(true) {
                let _ = self.irq.trigger(VIRTIO_MMIO_INT_VRING);
                break;
            }
        }
        self.used.iter_mut().for_each(|u| *u = false);
    }
}

/// The one queue of a single-queue device, checked against guest memory.
pub fn single_queue(mem: &GuestMemoryMmap, queues: Vec<Queue>) -> Result<Queue, ActivateError> {
    let got = queues.len();
    let Some(queue) = queues.into_iter().next().filter(|_| got == 1) else {
        return Err(ActivateError::QueueCount { expected: 1, got });
    };
    if !queue.is_valid(mem) {
        return Err(ActivateError::InvalidQueue(0));
    }
    Ok(queue)
}

/// Checks the queues the driver made ready against guest memory; the
/// others stay unused.
pub fn check_ready_queues(mem: &GuestMemoryMmap, queues: &[Queue]) -> Result<(), ActivateError> {
    for (i, q) in queues.iter().enumerate() {
        if q.ready() && !q.is_valid(mem) {
            return Err(ActivateError::InvalidQueue(i));
        }
    }
    Ok(())
}
