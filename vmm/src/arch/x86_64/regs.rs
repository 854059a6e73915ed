//! vCPU register state at entry: for vCPU 0 a 64-bit entry (a flat GDT,
//! the first 4 GiB identity-mapped, long mode on); for every vCPU the FPU,
//! boot MSRs and LAPIC as firmware would leave them.

use crate::vstate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{FIRST_ADDR_PAST_32BITS, GDT_ADDR, IDT_ADDR, PDE_ADDR, PDPTE_ADDR, PML4_ADDR};

/// One page directory of 2 MiB pages per GiB identity-mapped.
const PAGE_DIRECTORIES: u64 = FIRST_ADDR_PAST_32BITS >> 30;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing boot tables into guest memory: {0}")]
    Memory(vm_memory::GuestMemoryError),
    #[error("KVM rejected the vCPU registers: {0}")]
    Registers(kvm_ioctls::Error),
    #[error("KVM did not accept the boot MSRs")]
    Msrs,
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
) -> Result<(), RegsError> {
    let gdt = [
        gdt_entry(0, 0, 0),            // null
        gdt_entry(0xa09b, 0, 0xfffff), // code, 64-bit
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(RegsError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(RegsError::Memory)?;
    // Identity-map the first 4 GiB with 2 MiB pages.
    mem.write_obj(PDPTE_ADDR | 3, GuestAddress(PML4_ADDR))
        .map_err(RegsError::Memory)?;
    for gib in 0..PAGE_DIRECTORIES {
        let pd = PDE_ADDR + gib * 0x1000;
        mem.write_obj(pd | 3, GuestAddress(PDPTE_ADDR + 8 * gib))
            .map_err(RegsError::Memory)?;
        // One write per table: 512 checked writes of 8 bytes cost more.
        let mut table = [0u8; 4096];
        for (i, entry) in table.chunks_exact_mut(8).enumerate() {
            let page = (gib << 30) | ((i as u64) << 21);
            entry.copy_from_slice(&(page | 0x83).to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(pd))
            .map_err(RegsError::Memory)?;
    }

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(RegsError::Registers)?;
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
    vcpu.set_sregs(&sregs).map_err(RegsError::Registers)?;

    let regs = kvm_regs {
        rip: entry,
        rsp: stack,
        rbp: stack,
        rsi,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(RegsError::Registers)?;
    Ok(())
}

// MSRs set at boot (Intel SDM vol. 4); values as a freshly reset CPU that
// firmware has prepared for a 64-bit kernel.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

// Local APIC registers and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// FPU, MSRs and LAPIC as a 64-bit kernel expects them at entry.
pub fn setup_cpu_state(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_bindings::kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::Registers)?;

    let entries: Vec<kvm_bindings::kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .iter()
    .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = kvm_bindings::Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs)?;
    let set = vcpu.set_msrs(&msrs).map_err(RegsError::Registers)?;
    if set != entries.len() {
        return Err(RegsError::Msrs);
    }

    // LINT0 delivers the legacy PIC's interrupts, LINT1 NMIs.
    let mut lapic = vcpu.get_lapic().map_err(RegsError::Registers)?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(RegsError::Registers)?;
    Ok(())
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let Some(bytes) = regs.get_mut(offset..offset + 4) else {
        return;
    };
    let mut v = [0u8; 4];
    for (d, s) in v.iter_mut().zip(bytes.iter()) {
        *d = *s as u8;
    }
    let value = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
    for (d, s) in bytes.iter_mut().zip(value.to_le_bytes()) {
        *d = s as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_into_segments() {
        let code = gdt_entry(0xa09b, 0, 0xfffff);
        let s = segment(code, 1);
        assert_eq!(
            (s.l, s.present, s.type_, s.selector, s.limit),
            (1, 1, 0xb, 8, 0xfffff)
        );
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.l, data.db, data.type_, data.selector), (0, 1, 3, 16));
    }
}
