//! A device's interrupt line as the virtio-mmio transport has it.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A device's interrupt: the status bits the driver reads from the
/// transport, and the eventfd the VMM registers as an irqfd.
pub struct IrqLine {
    status: AtomicU32,
    eventfd: EventFd,
}

impl IrqLine {
    pub fn new() -> io::Result<IrqLine> {
        Ok(IrqLine {
            status: AtomicU32::new(0),
            eventfd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.eventfd.write(1)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: the driver has handled `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }
}
