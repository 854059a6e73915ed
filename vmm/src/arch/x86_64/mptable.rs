//! The Intel MultiProcessor table (MP spec 1.4): how a Linux kernel booted
//! without ACPI finds its application processors, the I/O APIC and the
//! routing of ISA interrupts (the virtio-mmio lines among them).
//!
//! It lives at the start of the EBDA ([`EBDA_START`]), the last KiB of
//! base memory, which Linux scans and which the e820 map leaves out of RAM.

use crate::vstate::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{EBDA_END, EBDA_START, IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};

/// The room the table has (up to the end of base memory).
const MPTABLE_ROOM: usize = (EBDA_END - EBDA_START) as usize;
/// The most vCPUs whose entries fit in `MPTABLE_ROOM`.
pub const MAX_CPUS: u8 = 32;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
#[cfg(test)]
const PROCESSOR_LEN: usize = 20;
#[cfg(test)]
const ENTRY_LEN: usize = 8;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 signature and FPU + APIC feature flags, as firmware reports.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 1 | 1 << 9;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs: the MP table describes 1 to {MAX_CPUS}")]
    CpuCount(u8),
    #[error("writing the MP table: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, &b| a.wrapping_add(b))
        .wrapping_neg()
}

/// The table's bytes for `cpus` processors, to be placed at
/// [`EBDA_START`].
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::CpuCount(cpus));
    }
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    // ISA IRQ n arrives on I/O APIC pin n, with the bus's default polarity
    // and trigger (flags 0).
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
    }
    // Every local APIC: LINT0 takes the legacy PIC, LINT1 NMIs.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(cpus) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;

    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"KILN    ");
    header.extend_from_slice(b"KILN-VMM    ");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0; 4]); // no extended table
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&((EBDA_START as u32) + FLOATING_LEN as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4);
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // a table follows; no default config
    floating[10] = checksum(&floating);

    let mut out = floating;
    out.extend_from_slice(&table);
    debug_assert!(out.len() <= MPTABLE_ROOM);
    Ok(out)
}

/// Writes the table for `cpus` processors into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_hold_and_every_cpu_is_listed() {
        for cpus in [1u8, 2, 4, MAX_CPUS] {
            let t = build(cpus).expect("table");
            assert!(t.len() <= MPTABLE_ROOM);
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
            let ptr = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as u64;
            let table = &t[(ptr - EBDA_START) as usize..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(table.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
            // Walk the entries as Linux does.
            let count = u16::from_le_bytes([table[34], table[35]]);
            let mut at = HEADER_LEN;
            let mut procs = Vec::new();
            for _ in 0..count {
                match table[at] {
                    ENTRY_PROCESSOR => {
                        procs.push((table[at + 1], table[at + 3]));
                        at += PROCESSOR_LEN;
                    }
                    1..=4 => at += ENTRY_LEN,
                    other => panic!("unknown entry type {other}"),
                }
            }
            assert_eq!(at, len);
            assert_eq!(procs.len(), usize::from(cpus));
            assert_eq!(procs[0], (0, CPU_ENABLED | CPU_BOOTSTRAP));
            assert!(procs[1..].iter().all(|&(_, f)| f == CPU_ENABLED));
        }
    }

    #[test]
    fn cpu_counts_out_of_range_are_refused() {
        assert!(build(0).is_err());
        assert!(build(MAX_CPUS + 1).is_err());
    }
}
