//! kiln-vmm: kiln's KVM microVM.
//!
//! This crate knows nothing of recipes or of the agent protocol. So far it
//! holds what the backend seam needs to decide whether KVM can run kiln's
//! guest on this host ([`host::probe`]) and the virtio devices the VMM
//! will carry ([`devices`]).

pub mod boot;
pub mod bus;
pub mod devices;
pub mod event_loop;
#[doc(hidden)]
pub mod fuzz_harness;
pub mod host;
pub mod machine;
pub mod memory;
pub mod mptable;
pub mod seccomp;
pub mod vcpu;
pub mod vm;

pub use machine::{Exit, Stopper};
pub use vm::{run, AgentPort, DiskConfig, FsConfig, Vm, VmConfig, VmError};
