//! `kiln run`: one command as root in a fresh VM.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use kiln_agent::{ExecRequest, USER_DISK_SERIAL_PREFIX};

use crate::backend::{BackendChoice, DiskSpec};
use crate::disk::{Disk, DiskArg};
use crate::guest::{Guest, GuestConfig};
use crate::session::ExecOutcome;
use crate::share::ShareArg;
use crate::tools;

/// Ways a run ends that map to their own exit codes.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("interrupted; everything kiln started was stopped")]
    Interrupted,
    #[error("timed out after {0} s; the VM was stopped")]
    Timeout(u64),
}

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

pub struct RunOptions {
    pub disks: Vec<DiskArg>,
    pub mem_mib: u64,
    pub cpus: u32,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub timeout: Option<u64>,
    pub boot_timeout: f64,
    pub copy_in: Vec<CopyArg>,
    pub copy_out: Vec<CopyArg>,
    /// `--keep-setuid`: copied-out files keep the guest's special mode bits.
    pub keep_setuid: bool,
    pub shares: Vec<ShareArg>,
    pub console: bool,
    pub backend: BackendChoice,
    pub kernel: Option<PathBuf>,
    pub kernel_args: Option<String>,
    pub tools: Option<PathBuf>,
    /// Packages added to the tools image (`--tools-package`).
    pub tools_packages: Vec<String>,
    pub command: Vec<String>,
}

/// Runs the command; returns the exit code kiln should exit with.
pub fn run(opts: RunOptions) -> Result<u8> {
    if opts.command.is_empty() {
        bail!("no command given: kiln run [OPTIONS] -- CMD [ARGS...]");
    }
    // Everything that can be checked on the host is checked before booting.
    let disks = opts
        .disks
        .iter()
        .map(Disk::open)
        .collect::<Result<Vec<_>>>()?;
    for c in &opts.copy_in {
        let meta = std::fs::metadata(&c.host)
            .with_context(|| format!("--copy-in {}", c.host.display()))?;
        if !meta.is_file() {
            bail!(
                "--copy-in {}: only regular files can be copied",
                c.host.display()
            );
        }
    }
    for c in &opts.copy_out {
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
    let tools = if opts.tools_packages.is_empty() {
        opts.tools.clone()
    } else {
        let extra = tools::Extra::new(&opts.tools_packages)?;
        Some(tools::build(false, &extra)?)
    };
    let mut guest = Guest::boot(GuestConfig {
        disks: disks
            .iter()
            .enumerate()
            .map(|(i, d)| DiskSpec {
                path: d.path.clone(),
                format: d.format,
                readonly: d.readonly,
                serial: format!("{USER_DISK_SERIAL_PREFIX}{i}"),
            })
            .collect(),
        shares: opts.shares.clone(),
        mem_mib: opts.mem_mib,
        cpus: opts.cpus,
        console: opts.console,
        backend: opts.backend,
        kernel: opts.kernel.clone(),
        kernel_args: opts.kernel_args.clone(),
        tools,
        timeout: opts.timeout,
        boot_timeout: opts.boot_timeout,
    })?;

    for c in &opts.copy_in {
        guest.put_file(&c.host, &c.guest)?;
    }

    let outcome = guest.exec(
        ExecRequest {
            id: 0,
            argv: opts.command.clone(),
            env: opts.env.clone(),
            cwd: opts.workdir.clone(),
            // A terminal is not forwarded: the command would steal keystrokes.
            stdin: !std::io::stdin().is_terminal(),
        },
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )?;
    if let Some(note) = outcome.limits_note(opts.mem_mib) {
        eprintln!("kiln: {note}");
    }
    let code = match outcome {
        ExecOutcome::Exited { status, .. } => match status.shell_code() {
            Some(code) => code,
            None => bail!("the guest reported an impossible exit status {status:?}"),
        },
        ExecOutcome::NotFound => {
            eprintln!("kiln: {}: command not found in the guest", opts.command[0]);
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
