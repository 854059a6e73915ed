//! Long host-side builds (the kernel, the tools image): run with their output
//! in a log file, a spinner showing elapsed time and the latest log line, and
//! Ctrl-C stopping the whole process group.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::sandbox::SandboxError;
use crate::util::process::{detach_and_tie, Guarded};
use crate::util::spinner::spinner;
use crate::util::{ctrl_c, tail};

/// Runs `cmd` to completion, logging to `log`. On failure the error carries
/// the log's last lines.
pub fn run_logged(mut cmd: Command, what: &str, log: &Path) -> Result<()> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    detach_and_tie(&mut cmd);
    let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        // No spinner without a terminal: say once what is going on.
        eprintln!("{what}: started");
    }
    let mut child = Guarded::new(child);

    let bar = spinner(what, false);
    let status = loop {
        if ctrl_c::requested() {
            // A grace period: mmdebstrap removes its temporary root on
            // SIGTERM, which a SIGKILL would leave behind.
            child.terminate(Duration::from_secs(10));
            bar.finish_and_clear();
            bail!(SandboxError::Interrupted);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Some(line) = last_lines(log, 1).pop() {
            bar.set_message(line);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    bar.finish_and_clear();
    if !status.success() {
        let tail = last_lines(log, 25).join("\n");
        bail!(
            "{what} failed ({status}); the last lines of {}:\n{tail}",
            log.display()
        );
    }
    eprintln!(
        "{what}: done in {}",
        indicatif::HumanDuration(bar.elapsed())
    );
    Ok(())
}

/// [`run_logged`], keeping a copy of the log at `keep` if `cmd` fails: the
/// log itself is in a work directory that goes when the caller returns.
pub fn run_logged_keeping(cmd: Command, what: &str, log: &Path, keep: &Path) -> Result<()> {
    let result = run_logged(cmd, what, log);
    if result.is_err() {
        let _ = std::fs::copy(log, keep);
    }
    result
}

/// The last `n` lines of the log at `path` that are not blank.
fn last_lines(path: &Path, n: usize) -> Vec<String> {
    let Ok(f) = File::open(path) else {
        return vec![];
    };
    let lines = BufReader::new(f).lines().map_while(Result::ok);
    tail::last(lines.filter(|l| !l.trim().is_empty()), n)
}
