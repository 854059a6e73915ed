//! The throwaway VM and everything it runs on: the backends that boot it,
//! the guest agent session (and the tar streams directories are copied
//! as), disks and shares, and the artifacts it boots (kernel, tools image,
//! initramfs, in kiln's cache). Uses only `util`.

pub mod backend;
pub mod cache;
pub mod disk;
mod error;
pub mod guest;
pub mod host_tools;
pub mod initramfs;
pub mod kernel;
pub mod logged_job;
pub mod mmdebstrap;
pub mod net;
pub mod session;
pub mod share;
mod socket_daemon;
pub mod tools;
pub mod tree_copy;

pub use error::SandboxError;
