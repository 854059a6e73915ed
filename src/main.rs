//! kiln: run privileged image-assembly work as an unprivileged user inside a
//! throwaway microVM.

mod backend;
mod boot;
mod build;
mod cache;
mod console;
mod disk;
mod guest;
mod initramfs;
mod interrupt;
mod job;
mod kernel;
mod mmdebstrap;
mod owned_dir;
mod process;
mod recipe;
mod run;
mod session;
mod share;
mod size;
mod tail;
mod tools;
mod userns;
mod which;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use backend::BackendChoice;
use run::{CopyArg, RunError, RunOptions};

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
    Run(Box<RunArgs>),
    /// Build the images a recipe describes (see images/README.md).
    Build(Box<BuildArgs>),
    /// Boot a built image as a whole machine and wait for a console line.
    Boot(Box<boot::BootArgs>),
    /// The guest kernel.
    Kernel {
        #[command(subcommand)]
        action: ArtifactAction,
    },
    /// The tools image (the guest's userland).
    Tools {
        #[command(subcommand)]
        action: ToolsAction,
    },
    /// Internal: runs kiln-vmm in the child process the kvm backend starts.
    #[command(name = "__vmm", hide = true)]
    Vmm {
        /// The VM, as JSON (written by the parent kiln).
        spec: String,
        /// Run kiln-vmm's threads without seccomp filters (debugging; also
        /// KILN_VMM_NO_SECCOMP=1).
        #[arg(long)]
        no_seccomp: bool,
    },
}

#[derive(Subcommand)]
enum ArtifactAction {
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

#[derive(Subcommand)]
enum ToolsAction {
    /// Build it into the cache (nothing to do if it is there already).
    Build {
        /// Build again even if cached.
        #[arg(long)]
        force: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Add this Debian package to the image (repeatable): an image of
        /// its own, cached beside the standard one.
        #[arg(long = "package", value_name = "PACKAGE")]
        packages: Vec<String>,
    },
    /// Print where the cached copy is (fails if it is not built).
    Path {
        #[arg(long)]
        json: bool,
        /// The image with these added packages (repeatable).
        #[arg(long = "package", value_name = "PACKAGE")]
        packages: Vec<String>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Attach a disk: PATH[,ro][,format=raw|qcow2][,device]. PATH is a
    /// regular image file, or a block device with ',device' (required for
    /// one, so a typo cannot attach a host disk); anything else is refused.
    /// Repeatable; disks appear as /dev/vda, /dev/vdb, ... in order, and as
    /// /dev/disk/by-id/virtio-kiln0, virtio-kiln1, ...
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<disk::DiskArg>,
    /// Guest memory, in MiB (or with a suffix: 512M, 2G).
    #[arg(long, default_value = "1G", value_parser = parse_mem)]
    mem: u64,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    cpus: u32,
    /// Set an environment variable for the command: K=V. Repeatable.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory of the command in the guest.
    #[arg(long, value_name = "DIR")]
    workdir: Option<String>,
    /// Stop the VM after SECS seconds and exit 124, like timeout(1).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    /// How long to wait for the guest agent to come up.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_secs)]
    boot_timeout: f64,
    /// Copy a host file into the guest before the command: HOST:GUEST.
    #[arg(long = "copy-in", value_name = "HOST:GUEST")]
    copy_in: Vec<CopyArg>,
    /// Copy a guest file to the host after the command: GUEST:HOST. The host
    /// file appears only once complete.
    #[arg(long = "copy-out", value_name = "GUEST:HOST", value_parser = parse_copy_out)]
    copy_out: Vec<CopyArg>,
    /// Keep the setuid, setgid and sticky bits of --copy-out files. Without
    /// it they are dropped: a guest must not hand you a setuid program.
    #[arg(long)]
    keep_setuid: bool,
    /// Share a host directory: HOST:GUEST[:ro] (virtio-fs through virtiofsd).
    #[arg(long = "share", value_name = "HOST:GUEST[:ro]")]
    shares: Vec<share::ShareArg>,
    /// Show the guest's kernel log on stderr.
    #[arg(long)]
    console: bool,
    /// Which hypervisor runs the VM.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Boot this kernel (vmlinux with a PVH entry) instead of the cached one.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Extra kernel command-line arguments (e.g. "printk.time=1" with --console).
    #[arg(long, value_name = "ARGS")]
    kernel_args: Option<String>,
    /// Use this squashfs as the guest's userland instead of the cached tools image.
    #[arg(long, value_name = "IMAGE")]
    tools: Option<PathBuf>,
    /// Use the tools image with this Debian package added (repeatable);
    /// built into the cache the first time.
    #[arg(
        long = "tools-package",
        value_name = "PACKAGE",
        conflicts_with = "tools"
    )]
    tools_packages: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct BuildArgs {
    /// The recipe (TOML).
    recipe: PathBuf,
    /// Where the outputs go (created if missing).
    #[arg(short = 'o', long = "output", value_name = "DIR", default_value = ".")]
    out_dir: PathBuf,
    /// Output format, instead of the recipe's list. Repeatable:
    /// raw, qcow2, vmdk, vhdx, vpc, ova, iso.
    #[arg(long = "format", value_name = "F")]
    formats: Vec<recipe::Format>,
    /// Print a JSON summary (outputs, sizes, hashes, step times) on stdout.
    #[arg(long)]
    json: bool,
    /// Show every step's output as it runs.
    #[arg(long, short)]
    verbose: bool,
    /// Build VM memory.
    #[arg(long, default_value = "2G", value_parser = parse_mem)]
    mem: u64,
    /// Build VM CPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    cpus: u32,
    /// Which hypervisor runs the build VM.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Bootstrap the Debian root again instead of using the cached one.
    #[arg(long)]
    fresh: bool,
    /// Stop and fail the build after SECS seconds in the VM.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
}

/// `--copy-out GUEST:HOST`: the guest path is absolute and comes first, as
/// the data flows.
fn parse_copy_out(s: &str) -> Result<CopyArg, String> {
    let usage = "expected GUEST:HOST with an absolute GUEST path";
    let (guest, host) = s.split_once(':').ok_or(usage)?;
    if !guest.starts_with('/') || host.is_empty() {
        return Err(usage.into());
    }
    Ok(CopyArg {
        host: PathBuf::from(host),
        guest: guest.to_string(),
    })
}

pub(crate) fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "expected seconds between 0 and 86400 (e.g. 60 or 0.5), got '{s}'"
        )),
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("expected K=V, got '{s}'")),
    }
}

/// A memory size in MiB: a bare number counts MiB, and only M and G are
/// taken.
pub(crate) fn parse_mem(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let mib = match size::parse(s) {
        Some((n, size::Unit::None | size::Unit::M)) => n,
        Some((n, size::Unit::G)) => n.saturating_mul(1024),
        _ => return Err(format!("expected a size such as 512M or 2G, got '{s}'")),
    };
    if !(64..=1024 * 1024).contains(&mib) {
        return Err(format!("memory must be between 64M and 1024G, got {mib}M"));
    }
    Ok(mib)
}

fn kernel_artifact(action: ArtifactAction) -> Result<()> {
    let (k, json) = match action {
        ArtifactAction::Build { force, json } => (kernel::build(force)?, json),
        ArtifactAction::Path { json } => (kernel::locate()?, json),
    };
    print_artifact(&k.vmlinux(), Some(k.release()), json);
    Ok(())
}

fn tools_artifact(action: ToolsAction) -> Result<()> {
    let (path, json) = match action {
        ToolsAction::Build {
            force,
            json,
            packages,
        } => (tools::build(force, &tools::Extra::new(&packages)?)?, json),
        ToolsAction::Path { json, packages } => {
            (tools::locate(None, &tools::Extra::new(&packages)?)?, json)
        }
    };
    print_artifact(&path, None, json);
    Ok(())
}

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The VMM child is stopped by its parent (a process-group SIGKILL), not
    // by terminal signals, and reports on its own streams.
    if let Cmd::Vmm { spec, no_seccomp } = &cli.command {
        return ExitCode::from(backend::kvm::child_main(spec, *no_seccomp));
    }
    if let Err(e) = interrupt::install() {
        eprintln!("kiln: cannot install signal handlers: {e}");
        return ExitCode::from(EXIT_KILN_ERROR);
    }
    // What kilns killed outright left behind, removed beside the work (a
    // kernel build's tree takes a while); joined before exiting.
    let sweeper = std::thread::spawn(|| {
        owned_dir::sweep_temp();
        cache::sweep();
    });
    let result = match cli.command {
        Cmd::Run(a) => run::run(RunOptions {
            disks: a.disks,
            mem_mib: a.mem,
            cpus: a.cpus,
            env: a.env,
            workdir: a.workdir,
            timeout: a.timeout,
            boot_timeout: a.boot_timeout,
            copy_in: a.copy_in,
            copy_out: a.copy_out,
            keep_setuid: a.keep_setuid,
            shares: a.shares,
            console: a.console,
            backend: a.backend,
            kernel: a.kernel,
            kernel_args: a.kernel_args,
            tools: a.tools,
            tools_packages: a.tools_packages,
            command: a.command,
        }),
        Cmd::Build(a) => build::build(build::BuildOptions {
            recipe: a.recipe,
            out_dir: a.out_dir,
            formats: a.formats,
            json: a.json,
            verbose: a.verbose,
            mem_mib: a.mem,
            cpus: a.cpus,
            backend: a.backend,
            fresh: a.fresh,
            timeout: a.timeout,
        })
        .map(|()| 0),
        Cmd::Boot(a) => boot::boot(*a),
        Cmd::Kernel { action } => kernel_artifact(action).map(|()| 0),
        Cmd::Tools { action } => tools_artifact(action).map(|()| 0),
        Cmd::Vmm { .. } => unreachable!("handled above"),
    };
    let _ = sweeper.join();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = match e.downcast_ref::<RunError>() {
                Some(RunError::Timeout(_)) => 124,
                Some(RunError::Interrupted) => 130,
                None => EXIT_KILN_ERROR,
            };
            eprintln!("kiln: {e:#}");
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_mem;

    #[test]
    fn memory_is_in_mib_with_m_or_g() {
        assert_eq!(parse_mem("2G"), Ok(2048));
        assert_eq!(parse_mem(" 1g "), Ok(1024));
        assert_eq!(parse_mem("512"), Ok(512));
        assert_eq!(parse_mem("512m"), Ok(512));
        for bad in ["512K", "1T", "", "G", "1.5G"] {
            assert_eq!(
                parse_mem(bad),
                Err(format!(
                    "expected a size such as 512M or 2G, got '{}'",
                    bad.trim()
                ))
            );
        }
        let range = |mib: u64| Err(format!("memory must be between 64M and 1024G, got {mib}M"));
        assert_eq!(parse_mem("63M"), range(63));
        assert_eq!(parse_mem("1025G"), range(1025 * 1024));
        assert_eq!(parse_mem("18446744073709551615G"), range(u64::MAX));
    }
}
