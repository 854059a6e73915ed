//! Builders the devices' and the transport's tests share: guest memory,
//! descriptor chains on a mock queue, and a virtio-blk request laid out at
//! fixed addresses.

use crate::vstate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::block::request::RequestHeader;

/// Where [`blk_header`] puts a block request's header, data and status.
pub const HDR: u64 = 0x10_0000;
pub const DATA: u64 = 0x20_0000;
pub const STATUS: u64 = 0x30_0000;
/// What the status byte holds until the device writes one.
pub const NO_STATUS: u8 = 0xee;

/// 16 MiB of guest memory at address 0.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).expect("guest memory")
}

/// (address, length, device-writable)
pub type Desc = (u64, u32, bool);

/// Writes one chain at descriptor index `first` and makes it available.
pub fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, first: u16, descs: &[Desc]) {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, write))| {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, first + i as u16 + 1))
        })
        .collect();
    vq.add_desc_chains(&raw, first).expect("add chain");
}

/// Writes a block request header at [`HDR`] and [`NO_STATUS`] at
/// [`STATUS`].
pub fn blk_header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
    mem.write_obj(
        RequestHeader {
            request_type,
            reserved: 0,
            sector,
        },
        GuestAddress(HDR),
    )
    .expect("header");
    mem.write_obj(NO_STATUS, GuestAddress(STATUS))
        .expect("status");
}
