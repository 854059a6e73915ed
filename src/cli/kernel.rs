//! `kiln kernel build|path`: the guest kernel in the cache.

use anyhow::Result;
use clap::Subcommand;

use super::print_artifact;
use crate::sandbox::kernel;

#[derive(Subcommand)]
pub enum KernelAction {
    /// Build it into the cache (nothing to do if it is there already).
    Build {
        /// Build again even if cached.
        #[arg(long)]
        force: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print where the cached copy is (fails if it is not built).
    Path {
        #[arg(long)]
        json: bool,
    },
}

pub fn kernel(action: KernelAction) -> Result<u8> {
    let (k, json) = match action {
        KernelAction::Build { force, json } => (kernel::build(force)?, json),
        KernelAction::Path { json } => (kernel::locate()?, json),
    };
    print_artifact(&k.vmlinux(), Some(k.release()), json);
    Ok(0)
}
