//! The virtio-blk device: the disk behind it, its configuration space,
//! and its queue once the driver has started it.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, Reader, Writer};
use vm_memory::ByteValued;

use super::request::execute;
use super::{MAX_RANGE_SECTORS, MAX_SEGMENTS, QUEUE_SIZE, SECTOR_SIZE, SERIAL_LEN};
use crate::devices::virtio::{
    read_config_bytes, single_queue, ActivateError, DeviceState, IrqLine, Served, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// Bytes moved between the file and guest memory at a time.
const CHUNK: usize = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk serial '{0}' is longer than {SERIAL_LEN} bytes")]
    SerialTooLong(String),
    #[error("reading the disk's size: {0}")]
    Size(io::Error),
}

/// The disk as requests see it: the image file and what was decided about
/// it when the device was made.
pub struct DiskProperties {
    file: File,
    /// Whole sectors; a trailing partial sector is not addressable.
    nsectors: u64,
    read_only: bool,
    /// The serial, NUL-padded: what GET_ID answers.
    image_id: [u8; SERIAL_LEN],
}

impl DiskProperties {
    /// `file` (opened read-write unless `read_only`) with serial `serial`.
    pub fn new(file: File, read_only: bool, serial: &str) -> Result<Self, BlockError> {
        if serial.len() > SERIAL_LEN {
            return Err(BlockError::SerialTooLong(serial.to_string()));
        }
        // The end of the file, not its metadata: a block device's
        // st_size is 0. I/O is positional, so the offset left does not matter.
        let size = (&file).seek(SeekFrom::End(0)).map_err(BlockError::Size)?;
        let mut image_id = [0u8; SERIAL_LEN];
        image_id[..serial.len()].copy_from_slice(serial.as_bytes());
        Ok(DiskProperties {
            file,
            nsectors: size / SECTOR_SIZE,
            read_only,
            image_id,
        })
    }

    pub fn nsectors(&self) -> u64 {
        self.nsectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn image_id(&self) -> &[u8; SERIAL_LEN] {
        &self.image_id
    }

    /// Copies `len` bytes at byte `offset` into the guest's buffers.
    pub fn read_to_guest(
        &self,
        mut offset: u64,
        len: usize,
        writer: &mut Writer<'_>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK.min(len)];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            self.file.read_exact_at(&mut buf[..n], offset)?;
            writer.write_all(&buf[..n])?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    }

    /// Copies `len` bytes of the guest's buffers to byte `offset`.
    pub fn write_from_guest(
        &self,
        mut offset: u64,
        len: usize,
        reader: &mut Reader<'_>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK.min(len)];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            reader.read_exact(&mut buf[..n])?;
            self.file.write_all_at(&buf[..n], offset)?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    }

    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Zeroes (WRITE_ZEROES) or deallocates (DISCARD) a byte range. Both
    /// read back as zeros afterwards on a regular file; for DISCARD that
    /// is more than the spec asks, and harmless.
    pub fn zero_range(&self, offset: u64, len: u64, discard: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a descriptor we own, with checked offsets.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc == 0 {
            return Ok(());
        }
        if discard {
            // DISCARD is advisory; a filesystem without hole punching
            // ignores it.
            return Ok(());
        }
        // No hole punching: write the zeros.
        let zeros = vec![0u8; CHUNK];
        let mut off = offset;
        let end = offset + len;
        while off < end {
            let n = ((end - off) as usize).min(CHUNK);
            self.file.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
        Ok(())
    }
}

/// The device configuration space (virtio 1.2, 5.2.4) up to the
/// write-zeroes fields, the last ones offered; little-endian.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, packed)]
pub struct ConfigSpace {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
}
// SAFETY: plain old data of integer fields; packed, so there is no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for ConfigSpace {}

// The spec's offsets.
const _: () = {
    assert!(std::mem::size_of::<ConfigSpace>() == 60);
    assert!(std::mem::offset_of!(ConfigSpace, seg_max) == 12);
    assert!(std::mem::offset_of!(ConfigSpace, blk_size) == 20);
    assert!(std::mem::offset_of!(ConfigSpace, max_discard_sectors) == 36);
    assert!(std::mem::offset_of!(ConfigSpace, max_write_zeroes_sectors) == 48);
    assert!(std::mem::offset_of!(ConfigSpace, write_zeroes_may_unmap) == 56);
};

impl ConfigSpace {
    fn new(nsectors: u64) -> ConfigSpace {
        ConfigSpace {
            capacity: nsectors.to_le(),
            // The queue size bounds the descriptors of one request.
            seg_max: u32::from(QUEUE_SIZE - 2).to_le(),
            blk_size: (SECTOR_SIZE as u32).to_le(),
            max_discard_sectors: MAX_RANGE_SECTORS.to_le(),
            max_discard_seg: MAX_SEGMENTS.to_le(),
            discard_sector_alignment: 1u32.to_le(),
            max_write_zeroes_sectors: MAX_RANGE_SECTORS.to_le(),
            max_write_zeroes_seg: MAX_SEGMENTS.to_le(),
            write_zeroes_may_unmap: 1,
            ..ConfigSpace::default()
        }
    }
}

pub struct Block {
    disk: DiskProperties,
    config: ConfigSpace,
    acked_features: u64,
    state: DeviceState,
}

impl Block {
    /// A disk backed by `disk` (opened read-write unless `readonly`).
    pub fn new(disk: File, readonly: bool, serial: &str) -> Result<Block, BlockError> {
        let disk = DiskProperties::new(disk, readonly, serial)?;
        Ok(Block {
            config: ConfigSpace::new(disk.nsectors()),
            disk,
            acked_features: 0,
            state: DeviceState::Inactive,
        })
    }

    /// Processes every available request; returns how many completed.
    pub fn process_queue(&mut self) -> usize {
        let Some(active) = self.state.active_mut() else {
            return 0;
        };
        let disk = &self.disk;
        let done = active.serve(0, |mem, chain| {
            Served::more(execute(disk, mem, chain).used_len)
        });
        active.signal_used();
        done
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if self.disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config.as_slice(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<IrqLine>,
    ) -> Result<(), ActivateError> {
        let queue = single_queue(&mem, queues)?;
        self.state = DeviceState::activated(mem, vec![queue], irq);
        Ok(())
    }

    fn queue_notify(&mut self, index: u32) {
        if index == 0 {
            self.process_queue();
        }
    }

    fn reset(&mut self) {
        self.state = DeviceState::Inactive;
        self.acked_features = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_reports_capacity_and_limits() {
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(8 * 512).expect("size");
        let block = Block::new(file, false, "kiln0").expect("block");
        let mut cap = [0u8; 8];
        block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut b = [0xFFu8; 4];
        block.read_config(1000, &mut b);
        assert_eq!(b, [0; 4]);
        block.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        assert!(Block::new(
            tempfile::tempfile().expect("f"),
            false,
            "123456789012345678901"
        )
        .is_err());
    }
}
