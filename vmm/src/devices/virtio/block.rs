//! virtio-blk over a raw image file.
//!
//! Requests are parsed with virtio-queue's `Reader`/`Writer`, so any
//! descriptor layout the spec allows works, and every guest address goes
//! through vm-memory's checked accessors. Data is moved in bounded chunks:
//! a request claiming gigabytes costs the VMM no more memory than a small
//! one. A malformed request fails alone (IOERR, or a used entry of length 0
//! when not even a status byte can be written); the device carries on.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_queue::{DescriptorChain, Queue, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};

use super::{
    read_config_bytes, serve_queue, single_queue, ActivateError, IrqLine, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
/// Segments per DISCARD / WRITE_ZEROES request.
const MAX_SEGMENTS: u32 = 16;
/// Largest DISCARD / WRITE_ZEROES range, in sectors.
const MAX_RANGE_SECTORS: u32 = u32::MAX / SECTOR_SIZE as u32;
/// Bytes moved between the file and guest memory at a time.
const CHUNK: usize = 128 * 1024;
/// virtio-blk serials are at most 20 bytes.
pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk serial '{0}' is longer than {SERIAL_LEN} bytes")]
    SerialTooLong(String),
    #[error("reading the disk's size: {0}")]
    Size(io::Error),
}

/// The request header (virtio 1.2, 5.2.6).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct RequestHeader {
    request_type: u32,
    reserved: u32,
    sector: u64,
}
// SAFETY: plain old data of integer fields, no padding.
unsafe impl ByteValued for RequestHeader {}

/// A DISCARD / WRITE_ZEROES segment.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct Segment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: plain old data of integer fields, no padding.
unsafe impl ByteValued for Segment {}

/// The outcome of one request: the status byte, and how many bytes the
/// device wrote into the guest's buffers (status included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    pub used_len: u32,
}

pub struct Block {
    disk: File,
    readonly: bool,
    sectors: u64,
    serial: Vec<u8>,
    acked_features: u64,
    active: Option<Active>,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    irq: Arc<IrqLine>,
}

impl Block {
    /// A disk backed by `disk` (opened read-write unless `readonly`).
    pub fn new(disk: File, readonly: bool, serial: &str) -> Result<Block, BlockError> {
        if serial.len() > SERIAL_LEN {
            return Err(BlockError::SerialTooLong(serial.to_string()));
        }
        // The end of the file, not its metadata: a block device's
        // st_size is 0. I/O is positional, so the offset left does not matter.
        let size = (&disk).seek(SeekFrom::End(0)).map_err(BlockError::Size)?;
        Ok(Block {
            disk,
            readonly,
            // A trailing partial sector is not addressable.
            sectors: size / SECTOR_SIZE,
            serial: serial.as_bytes().to_vec(),
            acked_features: 0,
            active: None,
        })
    }

    fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        // seg_max: the queue size bounds the descriptors of one request.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // max_discard_sectors, max_discard_seg, discard_sector_alignment
        c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        // max_write_zeroes_sectors, max_write_zeroes_seg, may_unmap
        c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        c[56] = 1;
        c
    }

    /// Processes every available request; returns how many completed.
    pub fn process_queue(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let (disk, readonly, sectors, serial) =
            (&self.disk, self.readonly, self.sectors, &self.serial);
        serve_queue(&active.mem, &mut active.queue, &active.irq, |chain| {
            execute(disk, readonly, sectors, serial, &active.mem, chain).used_len
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        2
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if self.readonly {
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
        let config = self.config();
        read_config_bytes(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<IrqLine>,
    ) -> Result<(), ActivateError> {
        let queue = single_queue(&mem, queues)?;
        self.active = Some(Active { mem, queue, irq });
        Ok(())
    }

    fn queue_notify(&mut self, index: u32) {
        if index == 0 {
            self.process_queue();
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }
}

/// Runs one request to completion.
pub fn execute(
    disk: &File,
    readonly: bool,
    sectors: u64,
    serial: &[u8],
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Completion {
    let (Ok(mut reader), Ok(mut writer)) =
        (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
    else {
        // A descriptor outside guest memory: there is nowhere to put a
        // status, so the chain is returned untouched.
        return Completion {
            status: VIRTIO_BLK_S_IOERR as u8,
            used_len: 0,
        };
    };
    let writable = writer.available_bytes();
    if writable == 0 {
        return Completion {
            status: VIRTIO_BLK_S_IOERR as u8,
            used_len: 0,
        };
    }
    // The status byte is the last writable byte; `writer` keeps the data part.
    let Ok(mut status_writer) = writer.split_at(writable - 1) else {
        return Completion {
            status: VIRTIO_BLK_S_IOERR as u8,
            used_len: 0,
        };
    };
    let (status, data_written) = match reader.read_obj::<RequestHeader>() {
        Ok(h) => run(disk, readonly, sectors, serial, h, &mut reader, &mut writer),
        Err(_) => (VIRTIO_BLK_S_IOERR, 0),
    };
    let status = status as u8;
    let wrote_status = status_writer.write_obj(status).is_ok();
    Completion {
        status,
        used_len: (data_written + usize::from(wrote_status)) as u32,
    }
}

/// Executes a parsed request; returns (status, data bytes written to the guest).
fn run(
    disk: &File,
    readonly: bool,
    sectors: u64,
    serial: &[u8],
    header: RequestHeader,
    reader: &mut Reader<'_>,
    writer: &mut Writer<'_>,
) -> (u32, usize) {
    let ioerr = (VIRTIO_BLK_S_IOERR, 0);
    match header.request_type {
        VIRTIO_BLK_T_IN => {
            let len = writer.available_bytes();
            let Some(offset) = checked_range(header.sector, len as u64, sectors) else {
                return ioerr;
            };
            match copy_to_guest(disk, offset, len, writer) {
                Ok(()) => (VIRTIO_BLK_S_OK, len),
                Err(_) => (VIRTIO_BLK_S_IOERR, writer.bytes_written()),
            }
        }
        VIRTIO_BLK_T_OUT => {
            if readonly {
                return ioerr;
            }
            let len = reader.available_bytes();
            let Some(offset) = checked_range(header.sector, len as u64, sectors) else {
                return ioerr;
            };
            match copy_from_guest(disk, offset, len, reader) {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(_) => ioerr,
            }
        }
        VIRTIO_BLK_T_FLUSH => match disk.sync_data() {
            Ok(()) => (VIRTIO_BLK_S_OK, 0),
            Err(_) => ioerr,
        },
        VIRTIO_BLK_T_GET_ID => {
            // The serial, NUL-padded when shorter than the buffer.
            let mut id = [0u8; SERIAL_LEN];
            id[..serial.len()].copy_from_slice(serial);
            let n = writer.available_bytes().min(SERIAL_LEN);
            match writer.write_all(&id[..n]) {
                Ok(()) => (VIRTIO_BLK_S_OK, n),
                Err(_) => ioerr,
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if readonly {
                return ioerr;
            }
            let discard = header.request_type == VIRTIO_BLK_T_DISCARD;
            let count = reader.available_bytes() / std::mem::size_of::<Segment>();
            if count == 0 || count > MAX_SEGMENTS as usize {
                return ioerr;
            }
            for _ in 0..count {
                let Ok(seg) = reader.read_obj::<Segment>() else {
                    return ioerr;
                };
                let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
                let Some(offset) = checked_range(seg.sector, len, sectors) else {
                    return ioerr;
                };
                // DISCARD takes no flags; WRITE_ZEROES knows only UNMAP.
                let allowed = if discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if seg.flags & !allowed != 0 {
                    return (VIRTIO_BLK_S_UNSUPP, 0);
                }
                if zero_range(disk, offset, len, discard).is_err() {
                    return ioerr;
                }
            }
            (VIRTIO_BLK_S_OK, 0)
        }
        _ => (VIRTIO_BLK_S_UNSUPP, 0),
    }
}

/// The byte offset of `len` bytes at `sector`, if they lie within the disk
/// and are whole sectors.
fn checked_range(sector: u64, len: u64, sectors: u64) -> Option<u64> {
    if len % SECTOR_SIZE != 0 {
        return None;
    }
    let end = sector.checked_add(len / SECTOR_SIZE)?;
    if end > sectors {
        return None;
    }
    sector.checked_mul(SECTOR_SIZE)
}

fn copy_to_guest(
    disk: &File,
    mut offset: u64,
    len: usize,
    writer: &mut Writer<'_>,
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK.min(len)];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        disk.read_exact_at(&mut buf[..n], offset)?;
        writer.write_all(&buf[..n])?;
        offset += n as u64;
        left -= n;
    }
    Ok(())
}

fn copy_from_guest(
    disk: &File,
    mut offset: u64,
    len: usize,
    reader: &mut Reader<'_>,
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK.min(len)];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        reader.read_exact(&mut buf[..n])?;
        disk.write_all_at(&buf[..n], offset)?;
        offset += n as u64;
        left -= n;
    }
    Ok(())
}

/// Zeroes (WRITE_ZEROES) or deallocates (DISCARD) a byte range. Both read
/// back as zeros afterwards on a regular file; for DISCARD that is more
/// than the spec asks, and harmless.
fn zero_range(disk: &File, offset: u64, len: u64, discard: bool) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor we own, with checked offsets.
    let rc = unsafe { libc::fallocate(disk.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 {
        return Ok(());
    }
    if discard {
        // DISCARD is advisory; a filesystem without hole punching ignores it.
        return Ok(());
    }
    // No hole punching: write the zeros.
    let zeros = vec![0u8; CHUNK];
    let mut off = offset;
    let end = offset + len;
    while off < end {
        let n = ((end - off) as usize).min(CHUNK);
        disk.write_all_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::INT_VRING;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    pub const HDR: u64 = 0x10_0000;
    pub const DATA: u64 = 0x20_0000;
    pub const STATUS: u64 = 0x30_0000;
    const NO_STATUS: u8 = 0xee;

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

    pub fn header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
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

    struct Rig {
        mem: &'static GuestMemoryMmap,
        vq: MockSplitQueue<'static, GuestMemoryMmap>,
        block: Block,
        irq: Arc<IrqLine>,
        file: tempfile::NamedTempFile,
        next_desc: u16,
        next_used: u16,
    }

    impl Rig {
        fn new(readonly: bool) -> Rig {
            let mem: &'static GuestMemoryMmap = Box::leak(Box::new(memory()));
            let vq = MockSplitQueue::new(mem, 64);
            let mut file = tempfile::NamedTempFile::new().expect("tempfile");
            let content: Vec<u8> = (0..8 * 512u32).map(|i| (i / 512 + 1) as u8).collect();
            file.write_all(&content).expect("write");
            let disk = std::fs::OpenOptions::new()
                .read(true)
                .write(!readonly)
                .open(file.path())
                .expect("open");
            let mut block = Block::new(disk, readonly, "kiln0").expect("block");
            let irq = Arc::new(IrqLine::new().expect("irq"));
            block
                .activate(
                    mem.clone(),
                    vec![vq.create_queue().expect("queue")],
                    irq.clone(),
                )
                .expect("activate");
            Rig {
                mem,
                vq,
                block,
                irq,
                file,
                next_desc: 0,
                next_used: 0,
            }
        }

        /// Submits one request and returns (status byte, used length).
        fn submit(&mut self, descs: &[Desc]) -> (u8, u32) {
            add_chain(&self.vq, self.next_desc, descs);
            self.next_desc += descs.len() as u16;
            assert_eq!(self.block.process_queue(), 1);
            let used = self
                .vq
                .used()
                .ring()
                .ref_at(self.next_used as usize)
                .expect("used")
                .load();
            self.next_used += 1;
            let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).expect("status");
            (status, used.len())
        }

        fn disk(&self) -> Vec<u8> {
            std::fs::read(self.file.path()).expect("read disk")
        }
    }

    fn data(mem: &GuestMemoryMmap, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(DATA))
            .expect("read data");
        v
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn reads_sectors() {
        let mut r = Rig::new(false);
        header(r.mem, VIRTIO_BLK_T_IN, 2);
        let (status, used) = r.submit(&[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]);
        assert_eq!((status, used), (OK, 1025));
        let got = data(r.mem, 1024);
        assert!(got[..512].iter().all(|&b| b == 3) && got[512..].iter().all(|&b| b == 4));
        assert_ne!(r.irq.status() & INT_VRING, 0);
        assert_eq!(r.irq.eventfd().read().expect("irq count"), 1);
    }

    #[test]
    fn writes_sectors_with_any_layout() {
        let mut r = Rig::new(false);
        // Header and data in one readable descriptor.
        header(r.mem, VIRTIO_BLK_T_OUT, 1);
        r.mem
            .write_slice(&[0xAB; 512], GuestAddress(HDR + 16))
            .expect("payload");
        let (status, used) = r.submit(&[(HDR, 16 + 512, false), (STATUS, 1, true)]);
        assert_eq!((status, used), (OK, 1));
        let disk = r.disk();
        assert!(disk[512..1024].iter().all(|&b| b == 0xAB));
        assert!(disk[..512].iter().all(|&b| b == 1));
        assert!(disk[1024..1536].iter().all(|&b| b == 3));
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mut r = Rig::new(true);
        assert_ne!(r.block.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let before = r.disk();
        header(r.mem, VIRTIO_BLK_T_OUT, 0);
        let (status, _) = r.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        assert_eq!(status, IOERR);
        header(r.mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let (status, _) = r.submit(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
        assert_eq!(status, IOERR);
        assert_eq!(r.disk(), before);
        // Reading still works.
        header(r.mem, VIRTIO_BLK_T_IN, 0);
        let (status, _) = r.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(status, OK);
    }

    #[test]
    fn flush_succeeds() {
        let mut r = Rig::new(false);
        header(r.mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(r.submit(&[(HDR, 16, false), (STATUS, 1, true)]), (OK, 1));
    }

    #[test]
    fn sectors_beyond_the_end_fail() {
        let mut r = Rig::new(false);
        for (t, sector) in [
            (VIRTIO_BLK_T_IN, 7u64),
            (VIRTIO_BLK_T_IN, 8),
            (VIRTIO_BLK_T_OUT, 7),
            (VIRTIO_BLK_T_IN, u64::MAX),
            (VIRTIO_BLK_T_OUT, u64::MAX / 512),
        ] {
            header(r.mem, t, sector);
            let data_writable = t == VIRTIO_BLK_T_IN;
            let (status, used) = r.submit(&[
                (HDR, 16, false),
                (DATA, 1024, data_writable),
                (STATUS, 1, true),
            ]);
            assert_eq!((status, used), (IOERR, 1), "type {t} sector {sector}");
        }
        assert!(r.disk().len() == 8 * 512, "the file grew");
    }

    #[test]
    fn get_id_returns_the_serial() {
        let mut r = Rig::new(false);
        r.mem
            .write_slice(&[0xFF; 20], GuestAddress(DATA))
            .expect("fill");
        header(r.mem, VIRTIO_BLK_T_GET_ID, 0);
        let (status, used) = r.submit(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
        assert_eq!((status, used), (OK, 21));
        let id = data(r.mem, 20);
        assert_eq!(&id[..5], b"kiln0");
        assert!(id[5..].iter().all(|&b| b == 0));
    }

    #[test]
    fn write_zeroes_and_discard_read_back_as_zero() {
        let mut r = Rig::new(false);
        for (t, flags, sector) in [
            (VIRTIO_BLK_T_WRITE_ZEROES, 0u32, 1u64),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                3,
            ),
            (VIRTIO_BLK_T_DISCARD, 0, 5),
        ] {
            header(r.mem, t, 0);
            r.mem
                .write_obj(
                    Segment {
                        sector,
                        num_sectors: 1,
                        flags,
                    },
                    GuestAddress(DATA),
                )
                .expect("segment");
            let (status, _) = r.submit(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
            assert_eq!(status, OK);
        }
        let disk = r.disk();
        for s in 0..8usize {
            let zero = [1, 3, 5].contains(&s);
            let sector = &disk[s * 512..(s + 1) * 512];
            assert!(
                sector
                    .iter()
                    .all(|&b| if zero { b == 0 } else { b == s as u8 + 1 }),
                "sector {s}"
            );
        }
        // Unknown segment flags and too many segments are refused.
        header(r.mem, VIRTIO_BLK_T_DISCARD, 0);
        r.mem
            .write_obj(
                Segment {
                    sector: 0,
                    num_sectors: 1,
                    flags: 1,
                },
                GuestAddress(DATA),
            )
            .expect("segment");
        let (status, _) = r.submit(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
        assert_eq!(status, UNSUPP);
        header(r.mem, VIRTIO_BLK_T_DISCARD, 0);
        let (status, _) = r.submit(&[(HDR, 16, false), (DATA, 16 * 17, false), (STATUS, 1, true)]);
        assert_eq!(status, IOERR);
    }

    #[test]
    fn malformed_requests_fail_alone() {
        let mut r = Rig::new(false);
        // Unknown request type.
        header(r.mem, 99, 0);
        assert_eq!(
            r.submit(&[(HDR, 16, false), (STATUS, 1, true)]),
            (UNSUPP, 1)
        );
        // Header too short.
        header(r.mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            r.submit(&[(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)])
                .0,
            IOERR
        );
        // Data not a whole number of sectors.
        header(r.mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            r.submit(&[(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)])
                .0,
            IOERR
        );
        // No writable descriptor at all: nowhere to put a status.
        header(r.mem, VIRTIO_BLK_T_IN, 0);
        let (status, used) = r.submit(&[(HDR, 16, false)]);
        assert_eq!((status, used), (NO_STATUS, 0));
        // A buffer outside guest memory.
        header(r.mem, VIRTIO_BLK_T_IN, 0);
        let (_, used) = r.submit(&[
            (HDR, 16, false),
            (0xFFFF_FFFF_0000, 512, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(used, 0);
        // A length that wraps around the address space.
        header(r.mem, VIRTIO_BLK_T_IN, 0);
        let (_, used) = r.submit(&[
            (HDR, 16, false),
            (u64::MAX - 10, 512, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(used, 0);
        // And the device still works.
        header(r.mem, VIRTIO_BLK_T_IN, 0);
        let (status, used) = r.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!((status, used), (OK, 513));
    }

    #[test]
    fn config_space_reports_capacity_and_limits() {
        let r = Rig::new(false);
        let mut cap = [0u8; 8];
        r.block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut b = [0xFFu8; 4];
        r.block.read_config(1000, &mut b);
        assert_eq!(b, [0; 4]);
        r.block.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        assert!(Block::new(
            tempfile::tempfile().expect("f"),
            false,
            "123456789012345678901"
        )
        .is_err());
    }
}
