//! Emulated devices, one file per device.

pub mod serial;
pub mod virtio;
