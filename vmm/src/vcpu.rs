//! vCPU register setup for a 64-bit entry: an identity-mapped first GiB,
//! a flat GDT, long mode on.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the boot-time tables live (below 1 MiB, away from the load address).
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPTE_ADDR: u64 = 0xa000;
/// Four page directories (0xb000..0xf000) map the first 4 GiB, so the
/// virtio-mmio windows below 4 GiB are reachable too.
pub const PDE_ADDR: u64 = 0xb000;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("writing boot tables into guest memory: {0}")]
    Memory(vm_memory::GuestMemoryError),
    #[error("KVM rejected the vCPU registers: {0}")]
    Registers(kvm_ioctls::Error),
}

/// A GDT entry from its flags, base and limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: ((((entry >> 32) & 0x000f_0000) | (entry & 0x0000_ffff)) as u32),
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT and page tables and puts `vcpu` in 64-bit mode at `entry`
/// with the stack at `stack` and `rsi` in RSI (the Linux boot protocol
/// passes boot_params there).
pub fn setup_long_mode(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: u64,
    stack: u64,
    rsi: u64,
) -> Result<(), VcpuError> {
    let gdt = [
        gdt_entry(0, 0, 0),            // null
        gdt_entry(0xa09b, 0, 0xfffff), // code, 64-bit
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(VcpuError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(VcpuError::Memory)?;
    // Identity-map the first 4 GiB with 2 MiB pages.
    mem.write_obj(PDPTE_ADDR | 3, GuestAddress(PML4_ADDR))
        .map_err(VcpuError::Memory)?;
    for gib in 0..4u64 {
        let pd = PDE_ADDR + gib * 0x1000;
        mem.write_obj(pd | 3, GuestAddress(PDPTE_ADDR + 8 * gib))
            .map_err(VcpuError::Memory)?;
        for i in 0..512u64 {
            let page = (gib << 30) | (i << 21);
            mem.write_obj(page | 0x83, GuestAddress(pd + 8 * i))
                .map_err(VcpuError::Memory)?;
        }
    }

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(VcpuError::Registers)?;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    let tss = segment(gdt[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(VcpuError::Registers)?;

    let regs = kvm_regs {
        rip: entry,
        rsp: stack,
        rbp: stack,
        rsi,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(VcpuError::Registers)?;
    Ok(())
}
