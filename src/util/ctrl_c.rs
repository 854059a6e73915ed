//! Ctrl-C, SIGTERM and SIGHUP become a flag the long-running loops poll, so
//! every exit path runs the same cleanup (child processes killed, temp files
//! removed) instead of the process dying mid-way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;

static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

pub fn install() -> Result<()> {
    let flag = FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        // A second signal while the first is being handled (kiln stuck on a
        // blocked write, say) exits at once; the helpers still die with
        // kiln (PR_SET_PDEATHSIG).
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(())
}

pub fn requested() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::Relaxed))
}
