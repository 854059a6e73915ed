//! virtio-blk over a raw image file.
//!
//! [`device`] holds the device: the disk ([`DiskProperties`]), its
//! configuration space and what the driver started it with. [`request`]
//! takes each descriptor chain apart into a typed request, checks it
//! against the disk and runs it.
//!
//! Requests are parsed with virtio-queue's `Reader`/`Writer`, so any
//! descriptor layout the spec allows works, and every guest address goes
//! through vm-memory's checked accessors. Data is moved in bounded chunks:
//! a request claiming gigabytes costs the VMM no more memory than a small
//! one. A malformed request fails alone (IOERR, or a used entry of length 0
//! when not even a status byte can be written); the device carries on.

pub mod device;
pub mod request;

use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

pub use device::{Block, BlockError, ConfigSpace, DiskProperties};
pub use request::{execute, Completion};

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
/// virtio-blk serials are at most 20 bytes.
pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Segments per DISCARD / WRITE_ZEROES request.
const MAX_SEGMENTS: u32 = 16;
/// Largest DISCARD / WRITE_ZEROES range, in sectors.
const MAX_RANGE_SECTORS: u32 = u32::MAX / SECTOR_SIZE as u32;
