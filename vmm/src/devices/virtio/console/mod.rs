//! virtio-console with VIRTIO_CONSOLE_F_MULTIPORT: each port moves bytes
//! between a guest queue pair and a host file descriptor (a Unix socket, a
//! pipe, anything non-blocking-capable). With MULTIPORT the device
//! announces its ports over the control queues and names them, so a Linux
//! guest finds e.g. `kiln.agent` in /sys/class/virtio-ports/*/name.
//!
//! Both directions are bounded: the device holds at most [`BUFFER_LIMIT`]
//! bytes per direction and per port. Guest→host: when the host side does
//! not keep up, the device stops taking the guest's tx buffers (the guest
//! blocks on a full queue). Host→guest: when the guest has no rx buffers,
//! or has not opened the port yet (Linux drops data for closed ports), the
//! device stops reading the host side.
//!
//! [`control`] is the control queues' wire format, [`port`] a port's
//! buffers and host side, [`device`] the queues and the device itself.
//! virtio-bindings 0.2 has no virtio_console module, so the feature bit
//! and control events are spelled out here, from the spec.

pub mod control;
pub mod device;
pub mod port;

pub use control::{event, Control};
pub use device::{Console, ConsoleError};
pub use port::PortConfig;

pub const QUEUE_SIZE: u16 = 128;
/// VIRTIO_CONSOLE_F_MULTIPORT (virtio 1.2, 5.3.3).
pub const F_MULTIPORT: u64 = 1 << 1;
/// Bytes buffered per port and direction.
pub const BUFFER_LIMIT: usize = 64 * 1024;
