//! The VM-wide x86 pieces KVM provides: the TSS pages VMX needs, the
//! in-kernel interrupt controllers (PIC, I/O APIC, local APICs) and the PIT.
//! Each is its own step so the machine can order and time them.

use kvm_bindings::kvm_pit_config;
use kvm_ioctls::VmFd;

use super::layout::TSS_ADDR;

/// Gives KVM the three pages at [`TSS_ADDR`] for real-mode emulation.
pub fn set_tss_address(vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
    vm.set_tss_address(TSS_ADDR as usize)
}

/// The in-kernel PIC and I/O APIC (and a local APIC per vCPU created
/// afterwards).
pub fn create_irqchip(vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
    vm.create_irq_chip()
}

/// The in-kernel PIT, which Linux uses while it calibrates its timers.
pub fn create_pit(vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
    vm.create_pit2(kvm_pit_config::default())
}
