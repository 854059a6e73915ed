//! `kiln build RECIPE`: its flags, handed to the image build.

use std::path::PathBuf;

use anyhow::Result;

use super::vm_args::{VmArgs, VmFlagOrder, VmFlags};
use crate::image::build::{self, BuildOptions};
use crate::image::recipe::Format;

/// The VM flags as `kiln build` words them.
pub struct BuildVm;

impl VmFlags for BuildVm {
    const MEM_DEFAULT: &'static str = "2G";
    const MEM_HELP: &'static str = "Build VM memory";
    const CPUS_DEFAULT: &'static str = "2";
    const CPUS_HELP: &'static str = "Build VM CPUs";
    const BACKEND_HELP: &'static str = "Which hypervisor runs the build VM";
    const TIMEOUT_HELP: &'static str = "Stop and fail the build after SECS seconds in the VM";
    const ORDER: VmFlagOrder = VmFlagOrder {
        mem: 4,
        cpus: 5,
        backend: 6,
        timeout: 8,
    };
}

// display_order: the place in --help among the shared VM flags (BuildVm::ORDER).
#[derive(clap::Args)]
pub struct BuildArgs {
    /// The recipe (TOML).
    recipe: PathBuf,
    /// Where the outputs go (created if missing).
    #[arg(
        short = 'o',
        long = "output",
        value_name = "DIR",
        default_value = ".",
        display_order = 0
    )]
    out_dir: PathBuf,
    /// Output format, instead of the recipe's list. Repeatable:
    /// raw, qcow2, vmdk, vhdx, vpc, ova, iso.
    #[arg(long = "format", value_name = "F", display_order = 1)]
    formats: Vec<Format>,
    /// Print a JSON summary (outputs, sizes, hashes, step times) on stdout.
    #[arg(long, display_order = 2)]
    json: bool,
    /// Show every step's output as it runs.
    #[arg(long, short, display_order = 3)]
    verbose: bool,
    #[command(flatten)]
    vm: VmArgs<BuildVm>,
    /// Bootstrap the Debian root again instead of using the cached one.
    #[arg(long, display_order = 7)]
    fresh: bool,
    /// When a step fails, open a root shell in the build VM before it
    /// stops: the tree (/build/root) as the step left it, the disks
    /// attached, the step's environment. Exiting the shell ends the build,
    /// which fails as it would have. Without a terminal on stdin, the
    /// shell reads its commands from stdin and ends where stdin does.
    #[arg(long, display_order = 9)]
    debug_shell: bool,
    /// Refuse to build, writing nothing, when the image's packages differ
    /// from RECIPE.lock (beside the recipe), which every build without
    /// --locked writes: how to notice that the mirror moved.
    #[arg(long, display_order = 10)]
    locked: bool,
}

pub fn build(a: BuildArgs) -> Result<u8> {
    build::build(BuildOptions {
        recipe: a.recipe,
        out_dir: a.out_dir,
        formats: a.formats,
        json: a.json,
        verbose: a.verbose,
        mem_mib: a.vm.mem,
        cpus: a.vm.cpus,
        backend: a.vm.backend,
        fresh: a.fresh,
        timeout: a.vm.timeout,
        debug_shell: a.debug_shell,
        locked: a.locked,
    })
    .map(|()| 0)
}
