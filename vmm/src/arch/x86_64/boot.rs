//! Direct boot of a Linux kernel (uncompressed vmlinux, 64-bit entry):
//! kernel, initramfs and command line into guest memory, and the "zero
//! page" (boot_params) with the e820 map. Where each goes is in
//! [`super::layout`].

use std::fs::File;

use crate::vstate::memory::GuestMemoryMmap;
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, FIRST_ADDR_PAST_32BITS, HIMEM_START, ZERO_PAGE,
};

const E820_RAM: u32 = 1;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("loading the kernel: {0}")]
    Kernel(linux_loader::loader::Error),
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("writing the command line: {0}")]
    LoadCmdline(linux_loader::loader::Error),
    #[error("reading the initramfs: {0}")]
    Initrd(std::io::Error),
    #[error("the initramfs ({0} bytes) does not fit in guest memory")]
    InitrdTooLarge(u64),
    #[error("writing to guest memory: {0}")]
    Memory(vm_memory::GuestMemoryError),
    #[error("writing boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
}

/// Where the vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub rip: u64,
    /// The boot_params address, passed in RSI.
    pub rsi: u64,
}

/// Loads `kernel` (vmlinux), `initrd` and `cmdline` into `mem`.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    kernel: &mut File,
    initrd: Option<&[u8]>,
    cmdline: &str,
) -> Result<Entry, BootError> {
    let loaded =
        Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(BootError::Kernel)?;
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(BootError::Cmdline)?;
    cl.insert_str(cmdline).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(BootError::LoadCmdline)?;

    let mem_end = mem.last_addr().raw_value() + 1;
    let mut params = boot_params::default();
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;

    if let Some(data) = initrd {
        // At the top of memory (below 4 GiB), page-aligned.
        let top = mem_end.min(FIRST_ADDR_PAST_32BITS);
        let size = data.len() as u64;
        let start = top
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= loaded.kernel_end)
            .ok_or(BootError::InitrdTooLarge(size))?;
        mem.write_slice(data, GuestAddress(start))
            .map_err(BootError::Memory)?;
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let e820 = [(0, EBDA_START), (HIMEM_START, mem_end - HIMEM_START)];
    for (i, &(addr, size)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = e820.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(BootError::BootParams)?;
    Ok(Entry {
        rip: loaded.kernel_load.raw_value(),
        rsi: ZERO_PAGE,
    })
}
