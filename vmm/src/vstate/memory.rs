//! Guest memory: private anonymous memory, or, when vhost-user backends
//! (virtiofsd) must map it too, one memfd shared through its descriptor.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress};

use crate::arch::layout::HIMEM_START;

/// Guest memory as the whole crate sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap;

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
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(MemoryError::Map)?;
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
        assert!(matches!(
            create(1000, Backing::Private),
            Err(MemoryError::BadSize(1000))
        ));
    }
}
