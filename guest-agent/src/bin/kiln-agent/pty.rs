//! Pseudo-terminals for commands the host runs interactively
//! (`ExecRequest::tty`): the command gets the slave side as its controlling
//! terminal, the agent keeps the master side, where the host's keystrokes
//! go in and the command's screen output comes out.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use kiln_agent::WindowSize;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::libc;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::pty::{openpty, Winsize};

/// What a line discipline in canonical mode takes as end of input, and a
/// shell's line editor on an empty line too (^D, the default `VEOF`):
/// typed when the host's stdin ends, as script(1) does.
const EOF_CHAR: u8 = 0x04;

/// A freshly opened pseudo-terminal.
pub struct Pty {
    /// The agent's side.
    pub master: File,
    /// The command's side; the agent's copy is closed once the command has
    /// its own, so the master sees EOF (EIO) when the command is done.
    slave: OwnedFd,
}

impl Pty {
    /// Opens a pseudo-terminal of `size` (which must be valid). Both sides
    /// are close-on-exec: only the command's stdio gets the slave.
    pub fn open(size: WindowSize) -> Result<Pty, String> {
        if !size.is_valid() {
            return Err(invalid(size));
        }
        let pty = openpty(Some(&winsize(size)), None)
            .map_err(|e| format!("opening a pseudo-terminal: {e}"))?;
        for fd in [&pty.master, &pty.slave] {
            fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
                .map_err(|e| format!("setting close-on-exec on a pseudo-terminal: {e}"))?;
        }
        Ok(Pty {
            master: File::from(pty.master),
            slave: pty.slave,
        })
    }

    /// Three handles on the slave, for the command's stdin, stdout and stderr.
    pub fn slave_stdio(&self) -> io::Result<[Stdio; 3]> {
        Ok([
            Stdio::from(self.slave.try_clone()?),
            Stdio::from(self.slave.try_clone()?),
            Stdio::from(self.slave.try_clone()?),
        ])
    }
}

fn winsize(size: WindowSize) -> Winsize {
    Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn invalid(size: WindowSize) -> String {
    format!(
        "a terminal of {} rows and {} columns is impossible: neither may be 0",
        size.rows, size.cols
    )
}

/// Gives the terminal on `master` a new size; the kernel signals SIGWINCH
/// to its foreground process group.
pub fn set_size(master: &impl AsFd, size: WindowSize) -> Result<(), String> {
    if !size.is_valid() {
        return Err(invalid(size));
    }
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which
    // points to a live, initialised value; the fd is borrowed, so open.
    let rc = unsafe { libc::ioctl(master.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(format!(
            "setting the terminal size: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The size of the terminal on `fd`.
#[cfg(test)]
pub fn size(fd: &impl AsFd) -> io::Result<WindowSize> {
    let mut ws = winsize(WindowSize { rows: 0, cols: 0 });
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which
    // points to a live value of that type.
    let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// In the command's process between fork and exec: a new session, with
/// its stdin (the slave) as controlling terminal, so the terminal's
/// line discipline signals its foreground jobs (^C, ^Z, SIGWINCH) and a
/// shell there can do job control.
pub fn become_session_leader() -> io::Result<()> {
    // SAFETY: setsid and ioctl are async-signal-safe and take no pointers
    // (TIOCSCTTY's argument is an int: 0, do not steal another session's
    // terminal).
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Types what the host sends into the terminal, from a thread of its own
/// behind a channel of a few chunks: a command that stops reading holds
/// back this writer first, and once the channel is full the request loop
/// too, as with a pipe (flow control rather than input piled up in guest
/// memory). An empty chunk is the end of the host's input, typed as
/// EOF characters until the command has exited (`exited`), see
/// [`type_eof_until_exit`].
pub fn feed(mut master: File, exited: Arc<AtomicBool>) -> SyncSender<Vec<u8>> {
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(16);
    let _ = std::thread::Builder::new()
        .name("tty-in".into())
        .spawn(move || {
            for chunk in rx {
                if chunk.is_empty() {
                    type_eof_until_exit(&mut master, &exited);
                    break;
                }
                // A write error means the terminal is gone (the command and
                // everything it started ended): the rest is dropped.
                if master.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
    tx
}

/// How often the end of input looks at the terminal again.
const EOF_POLL: Duration = Duration::from_millis(50);

/// The end of the host's input, as a terminal can say it: ^D, typed once
/// what came before it has been read, and again each time the last one
/// has been read and the command still runs. One is not always enough:
/// typed while the line discipline is canonical (a shell running a
/// command) it becomes an end-of-file mark, which a shell's line editor,
/// switching the terminal to raw mode, reads as nothing; after a partial
/// line the editor takes it as "delete"; and each reader in turn (`cat;
/// cat`) needs its own.
fn type_eof_until_exit(master: &mut File, exited: &AtomicBool) {
    while !exited.load(Ordering::Relaxed) {
        match unread_input(master) {
            Ok(true) => {}
            Ok(false) => {
                if master.write_all(&[EOF_CHAR]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
        std::thread::sleep(EOF_POLL);
    }
}

/// Whether the command's side of the terminal holds input not yet read
/// (in canonical mode an end-of-file mark counts, as poll says). Asked
/// through a descriptor of the slave opened from the master and closed
/// at once: holding it would keep the master from seeing the command's
/// end.
fn unread_input(master: &File) -> io::Result<bool> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes its flags as an int argument and returns
    // a new descriptor, owned here; the master is borrowed, so open.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    let slave = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut fds = [PollFd::new(slave.as_fd(), PollFlags::POLLIN)];
    let ready = poll(&mut fds, PollTimeout::ZERO).map_err(io::Error::from)?;
    Ok(ready > 0
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pty_opens_with_the_size_asked_for_and_can_be_resized() {
        let pty = Pty::open(WindowSize {
            rows: 30,
            cols: 100,
        })
        .expect("openpty");
        assert_eq!(
            size(&pty.master).expect("size"),
            WindowSize {
                rows: 30,
                cols: 100
            }
        );
        set_size(
            &pty.master,
            WindowSize {
                rows: 40,
                cols: 120,
            },
        )
        .expect("resize");
        assert_eq!(
            size(&pty.slave).expect("size"),
            WindowSize {
                rows: 40,
                cols: 120
            }
        );
    }

    #[test]
    fn zero_sizes_are_refused() {
        let zero = WindowSize { rows: 0, cols: 80 };
        assert!(Pty::open(zero).is_err());
        let pty = Pty::open(WindowSize::DEFAULT).expect("openpty");
        let err = set_size(&pty.master, WindowSize { rows: 24, cols: 0 }).expect_err("refused");
        assert!(err.contains("impossible"), "{err}");
        // The terminal keeps its size.
        assert_eq!(size(&pty.master).expect("size"), WindowSize::DEFAULT);
    }

    #[test]
    fn both_sides_are_close_on_exec() {
        let pty = Pty::open(WindowSize::DEFAULT).expect("openpty");
        for fd in [pty.master.as_raw_fd(), pty.slave.as_raw_fd()] {
            let flags = fcntl(fd, FcntlArg::F_GETFD).expect("F_GETFD");
            assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
        }
    }

    #[test]
    fn the_end_of_input_is_typed_as_eof() {
        use std::io::Read;
        let pty = Pty::open(WindowSize::DEFAULT).expect("openpty");
        let exited = Arc::new(AtomicBool::new(false));
        let tx = feed(pty.master.try_clone().expect("dup"), exited.clone());
        tx.send(b"ab\n".to_vec()).expect("send");
        tx.send(Vec::new()).expect("send");
        // In canonical mode the slave reads the line, then EOF (a zero read).
        let mut slave = File::from(pty.slave.try_clone().expect("dup"));
        let mut buf = [0u8; 16];
        let n = slave.read(&mut buf).expect("read");
        assert_eq!(&buf[..n], b"ab\n");
        assert_eq!(slave.read(&mut buf).expect("read"), 0);
        // The next reader gets its own end of input (`cat; cat`).
        assert_eq!(slave.read(&mut buf).expect("read"), 0);
        exited.store(true, Ordering::Relaxed);
    }
}
