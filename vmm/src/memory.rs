//! Guest memory: one memfd mapped into kiln-vmm and, through its file
//! descriptor, shareable with vhost-user backends (virtiofsd).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

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

/// `size` bytes of guest memory at guest physical address 0, backed by a
/// memfd.
pub fn create(size: u64) -> Result<(GuestMemoryMmap, File), MemoryError> {
    if size < 0x10_0000 || size % 4096 != 0 {
        return Err(MemoryError::BadSize(size));
    }
    let file = memfd("kiln-guest-ram", size)?;
    let region_file = file.try_clone().map_err(MemoryError::Memfd)?;
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(region_file, 0)),
    )])
    .map_err(MemoryError::Map)?;
    Ok((mem, file))
}
