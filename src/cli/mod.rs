//! The `kiln` command line: its flags (clap), one file per command, and
//! the one place errors become exit codes.

mod boot;
mod build;
mod cache;
mod kernel;
mod run;
mod shell;
mod tools;
mod vm_args;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::sandbox::backend::kvm;
use crate::sandbox::SandboxError;
use crate::util::{ctrl_c, owned_dir};

/// Exit code for kiln's own failures (as opposed to the command's).
const EXIT_KILN_ERROR: u8 = 125;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Run privileged image-assembly work inside a throwaway microVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a command as root in a fresh VM and exit with its status.
    Run(Box<run::RunArgs>),
    /// Open an interactive root shell in a fresh VM (takes `run`'s options;
    /// Ctrl-D or `exit` ends it).
    Shell(Box<shell::ShellArgs>),
    /// Build the images a recipe describes (see images/README.md).
    Build(Box<build::BuildArgs>),
    /// Boot a built image as a whole machine and wait for a console line.
    Boot(Box<boot::BootArgs>),
    /// The guest kernel.
    Kernel {
        #[command(subcommand)]
        action: kernel::KernelAction,
    },
    /// The tools image (the guest's userland).
    Tools {
        #[command(subcommand)]
        action: tools::ToolsAction,
    },
    /// The cache: list its entries, prune them.
    Cache {
        #[command(subcommand)]
        action: cache::CacheAction,
    },
    /// Internal: runs kiln-vmm in the child process the kvm backend starts.
    #[command(name = "__vmm", hide = true)]
    Vmm {
        /// The VM, kiln-vmm's VmConfig as JSON (written by the parent kiln).
        spec: String,
        /// Run kiln-vmm's threads without seccomp filters (debugging; also
        /// KILN_VMM_NO_SECCOMP=1).
        #[arg(long)]
        no_seccomp: bool,
    },
}

/// The path of a cached artifact, or with `json` an object with it (and
/// the kernel's release).
fn print_artifact(path: &std::path::Path, release: Option<String>, json: bool) {
    if json {
        let mut v = serde_json::json!({ "path": path });
        if let Some(r) = release {
            v["release"] = serde_json::Value::String(r);
        }
        println!("{v}");
    } else {
        println!("{}", path.display());
    }
}

/// What kiln exits with when a command fails: timeout(1)'s 124 for a
/// timeout, a shell's 130 for an interrupt, else 125 (kiln's own failure).
fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<SandboxError>() {
        Some(SandboxError::Timeout(_)) => 124,
        Some(SandboxError::Interrupted) => 130,
        None => EXIT_KILN_ERROR,
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The VMM child is stopped by its parent (a process-group SIGKILL), not
    // by terminal signals, and reports on its own streams.
    if let Cmd::Vmm { spec, no_seccomp } = &cli.command {
        return ExitCode::from(kvm::child_main(spec, *no_seccomp));
    }
    if let Err(e) = ctrl_c::install() {
        eprintln!("kiln: cannot install signal handlers: {e}");
        return ExitCode::from(EXIT_KILN_ERROR);
    }
    // What kilns killed outright left behind, removed beside the work (a
    // kernel build's tree takes a while); joined before exiting.
    // `kiln cache` does its own sweep of the cache, and reports it.
    let sweep_cache = !matches!(cli.command, Cmd::Cache { .. });
    let sweeper = std::thread::spawn(move || {
        owned_dir::sweep_temp();
        if sweep_cache {
            crate::sandbox::cache::sweep();
        }
    });
    let result = match cli.command {
        Cmd::Run(a) => run::run(*a),
        Cmd::Shell(a) => shell::shell(*a),
        Cmd::Build(a) => build::build(*a),
        Cmd::Boot(a) => boot::boot(*a),
        Cmd::Kernel { action } => kernel::kernel(action),
        Cmd::Tools { action } => tools::tools(action),
        Cmd::Cache { action } => cache::cache(action),
        Cmd::Vmm { .. } => unreachable!("handled above"),
    };
    let _ = sweeper.join();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("kiln: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}
