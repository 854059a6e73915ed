//! A virtio-blk request from descriptor chain to completion: the chain
//! split into header, data and status byte, the header turned into a
//! typed [`Request`] checked against the disk, then run.

use crate::vstate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_blk::*;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::ByteValued;

use super::device::DiskProperties;
use super::{MAX_SEGMENTS, SECTOR_SIZE, SERIAL_LEN};

/// The request header (virtio 1.2, 5.2.6).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct RequestHeader {
    pub(crate) request_type: u32,
    pub(crate) reserved: u32,
    pub(crate) sector: u64,
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

/// What a request asks of the disk, its ranges checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Fill the guest's `len` bytes of buffers from byte `offset`.
    In {
        offset: u64,
        len: usize,
    },
    /// Write the guest's `len` bytes of data at byte `offset`.
    Out {
        offset: u64,
        len: usize,
    },
    Flush,
    /// The disk's serial.
    GetId,
    /// DISCARD (`discard`) or WRITE_ZEROES over the `count` segments
    /// after the header; each is checked as it is read, so the ones before
    /// a bad one take effect.
    Zero {
        discard: bool,
        count: usize,
    },
}

/// The parts of a chain: the device-readable bytes after the header, the
/// device-writable bytes before the status byte, and the status byte.
struct Buffers<'a> {
    readable: Reader<'a>,
    writable: Writer<'a>,
    status: Writer<'a>,
}

impl<'a> Buffers<'a> {
    /// None when the chain has no place for a status byte (no writable
    /// byte, or a descriptor outside guest memory).
    fn split(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Option<Buffers<'a>> {
        let readable = Reader::new(mem, chain.clone()).ok()?;
        let mut writable = Writer::new(mem, chain).ok()?;
        let len = writable.available_bytes();
        if len == 0 {
            return None;
        }
        // The status byte is the last writable byte.
        let status = writable.split_at(len - 1).ok()?;
        Some(Buffers {
            readable,
            writable,
            status,
        })
    }
}

impl Request {
    /// The request `header` makes, given how many data bytes the chain
    /// offers each way; Err is the status it fails with.
    fn parse(
        header: RequestHeader,
        readable: usize,
        writable: usize,
        disk: &DiskProperties,
    ) -> Result<Request, u32> {
        match header.request_type {
            VIRTIO_BLK_T_IN => checked_range(header.sector, writable as u64, disk.nsectors())
                .map(|offset| Request::In {
                    offset,
                    len: writable,
                })
                .ok_or(VIRTIO_BLK_S_IOERR),
            VIRTIO_BLK_T_OUT => {
                if disk.read_only() {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                checked_range(header.sector, readable as u64, disk.nsectors())
                    .map(|offset| Request::Out {
                        offset,
                        len: readable,
                    })
                    .ok_or(VIRTIO_BLK_S_IOERR)
            }
            VIRTIO_BLK_T_FLUSH => Ok(Request::Flush),
            VIRTIO_BLK_T_GET_ID => Ok(Request::GetId),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if disk.read_only() {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let count = readable / std::mem::size_of::<Segment>();
                if count == 0 || count > MAX_SEGMENTS as usize {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                Ok(Request::Zero {
                    discard: header.request_type == VIRTIO_BLK_T_DISCARD,
                    count,
                })
            }
            _ => Err(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// Runs the request; returns (status, data bytes written to the guest).
    fn run(self, disk: &DiskProperties, buffers: &mut Buffers<'_>) -> (u32, usize) {
        let ioerr = (VIRTIO_BLK_S_IOERR, 0);
        match self {
            Request::In { offset, len } => {
                match disk.read_to_guest(offset, len, &mut buffers.writable) {
                    Ok(()) => (VIRTIO_BLK_S_OK, len),
                    Err(_) => (VIRTIO_BLK_S_IOERR, buffers.writable.bytes_written()),
                }
            }
            Request::Out { offset, len } => {
                match disk.write_from_guest(offset, len, &mut buffers.readable) {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(_) => ioerr,
                }
            }
            Request::Flush => match disk.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(_) => ioerr,
            },
            Request::GetId => {
                // The serial, NUL-padded when shorter than the buffer.
                let n = buffers.writable.available_bytes().min(SERIAL_LEN);
                match std::io::Write::write_all(&mut buffers.writable, &disk.image_id()[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n),
                    Err(_) => ioerr,
                }
            }
            Request::Zero { discard, count } => {
                for _ in 0..count {
                    let (offset, len) = match next_segment(&mut buffers.readable, disk, discard) {
                        Ok(range) => range,
                        Err(status) => return (status, 0),
                    };
                    if disk.zero_range(offset, len, discard).is_err() {
                        return ioerr;
                    }
                }
                (VIRTIO_BLK_S_OK, 0)
            }
        }
    }
}

/// Reads the next DISCARD / WRITE_ZEROES segment and checks it; returns
/// its byte range, or the status the request fails with.
fn next_segment(
    reader: &mut Reader<'_>,
    disk: &DiskProperties,
    discard: bool,
) -> Result<(u64, u64), u32> {
    let seg = reader
        .read_obj::<Segment>()
        .map_err(|_| VIRTIO_BLK_S_IOERR)?;
    let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
    let offset = checked_range(seg.sector, len, disk.nsectors()).ok_or(VIRTIO_BLK_S_IOERR)?;
    // DISCARD takes no flags; WRITE_ZEROES knows only UNMAP.
    let allowed = if discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    if seg.flags & !allowed != 0 {
        return Err(VIRTIO_BLK_S_UNSUPP);
    }
    Ok((offset, len))
}

/// The byte offset of `len` bytes at `sector`, if they lie within a disk
/// of `nsectors` and are whole sectors.
fn checked_range(sector: u64, len: u64, nsectors: u64) -> Option<u64> {
    if len % SECTOR_SIZE != 0 {
        return None;
    }
    let end = sector.checked_add(len / SECTOR_SIZE)?;
    if end > nsectors {
        return None;
    }
    sector.checked_mul(SECTOR_SIZE)
}

/// Runs one request to completion.
pub fn execute(
    disk: &DiskProperties,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Completion {
    let Some(mut buffers) = Buffers::split(mem, chain) else {
        // Nowhere to put a status: the chain is returned untouched.
        return Completion {
            status: VIRTIO_BLK_S_IOERR as u8,
            used_len: 0,
        };
    };
    let (status, data_written) = match buffers.readable.read_obj::<RequestHeader>() {
        Ok(header) => {
            let readable = buffers.readable.available_bytes();
            let writable = buffers.writable.available_bytes();
            match Request::parse(header, readable, writable, disk) {
                Ok(request) => request.run(disk, &mut buffers),
                Err(status) => (status, 0),
            }
        }
        Err(_) => (VIRTIO_BLK_S_IOERR, 0),
    };
    let status = status as u8;
    let wrote_status = buffers.status.write_obj(status).is_ok();
    Completion {
        status,
        used_len: (data_written + usize::from(wrote_status)) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::Block;
    use crate::devices::virtio::test_utils::{
        add_chain, blk_header, memory, Desc, DATA, HDR, NO_STATUS, STATUS,
    };
    use crate::devices::virtio::{IrqLine, VirtioDevice};
    use std::io::Write;
    use std::sync::Arc;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

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
        blk_header(r.mem, VIRTIO_BLK_T_IN, 2);
        let (status, used) = r.submit(&[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]);
        assert_eq!((status, used), (OK, 1025));
        let got = data(r.mem, 1024);
        assert!(got[..512].iter().all(|&b| b == 3) && got[512..].iter().all(|&b| b == 4));
        assert_ne!(r.irq.status() & VIRTIO_MMIO_INT_VRING, 0);
        assert_eq!(r.irq.eventfd().read().expect("irq count"), 1);
    }

    #[test]
    fn writes_sectors_with_any_layout() {
        let mut r = Rig::new(false);
        // Header and data in one readable descriptor.
        blk_header(r.mem, VIRTIO_BLK_T_OUT, 1);
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
        blk_header(r.mem, VIRTIO_BLK_T_OUT, 0);
        let (status, _) = r.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        assert_eq!(status, IOERR);
        blk_header(r.mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let (status, _) = r.submit(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
        assert_eq!(status, IOERR);
        assert_eq!(r.disk(), before);
        // Reading still works.
        blk_header(r.mem, VIRTIO_BLK_T_IN, 0);
        let (status, _) = r.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(status, OK);
    }

    #[test]
    fn flush_succeeds() {
        let mut r = Rig::new(false);
        blk_header(r.mem, VIRTIO_BLK_T_FLUSH, 0);
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
            blk_header(r.mem, t, sector);
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
        blk_header(r.mem, VIRTIO_BLK_T_GET_ID, 0);
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
            blk_header(r.mem, t, 0);
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
        blk_header(r.mem, VIRTIO_BLK_T_DISCARD, 0);
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
        blk_header(r.mem, VIRTIO_BLK_T_DISCARD, 0);
        let (status, _) = r.submit(&[(HDR, 16, false), (DATA, 16 * 17, false), (STATUS, 1, true)]);
        assert_eq!(status, IOERR);
    }

    #[test]
    fn malformed_requests_fail_alone() {
        let mut r = Rig::new(false);
        // Unknown request type.
        blk_header(r.mem, 99, 0);
        assert_eq!(
            r.submit(&[(HDR, 16, false), (STATUS, 1, true)]),
            (UNSUPP, 1)
        );
        // Header too short.
        blk_header(r.mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            r.submit(&[(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)])
                .0,
            IOERR
        );
        // Data not a whole number of sectors.
        blk_header(r.mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            r.submit(&[(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)])
                .0,
            IOERR
        );
        // No writable descriptor at all: nowhere to put a status.
        blk_header(r.mem, VIRTIO_BLK_T_IN, 0);
        let (status, used) = r.submit(&[(HDR, 16, false)]);
        assert_eq!((status, used), (NO_STATUS, 0));
        // A buffer outside guest memory.
        blk_header(r.mem, VIRTIO_BLK_T_IN, 0);
        let (_, used) = r.submit(&[
            (HDR, 16, false),
            (0xFFFF_FFFF_0000, 512, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(used, 0);
        // A length that wraps around the address space.
        blk_header(r.mem, VIRTIO_BLK_T_IN, 0);
        let (_, used) = r.submit(&[
            (HDR, 16, false),
            (u64::MAX - 10, 512, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(used, 0);
        // And the device still works.
        blk_header(r.mem, VIRTIO_BLK_T_IN, 0);
        let (status, used) = r.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!((status, used), (OK, 513));
    }
}
