//! What the transport needs from a device ([`VirtioDevice`]), and the
//! pieces every device's implementation shares.

use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::IrqLine;

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not valid (size, alignment or addresses outside guest memory)")]
    InvalidQueue(usize),
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("the device's backend refused the queues")]
    Backend,
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
    /// virtio device ID (`virtio_bindings::virtio_ids::VIRTIO_ID_*`).
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
        irq: Arc<IrqLine>,
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
