//! Emulated devices, one file per device.

pub mod virtio;
