//! The host's terminal for commands run on a guest terminal (`kiln run -t`,
//! `kiln shell`): its size, raw mode while the guest owns the keyboard, and
//! window-size changes (SIGWINCH).

use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use kiln_agent::WindowSize;
use rustix::termios::{self, OptionalActions, Termios};
use signal_hook::SigId;

/// The terminal's attributes before kiln changed them, for the panic hook.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

/// The size of the terminal on `fd`; `None` if it is not one or cannot
/// tell (a serial line reports 0 x 0).
pub fn size(fd: BorrowedFd<'_>) -> Option<WindowSize> {
    let ws = termios::tcgetwinsize(fd).ok()?;
    let size = WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    };
    size.is_valid().then_some(size)
}

/// Stdin in raw mode while it lives: keys, Ctrl-C and Ctrl-D included, go
/// to the guest byte for byte, and the guest's terminal does the echoing
/// and the signalling. Restored when dropped (every return, error or
/// unwinding panic) and by a panic hook (a panic that aborts).
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts stdin in raw mode; `None` if stdin is not a terminal.
    pub fn enter() -> Result<Option<RawMode>> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(stdin.as_fd()).context("reading the terminal's mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        install_panic_hook();
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(saved.clone());
        termios::tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw)
            .context("putting the terminal in raw mode")?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Drain: what the guest printed last is shown as it was meant to be.
        let _ = termios::tcsetattr(
            std::io::stdin().as_fd(),
            OptionalActions::Drain,
            &self.saved,
        );
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Restores the terminal before a panic's message is printed, so it is
/// readable, and whatever happens after.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let saved = SAVED.try_lock().ok().and_then(|s| s.clone());
            if let Some(saved) = saved {
                let _ = termios::tcsetattr(std::io::stdin().as_fd(), OptionalActions::Now, &saved);
            }
            previous(info);
        }));
    });
}

/// Watches for changes of the host terminal's size while it lives.
pub struct Resizes {
    changed: Arc<AtomicBool>,
    id: SigId,
}

impl Resizes {
    pub fn watch() -> Result<Resizes> {
        let changed = Arc::new(AtomicBool::new(false));
        let id = signal_hook::flag::register(signal_hook::consts::SIGWINCH, changed.clone())
            .context("watching the terminal's size (SIGWINCH)")?;
        Ok(Resizes { changed, id })
    }

    /// The terminal's new size, if it changed since the last call.
    pub fn poll(&mut self) -> Option<WindowSize> {
        if self.changed.swap(false, Ordering::Relaxed) {
            size(std::io::stdin().as_fd())
        } else {
            None
        }
    }
}

impl Drop for Resizes {
    fn drop(&mut self) {
        signal_hook::low_level::unregister(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_not_a_terminal_has_no_size() {
        let f = tempfile::tempfile().expect("tempfile");
        assert_eq!(size(f.as_fd()), None);
    }

    #[test]
    fn a_resize_is_reported_once() {
        let mut r = Resizes::watch().expect("watch");
        assert_eq!(r.poll(), None);
        r.changed.store(true, Ordering::Relaxed);
        // Under `cargo test` stdin is not a terminal: a change is seen,
        // but there is no size to send.
        let _ = r.poll();
        assert!(!r.changed.load(Ordering::Relaxed));
    }
}
