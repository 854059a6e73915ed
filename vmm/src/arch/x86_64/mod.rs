//! x86_64: where things live in guest memory ([`layout`]), how a Linux
//! kernel is loaded ([`boot`]) and finds its CPUs ([`mptable`]), the vCPU
//! state it expects at entry ([`regs`], [`cpuid`]) and the VM-wide devices
//! KVM emulates for x86 ([`vm`]).

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod vm;
