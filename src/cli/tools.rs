//! `kiln tools build|path`: the tools image (the guest's userland) in the
//! cache.

use anyhow::Result;
use clap::Subcommand;

use super::print_artifact;
use crate::sandbox::tools;

#[derive(Subcommand)]
pub enum ToolsAction {
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

pub fn tools(action: ToolsAction) -> Result<u8> {
    let (path, json) = match action {
        ToolsAction::Build {
            force,
            json,
            packages,
        } => (tools::build(force, &tools::Extra::new(&packages)?)?.0, json),
        ToolsAction::Path { json, packages } => {
            (tools::locate(None, &tools::Extra::new(&packages)?)?.0, json)
        }
    };
    print_artifact(&path, None, json);
    Ok(0)
}
