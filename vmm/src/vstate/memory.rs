//! Guest memory: private anonymous memory, or, when vhost-user backends
//! (virtiofsd) must map it too, one memfd shared through its descriptor.
//!
//! Private memory is mapped here rather than by vm-memory, 2 MiB-aligned and
//! advised for transparent huge pages, as QEMU does: KVM maps a guest page
//! 2 MiB at a time only where the host's mapping is a huge page and guest
//! and host addresses agree modulo 2 MiB. Each first touch of a guest page
//! is a fault in KVM (under nested KVM an exit to L1's kernel), so a boot
//! takes one per 2 MiB instead of one per 4 KiB.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use vm_memory::bitmap::{Bitmap, NewBitmap, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use crate::arch::layout::HIMEM_START;

/// Guest memory as the whole crate sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<Keeper>;

/// The x86 huge page size, which KVM's large mappings follow.
const HUGE_PAGE: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("creating the guest memory file: {0}")]
    Memfd(io::Error),
    #[error("sizing guest memory to {0} bytes: {1}")]
    Size(u64, io::Error),
    #[error("mapping guest memory: {0}")]
    Map(vm_memory::mmap::FromRangesError),
    #[error("guest memory of {0} bytes is too small or not page-aligned")]
    BadSize(u64),
    #[error("mapping {0} bytes of guest memory: {1}")]
    Mmap(u64, io::Error),
}

/// An anonymous mapping this module made, unmapped when dropped.
#[derive(Debug)]
pub struct Mapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory, owned by this value alone; vm-memory
// does all access to it through its own (Send + Sync) region.
unsafe impl Send for Mapping {}
// SAFETY: as above; `Mapping` itself never reads or writes the memory.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` is a mapping made by `huge_page_aligned`
        // and owned by this value; the vm-memory region that used it holds
        // this value, so nothing refers to the memory any more.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// vm-memory's per-region bitmap slot, used to hold what vm-memory does not
/// own: the mapping under a region kiln-vmm mapped itself. It then lives
/// exactly as long as the region, whoever holds the last reference to it.
/// No dirty tracking.
#[derive(Debug, Default)]
pub struct Keeper {
    _mapping: Option<Mapping>,
}

impl WithBitmapSlice<'_> for Keeper {
    type S = ();
}

impl Bitmap for Keeper {
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, _offset: usize) {}
}

impl NewBitmap for Keeper {
    fn with_len(_len: usize) -> Self {
        Keeper { _mapping: None }
    }
}

/// `size` bytes of private anonymous memory at a 2 MiB-aligned address,
/// advised for transparent huge pages where the kernel has them.
fn huge_page_aligned(size: usize) -> Result<Mapping, MemoryError> {
    let err = |e| MemoryError::Mmap(size as u64, e);
    let len = size
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| err(io::Error::from_raw_os_error(libc::ENOMEM)))?;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks;
    // nothing else refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(err(io::Error::last_os_error()));
    }
    let start = base as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = len - head - size;
    // SAFETY: both ranges lie inside the mapping just made, outside the
    // part kept; unmapping them cannot fail for lack of a mapping.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
    }
    let mapping = Mapping {
        addr: aligned as *mut u8,
        len: size,
    };
    // Advice only: a kernel without transparent huge pages says EINVAL and
    // the memory works the same in 4 KiB pages.
    // SAFETY: madvise on the mapping just made, which `mapping` owns.
    unsafe { libc::madvise(mapping.addr.cast(), size, libc::MADV_HUGEPAGE) };
    Ok(mapping)
}

/// An anonymous in-memory file of `size` bytes.
pub fn memfd(name: &str, size: u64) -> Result<File, MemoryError> {
    let name = CString::new(name).map_err(|e| MemoryError::Memfd(io::Error::other(e)))?;
    // SAFETY: memfd_create with a valid NUL-terminated name; the returned
    // descriptor is checked and then owned by `File`.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| MemoryError::Size(size, e))?;
    Ok(file)
}

/// What guest memory is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory: the cheapest to fault in, which a boot
    /// does for every page it touches (under nested KVM each first touch
    /// is an exit to L1's kernel, and a shmem fault there costs more than
    /// an anonymous one).
    Private,
    /// A memfd that vhost-user backends (virtiofsd) can map too.
    Shared,
}

/// `size` bytes of guest memory at guest physical address 0, and, for
/// [`Backing::Shared`], the memfd behind them.
pub fn create(size: u64, backing: Backing) -> Result<(GuestMemoryMmap, Option<File>), MemoryError> {
    // Below HIMEM_START there is no room for a kernel.
    if size < HIMEM_START || size % 4096 != 0 {
        return Err(MemoryError::BadSize(size));
    }
    if backing == Backing::Private {
        let mapping = huge_page_aligned(size as usize)?;
        let addr = mapping.addr;
        let builder = MmapRegionBuilder::new_with_bitmap(
            size as usize,
            Keeper {
                _mapping: Some(mapping),
            },
        )
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE);
        // SAFETY: `addr` and `size` are exactly the mapping the builder's
        // bitmap slot owns, so the region never outlives its memory.
        let region = unsafe { builder.with_raw_mmap_pointer(addr) }
            .build()
            .map_err(|e| MemoryError::Map(vm_memory::mmap::FromRangesError::MmapRegion(e)))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or(MemoryError::Map(
            vm_memory::mmap::FromRangesError::InvalidGuestRegion,
        ))?;
        let mem =
            GuestMemoryMmap::from_regions(vec![region]).map_err(|e| MemoryError::Map(e.into()))?;
        return Ok((mem, None));
    }
    let file = memfd("kiln-guest-ram", size)?;
    let region_file = file.try_clone().map_err(MemoryError::Memfd)?;
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(region_file, 0)),
    )])
    .map_err(MemoryError::Map)?;
    Ok((mem, Some(file)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn private_memory_has_no_file_and_shared_memory_is_one_memfd() {
        let (mem, file) = create(2 << 20, Backing::Private).expect("private");
        assert!(file.is_none());
        assert!(mem.read_obj::<u8>(GuestAddress((2 << 20) - 1)).is_ok());
        assert!(mem.read_obj::<u8>(GuestAddress(2 << 20)).is_err());
        mem.write_obj(0xabu8, GuestAddress(4096)).expect("write");
        let (mem, file) = create(2 << 20, Backing::Shared).expect("shared");
        let file = file.expect("a memfd");
        assert_eq!(file.metadata().expect("stat").len(), 2 << 20);
        // The file is the memory: what the guest writes, a backend reads.
        mem.write_obj(0xcdu8, GuestAddress(4096)).expect("write");
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut b, 4096).expect("read");
        assert_eq!(b[0], 0xcd);
        // Private memory starts on a huge-page boundary, where KVM can map
        // it 2 MiB at a time.
        let (mem, _) = create(64 << 20, Backing::Private).expect("private");
        let host = vm_memory::GuestMemoryBackend::get_host_address(&mem, GuestAddress(0))
            .expect("host address");
        assert_eq!(host as usize % HUGE_PAGE, 0);
        mem.write_obj(1u64, GuestAddress((64 << 20) - 8))
            .expect("last word");
        drop(mem);
        assert!(matches!(
            create(1000, Backing::Private),
            Err(MemoryError::BadSize(1000))
        ));
    }
}
