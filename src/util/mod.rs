//! Host utilities with no notion of a VM: finding programs, sizes, output
//! tails, child processes and directories kiln owns, sparse files, walks of received
//! trees, Ctrl-C, the terminal, the spinner, the user-namespace preflight,
//! the installed packages a dpkg status lists.

pub mod ctrl_c;
pub mod owned_dir;
pub mod packages;
pub mod process;
pub mod size;
pub mod sparse;
pub mod spinner;
pub mod stream_tail;
pub mod tail;
pub mod terminal;
pub mod tree;
pub mod userns;
pub mod which;
