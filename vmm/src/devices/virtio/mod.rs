//! virtio devices over the virtio-mmio transport (virtio 1.2, "modern"
//! only): the transport is written once ([`mmio`]), every device
//! implements [`VirtioDevice`] and keeps what the driver started it with
//! in a [`DeviceState`]. Register offsets, status and feature bits and
//! device IDs come from `virtio_bindings`.

pub mod block;
pub mod console;
pub mod device;
pub mod device_state;
pub mod fs;
pub mod irq;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;

pub use device::{read_config_bytes, ActivateError, HostInterest, VirtioDevice};
pub use device_state::{check_ready_queues, single_queue, ActiveState, DeviceState, Served};
pub use irq::IrqLine;

/// Feature bit every modern device offers and every driver must accept,
/// as a mask.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
