//! kiln: run privileged image-assembly work as an unprivileged user inside a
//! throwaway microVM.
//!
//! Layers, each using only those below it: `util` (host helpers) <-
//! `sandbox` (the VM, its agent session, disks, shares, the artifacts it
//! boots) <- `image` (recipes, `kiln build`, `kiln boot`) <- `cli`.

mod cli;
mod image;
mod sandbox;
mod util;

fn main() -> std::process::ExitCode {
    cli::main()
}
