//! kiln's spinner for long work (a host build, a step of an image build).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// kiln's spinner for long work: what, elapsed time, and a message (the
/// latest output line); hidden when `quiet` (e.g. under --json).
pub fn spinner(what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{elapsed_precise}] {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_prefix(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
