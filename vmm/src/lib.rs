//! kiln-vmm: kiln's KVM microVM.
//!
//! It boots a kernel and initramfs directly (no firmware) with private
//! memory (a memfd when vhost-user backends must map it too), one thread per
//! vCPU and one epoll thread for the virtio-mmio devices (block, console
//! with named ports, rng, vhost-user fs, net through passt), each thread
//! under its own seccomp filter. [`run`] with a [`VmConfig`] (plain,
//! serializable data, in [`config`]) and a console to write to is the whole
//! interface. It knows nothing of recipes or of the agent protocol: the
//! agent's port is a named byte stream to it.
//!
//! The layout follows Firecracker's: [`arch`] for the x86 specifics (the
//! guest memory map in `arch::layout`), [`vstate`] for the VM, its memory
//! and vCPUs, [`devices`] for the emulated devices.

pub mod arch;
pub mod config;
pub mod devices;
pub mod event_loop;
#[doc(hidden)]
pub mod fuzz_harness;
pub mod host;
pub mod seccomp;
pub mod vm;
pub mod vstate;

pub use config::{AgentPortConfig, DiskConfig, DiskFormat, FsConfig, NetConfig, NetPeer, VmConfig};
pub use vm::{run, Vm, VmError};
pub use vstate::machine::{Exit, Stopper};
