//! Architecture-specific code. kiln-vmm runs x86_64 guests only; the
//! generic code (vstate, devices) reaches the x86 pieces through the
//! re-exports below.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{boot, cpuid, layout, mptable, regs, vm};
