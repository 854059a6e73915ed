//! `kiln shell`: an interactive root shell in a fresh VM, on a terminal.

use anyhow::Result;

use super::run::{self, RunOptions};
use crate::sandbox::guest::login_shell;

/// `kiln shell`: `kiln run`'s options, and no command.
#[derive(clap::Args)]
pub struct ShellArgs {
    #[command(flatten)]
    opts: RunOptions,
}

/// Runs the shell; kiln exits with its status, as `kiln run -t` would.
pub fn shell(args: ShellArgs) -> Result<u8> {
    run::execute(&args.opts, &login_shell(), true)
}
