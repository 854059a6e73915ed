//! virtio-net whose other end is a stream of Ethernet frames on a connected
//! Unix socket, as passt serves it in its "qemu mode" (QEMU's
//! `-netdev stream` framing): every frame is preceded by its length as a
//! 32-bit big-endian integer.
//!
//! [`stream`] is the framing: a decoder that turns whatever the socket
//! returns into whole frames, and an encoder whose pending output survives
//! partial writes, both in fixed bounds. [`device`] is the device: two
//! queues (rx 0, tx 1), the MAC and link status in its configuration space,
//! and the guest-facing half of each direction.
//!
//! Offered features: VERSION_1, MAC (the address kiln chose) and STATUS (so
//! the guest sees NO-CARRIER once passt is gone). No offloads and no
//! mergeable rx buffers: every frame is at most one MTU-sized guest buffer
//! and passt needs none of them. The header is `virtio_net_hdr_v1` (12
//! bytes, `num_buffers` included), as VERSION_1 lays it out.
//!
//! Both directions are bounded. Host→guest: one frame waits at most, in a
//! fixed read buffer; while the guest posts no rx buffers the socket is not
//! read, so passt sees the back-pressure. Guest→host: tx chains are taken
//! only while the pending output has room for a frame of the largest size;
//! otherwise the guest's tx queue fills and its driver stops the queue.

pub mod device;
pub mod stream;

pub use device::{ConfigSpace, Net, NetError, NetStats};
pub use stream::{FrameDecoder, FrameEncoder, FrameStream, StreamError, MAX_FRAME, PREFIX_LEN};

pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
pub const NET_HDR_LEN: usize = 12;
