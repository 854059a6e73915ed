//! The VM's state, independent of the architecture: guest memory, the
//! machine (KVM VM, vCPUs, devices, the run), the vCPU threads' loop and
//! the bus they dispatch exits to.

pub mod bus;
pub mod machine;
pub mod memory;
pub mod vcpu;
