//! `kiln run`: one command as root in a fresh VM.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use kiln_agent::{ExecRequest, USER_DISK_SERIAL_PREFIX};
use kiln_vmm::DiskConfig;

use super::vm_args::{parse_secs, VmArgs, VmFlagOrder, VmFlags};
use crate::sandbox::disk::{Disk, DiskArg};
use crate::sandbox::guest::{Guest, GuestConfig};
use crate::sandbox::session::ExecOutcome;
use crate::sandbox::share::ShareArg;
use crate::sandbox::tools;

/// `HOST:GUEST` for --copy-in / --copy-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyArg {
    pub host: PathBuf,
    pub guest: String,
}

impl std::str::FromStr for CopyArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, guest) = s
            .rsplit_once(':')
            .ok_or("expected HOST:GUEST with an absolute GUEST path")?;
        if host.is_empty() || !guest.starts_with('/') {
            return Err("expected HOST:GUEST with an absolute GUEST path".into());
        }
        Ok(CopyArg {
            host: PathBuf::from(host),
            guest: guest.to_string(),
        })
    }
}

/// The VM flags as `kiln run` words them.
pub struct RunVm;

impl VmFlags for RunVm {
    const MEM_DEFAULT: &'static str = "1G";
    const MEM_HELP: &'static str = "Guest memory, in MiB (or with a suffix: 512M, 2G)";
    const CPUS_DEFAULT: &'static str = "1";
    const CPUS_HELP: &'static str = "Virtual CPUs";
    const BACKEND_HELP: &'static str = "Which hypervisor runs the VM";
    const TIMEOUT_HELP: &'static str =
        "Stop the VM after SECS seconds and exit 124, like timeout(1)";
    const ORDER: VmFlagOrder = VmFlagOrder {
        mem: 1,
        cpus: 2,
        timeout: 5,
        backend: 12,
    };
}

/// `kiln run`: the VM's options, how to run the command, and the command.
#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub opts: RunOptions,
    /// Run the command on a terminal in the guest, as an interactive
    /// session: terminal size and resizes, job control, and Ctrl-C for
    /// the guest's foreground job. Your terminal is in raw mode meanwhile.
    #[arg(short = 't', long, display_order = 17)]
    tty: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// The options of `kiln run`, shared with `kiln shell`: the VM and what
/// goes in and out of it.
// display_order: the place in --help among the shared VM flags (RunVm::ORDER).
#[derive(clap::Args)]
pub struct RunOptions {
    /// Attach a disk: PATH[,ro][,format=raw|qcow2][,device]. PATH is a
    /// regular image file, or a block device with ',device' (required for
    /// one, so a typo cannot attach a host disk); anything else is refused.
    /// Repeatable; disks appear as /dev/vda, /dev/vdb, ... in order, and as
    /// /dev/disk/by-id/virtio-kiln0, virtio-kiln1, ...
    #[arg(long = "disk", value_name = "SPEC", display_order = 0)]
    disks: Vec<DiskArg>,
    #[command(flatten)]
    vm: VmArgs<RunVm>,
    /// Set an environment variable for the command: K=V. Repeatable.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env, display_order = 3)]
    env: Vec<(String, String)>,
    /// Working directory of the command in the guest.
    #[arg(long, value_name = "DIR", display_order = 4)]
    workdir: Option<String>,
    /// How long to wait for the guest agent to come up.
    #[arg(
        long,
        value_name = "SECS",
        default_value = "60",
        value_parser = parse_secs,
        display_order = 6
    )]
    boot_timeout: f64,
    /// Copy a host file or directory into the guest before the command:
    /// HOST:GUEST. A file keeps its mode; a directory's contents go into the
    /// directory GUEST (created if missing) with owners, modes, symlinks,
    /// hard links, xattrs and sparse files kept.
    #[arg(long = "copy-in", value_name = "HOST:GUEST", display_order = 7)]
    copy_in: Vec<CopyArg>,
    /// Copy a guest file or directory to the host after the command:
    /// GUEST:HOST. HOST appears only once complete. A file is written
    /// sparse (its zero blocks become holes). A directory is copied to
    /// a new path (an existing HOST is refused, never merged into) with
    /// modes, symlinks (never followed), hard links, xattrs and sparse
    /// files kept; its owners are kept only when kiln runs as root.
    #[arg(
        long = "copy-out",
        value_name = "GUEST:HOST",
        value_parser = parse_copy_out,
        display_order = 8
    )]
    copy_out: Vec<CopyArg>,
    /// Keep the setuid, setgid and sticky bits of what --copy-out copies
    /// (and a directory's file capabilities and device nodes). Without it
    /// they are dropped: a guest must not hand you a setuid program.
    #[arg(long, display_order = 9)]
    keep_setuid: bool,
    /// Share a host directory: HOST:GUEST[:ro] (virtio-fs through virtiofsd).
    #[arg(long = "share", value_name = "HOST:GUEST[:ro]", display_order = 10)]
    shares: Vec<ShareArg>,
    /// Give the guest outbound network (IPv4 and IPv6, with DNS) through
    /// user-mode networking: QEMU's own, or passt under kiln-vmm. Without
    /// it the guest has no network device at all.
    #[arg(long, display_order = 10)]
    net: bool,
    /// Show the guest's kernel log on stderr.
    #[arg(long, display_order = 11)]
    console: bool,
    /// Boot this kernel (vmlinux with a PVH entry) instead of the cached one.
    #[arg(long, value_name = "PATH", display_order = 13)]
    kernel: Option<PathBuf>,
    /// Extra kernel command-line arguments (e.g. "printk.time=1" with --console).
    #[arg(long, value_name = "ARGS", display_order = 14)]
    kernel_args: Option<String>,
    /// Use this squashfs as the guest's userland instead of the cached tools image.
    #[arg(long, value_name = "IMAGE", display_order = 15)]
    tools: Option<PathBuf>,
    /// Use the tools image with this Debian package added (repeatable);
    /// built into the cache the first time.
    #[arg(
        long = "tools-package",
        value_name = "PACKAGE",
        conflicts_with = "tools",
        display_order = 16
    )]
    tools_packages: Vec<String>,
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

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("expected K=V, got '{s}'")),
    }
}

/// Runs the command; returns the exit code kiln should exit with.
pub fn run(args: RunArgs) -> Result<u8> {
    if args.command.is_empty() {
        bail!("no command given: kiln run [OPTIONS] -- CMD [ARGS...]");
    }
    execute(&args.opts, &args.command, args.tty)
}

/// Boots a VM as `opts` say, runs `command` in it (on a terminal with
/// `tty`), and returns the exit code kiln should exit with.
pub fn execute(opts: &RunOptions, command: &[String], tty: bool) -> Result<u8> {
    // Everything that can be checked on the host is checked before booting.
    let disks = opts
        .disks
        .iter()
        .map(Disk::open)
        .collect::<Result<Vec<_>>>()?;
    for c in &opts.copy_in {
        let meta = std::fs::metadata(&c.host)
            .with_context(|| format!("--copy-in {}", c.host.display()))?;
        if !meta.is_file() && !meta.is_dir() {
            bail!(
                "--copy-in {}: only regular files and directories can be copied",
                c.host.display()
            );
        }
    }
    for c in &opts.copy_out {
        // Neither a file nor a tree can take an existing directory's name:
        // said before the command runs, not after.
        if std::fs::symlink_metadata(&c.host).is_ok_and(|m| m.is_dir()) {
            bail!(
                "--copy-out {}: {} exists; kiln copies a guest directory to a new path \
                 (and a file cannot replace a directory)",
                c.guest,
                c.host.display()
            );
        }
        let parent = c.host.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(p) = parent {
            if !p.is_dir() {
                bail!(
                    "--copy-out {}: directory {} does not exist",
                    c.host.display(),
                    p.display()
                );
            }
        }
    }
    // A tools image with added packages is built on first use (its own
    // cache entry), before anything else starts.
    // Held in use until the VM is gone (the guest holds only what it
    // locates itself).
    let (tools, _tools_held) = if opts.tools_packages.is_empty() {
        (opts.tools.clone(), None)
    } else {
        let extra = tools::Extra::new(&opts.tools_packages)?;
        let (image, held) = tools::build(false, &extra)?;
        (Some(image), Some(held))
    };
    let mut guest = Guest::boot(GuestConfig {
        disks: disks
            .iter()
            .enumerate()
            .map(|(i, d)| DiskConfig {
                path: d.path.clone(),
                format: d.format,
                read_only: d.readonly,
                serial: format!("{USER_DISK_SERIAL_PREFIX}{i}"),
            })
            .collect(),
        shares: opts.shares.clone(),
        mem_mib: opts.vm.mem,
        cpus: opts.vm.cpus,
        console: opts.console,
        backend: opts.vm.backend,
        kernel: opts.kernel.clone(),
        kernel_args: opts.kernel_args.clone(),
        tools,
        timeout: opts.vm.timeout,
        boot_timeout: opts.boot_timeout,
        net: opts.net,
    })?;

    for c in &opts.copy_in {
        if c.host.is_dir() {
            guest.put_tree(&c.host, &c.guest)?;
        } else {
            guest.put_file(&c.host, &c.guest)?;
        }
    }

    let outcome = if tty {
        // --env comes after TERM, so it can set it.
        guest.exec_on_terminal(ExecRequest {
            id: 0,
            argv: command.to_vec(),
            env: opts.env.clone(),
            cwd: opts.workdir.clone(),
            stdin: true,
            tty: None,
        })?
    } else {
        guest.exec(
            ExecRequest {
                id: 0,
                argv: command.to_vec(),
                env: opts.env.clone(),
                cwd: opts.workdir.clone(),
                // A terminal is not forwarded: the command would steal keystrokes.
                stdin: !std::io::stdin().is_terminal(),
                tty: None,
            },
            &mut std::io::stdout(),
            &mut std::io::stderr(),
        )?
    };
    if let Some(note) = outcome.limits_note(opts.vm.mem) {
        eprintln!("kiln: {note}");
    }
    let code = match outcome {
        ExecOutcome::Exited { status, .. } => match status.shell_code() {
            Some(code) => code,
            None => bail!("the guest reported an impossible exit status {status:?}"),
        },
        ExecOutcome::NotFound => {
            eprintln!("kiln: {}: command not found in the guest", command[0]);
            127
        }
        ExecOutcome::NotExecutable(why) => {
            eprintln!("kiln: cannot execute in the guest: {why}");
            126
        }
    };

    for c in &opts.copy_out {
        if let Err(e) = guest.get_file(&c.guest, &c.host, opts.keep_setuid) {
            if code == 0 {
                return Err(e);
            }
            eprintln!("kiln: warning: {e:#}");
        }
    }

    guest.shutdown()?;
    Ok(code)
}
