//! The guest's physical address space and interrupt lines: every fixed
//! address kiln-vmm puts something at, once. Below 1 MiB the layout
//! follows the PC's (and what Firecracker and Cloud Hypervisor use), so a
//! Linux kernel booted without firmware finds things where it looks.
//!
//! ```text
//! 0x0000_0500  GDT, then IDT                 (after the real-mode IVT/BDA)
//! 0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  page tables: PML4, PDPT, 4 PDs (to 0xf000)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: the MP table               (not RAM in the e820 map)
//! 0x000a_0000  legacy VGA / BIOS hole           (not RAM in the e820 map)
//! 0x0010_0000  kernel, then RAM; initramfs at the top below 4 GiB
//! 0xd000_0000  virtio-mmio windows, 4 KiB each
//! 0xfec0_0000  I/O APIC
//! 0xfee0_0000  local APICs
//! 0xfffb_d000  KVM's TSS pages
//! ```

/// The boot GDT: null, 64-bit code, data and TSS descriptors (32 bytes).
/// Right after the real-mode interrupt table and BIOS data area
/// (0..0x500), which Linux may still read.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT (one null gate) after the GDT: the kernel installs its own
/// before it enables interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// The zero page: boot_params, where the Linux boot protocol has the
/// loader describe memory, the command line and the initramfs. RSI points
/// here at the kernel's entry.
pub const ZERO_PAGE: u64 = 0x7000;
/// vCPU 0's stack pointer at entry: just below the page tables, 16-byte
/// aligned; the kernel moves to its own stack at once.
pub const BOOT_STACK: u64 = 0x8ff0;
/// The PML4 of the boot page tables (CR3 at entry).
pub const PML4_ADDR: u64 = 0x9000;
/// The page-directory-pointer table: one entry per GiB.
pub const PDPTE_ADDR: u64 = 0xa000;
/// Four page directories (0xb000..0xf000) of 2 MiB pages identity-map
/// the first 4 GiB, so the virtio-mmio windows and APICs below 4 GiB are
/// reachable from the first instruction.
pub const PDE_ADDR: u64 = 0xb000;
/// The kernel command line, NUL-terminated (boot_params points at it).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// The room the command line has, terminator included.
pub const CMDLINE_MAX: usize = 4096;
/// The extended BIOS data area, the last KiB of base memory. The MP table
/// is written here because Linux scans it for one; for the same reason the
/// e820 map ends low RAM here.
pub const EBDA_START: u64 = 0x9fc00;
/// The end of base memory (the legacy VGA and BIOS hole follows), and so
/// of the room the MP table has.
pub const EBDA_END: u64 = 0xa0000;
/// The first byte above the legacy hole: where the kernel is loaded and
/// the e820 map's main RAM starts. Memory smaller than this has no room
/// for a kernel.
pub const HIMEM_START: u64 = 0x10_0000;
/// 4 GiB: the initramfs must end below it (boot_params holds 32-bit
/// addresses for it), and the boot page tables map up to it.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// The first virtio-mmio register window; device N's is at
/// `MMIO_BASE + N * MMIO_WINDOW_SIZE`. Above any RAM a kiln guest gets
/// below 4 GiB, under the APICs.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// One virtio-mmio device's register window (the `4K` of the kernel's
/// `virtio_mmio.device=4K@BASE:IRQ`).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// The I/O APIC's registers, at the PC's fixed address (the MP table
/// names it; KVM's in-kernel I/O APIC answers there).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Every local APIC's registers, at the architectural default.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Three pages KVM needs for the TSS of Intel VMX's real-mode emulation
/// (KVM_SET_TSS_ADDR): any unused guest-physical range below 4 GiB; this
/// one is under the BIOS ROM area, out of RAM and of the windows above.
pub const TSS_ADDR: u64 = 0xfffb_d000;

/// I/O APIC input lines (KVM's in-kernel I/O APIC has 24).
pub const IOAPIC_PINS: u8 = 24;
/// COM1's ISA interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// The first interrupt line given to virtio devices (above the serial's).
pub const IRQ_BASE: u32 = 5;
/// The last line the I/O APIC has; virtio devices get IRQ_BASE..=IRQ_MAX.
pub const IRQ_MAX: u32 = IOAPIC_PINS as u32 - 1;

// The regions do not overlap (checked when the crate compiles).
const _: () = {
    assert!(GDT_ADDR + 4 * 8 <= IDT_ADDR);
    assert!(IDT_ADDR + 8 <= ZERO_PAGE);
    assert!(ZERO_PAGE + 0x1000 <= BOOT_STACK);
    assert!(BOOT_STACK <= PML4_ADDR);
    assert!(PML4_ADDR + 0x1000 <= PDPTE_ADDR);
    assert!(PDPTE_ADDR + 0x1000 <= PDE_ADDR);
    assert!(PDE_ADDR + 4 * 0x1000 <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= EBDA_START);
    assert!(EBDA_START < EBDA_END && EBDA_END <= HIMEM_START);
    // A window for every virtio interrupt line, below the I/O APIC.
    assert!(MMIO_BASE + (IRQ_MAX - IRQ_BASE + 1) as u64 * MMIO_WINDOW_SIZE <= IOAPIC_ADDR as u64);
    assert!(TSS_ADDR + 3 * 0x1000 <= FIRST_ADDR_PAST_32BITS);
};
