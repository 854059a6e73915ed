//! kiln-vmm: kiln's KVM microVM.
//!
//! It boots a kernel and initramfs directly (no firmware) with memfd-backed
//! memory, one thread per vCPU and one epoll thread for the virtio-mmio
//! devices (block, console with named ports, rng, vhost-user fs), each
//! thread under its own seccomp filter. [`run`] with a [`VmConfig`] is the
//! whole interface. It knows nothing of recipes or of the agent protocol:
//! the agent's port is a named byte stream to it.

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
