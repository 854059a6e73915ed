//! The CPUID a vCPU sees: what the host's KVM supports, adapted per vCPU.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

/// CPUID bits the guest must see differently from the host.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// KVM emulates the TSC-deadline LAPIC timer but leaves advertising it to
/// the VMM. Without it Linux calibrates the LAPIC timer against the PIT at
/// boot: 100 ms of ticks, over a second under nested KVM.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Adapts the host's supported CPUID for vCPU `index` of `count`: the
/// hypervisor bit on, the TSC-deadline timer on where KVM has it
/// (`tsc_deadline`, KVM_CAP_TSC_DEADLINE_TIMER), the APIC ID and logical
/// processor count right, leaves describing caches shared by host cores
/// not passed through as is.
pub fn filter_cpuid(cpuid: &mut CpuId, index: u8, count: u8, tsc_deadline: bool) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                // APIC ID in EBX[31:24], logical processors in [23:16].
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count field is valid
                }
            }
            // Extended topology: the x2APIC ID of this vCPU.
            0xb | 0x1f => e.edx = u32::from(index),
            // Deterministic cache parameters: cores sharing each cache.
            4 => {
                e.eax &= !0xfc00_0000;
                if count > 1 {
                    e.eax |= (u32::from(count) - 1) << 26;
                }
            }
            // Power management features the VM cannot honour.
            6 => e.ecx &= !(1 << 3),
            _ => {}
        }
    }
}

/// The CPUID leaves this host's KVM can give a guest.
pub fn supported(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
}

/// Whether KVM emulates the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER).
pub fn tsc_deadline_timer(kvm: &Kvm) -> bool {
    kvm.check_extension(Cap::TscDeadlineTimer)
}

/// Gives `vcpu` (number `index` of `count`) the `supported` CPUID as
/// [`filter_cpuid`] adapts it.
pub fn set_vcpu_cpuid(
    vcpu: &VcpuFd,
    supported: &CpuId,
    index: u8,
    count: u8,
    tsc_deadline: bool,
) -> Result<(), kvm_ioctls::Error> {
    let mut cpuid = supported.clone();
    filter_cpuid(&mut cpuid, index, count, tsc_deadline);
    vcpu.set_cpuid2(&cpuid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn cpuid_says_hypervisor_and_names_the_vcpu() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_1234,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 7,
                ..Default::default()
            },
        ];
        let mut cpuid = CpuId::from_entries(&entries).expect("cpuid");
        let mut without = cpuid.clone();
        filter_cpuid(&mut without, 2, 4, false);
        assert_eq!(without.as_slice()[0].ecx & (1 << 24), 0);
        filter_cpuid(&mut cpuid, 2, 4, true);
        let e = cpuid.as_slice();
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_ne!(e[0].ecx & (1 << 24), 0, "TSC-deadline timer");
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x1234);
        assert_eq!(e[1].edx, 2);
    }
}
