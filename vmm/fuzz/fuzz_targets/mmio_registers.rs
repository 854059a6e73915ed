//! The virtio-mmio register interface: arbitrary register accesses.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_vmm::fuzz_harness::mmio_registers(data));
