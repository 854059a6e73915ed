//! One console port: its host-side descriptor, the bytes buffered each
//! way, and what the guest and the host have said about it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::BUFFER_LIMIT;
use crate::devices::virtio::HostInterest;

/// One port as configured by the VMM.
pub struct PortConfig {
    /// Sent to the guest as PORT_NAME (empty: no name).
    pub name: String,
    /// Announce as a console port (hvc in Linux).
    pub console: bool,
    /// The host side; without one, guest output is discarded and the guest
    /// reads nothing.
    pub host: Option<OwnedFd>,
}

pub(super) struct Port {
    pub(super) name: String,
    pub(super) console: bool,
    host: Option<File>,
    /// The host side reached end of file (or failed): nothing more to read.
    pub(super) host_eof: bool,
    /// Guest output waiting for the host side to accept it.
    pub(super) to_host: VecDeque<u8>,
    /// Host input waiting for guest rx buffers.
    pub(super) from_host: VecDeque<u8>,
    /// Whether the guest has the port open (always, without MULTIPORT).
    pub(super) guest_open: bool,
    /// The guest was told the host side closed.
    pub(super) told_eof: bool,
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL take and
    // return plain integers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Port {
    /// The port `config` describes, its host side made non-blocking.
    pub(super) fn new(config: PortConfig) -> io::Result<Port> {
        let host = match config.host {
            Some(fd) => {
                set_nonblocking(fd.as_raw_fd())?;
                Some(File::from(fd))
            }
            None => None,
        };
        Ok(Port {
            name: config.name,
            console: config.console,
            host,
            host_eof: false,
            to_host: VecDeque::new(),
            from_host: VecDeque::new(),
            guest_open: false,
            told_eof: false,
        })
    }

    /// Whether the host side is there and has not hung up.
    pub(super) fn connected(&self) -> bool {
        self.host.is_some() && !self.host_eof
    }

    /// Whether there is room for more guest output.
    pub(super) fn takes_guest_output(&self) -> bool {
        self.to_host.len() < BUFFER_LIMIT
    }

    /// What the event loop should wait for on the host side, if there is one.
    pub(super) fn interest(&self) -> Option<HostInterest> {
        let host = self.host.as_ref()?;
        Some(HostInterest {
            fd: host.as_raw_fd(),
            read: !self.host_eof && self.from_host.len() < BUFFER_LIMIT,
            write: !self.to_host.is_empty(),
        })
    }

    /// Reads what the host side has, up to the bound; returns how many
    /// bytes were read.
    pub(super) fn read_host(&mut self) -> usize {
        let Some(host) = self.host.as_mut() else {
            return 0;
        };
        let mut total = 0;
        let mut buf = [0u8; 4096];
        while !self.host_eof && self.from_host.len() < BUFFER_LIMIT {
            let room = (BUFFER_LIMIT - self.from_host.len()).min(buf.len());
            match host.read(&mut buf[..room]) {
                Ok(0) => self.host_eof = true,
                Ok(n) => {
                    self.from_host.extend(&buf[..n]);
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => self.host_eof = true,
            }
        }
        total
    }

    /// Writes buffered guest output to the host side until it would block.
    pub(super) fn flush_to_host(&mut self) {
        let Some(host) = self.host.as_mut() else {
            self.to_host.clear();
            return;
        };
        let mut gone = false;
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match host.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_host.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    gone = true;
                    break;
                }
            }
        }
        if gone {
            // The host side is gone: guest output has nowhere to go.
            self.to_host.clear();
            self.host = None;
            self.host_eof = true;
        }
    }
}
