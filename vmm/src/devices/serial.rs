//! The 8250 serial console at I/O port 0x3f8 (vm-superio), writing what the
//! guest prints to any `Write`.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1: u16 = 0x3f8;
pub const PORTS: u16 = 8;

/// The serial's interrupt line, an eventfd the VMM registers as an irqfd.
pub struct SerialIrq(pub EventFd);

impl Trigger for SerialIrq {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialConsole<W: Write> {
    serial: Serial<SerialIrq, vm_superio::serial::NoEvents, W>,
}

impl<W: Write> SerialConsole<W> {
    pub fn new(irq: EventFd, out: W) -> Self {
        SerialConsole {
            serial: Serial::new(SerialIrq(irq), out),
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.serial.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // A full output (a closed log) must not stop the guest.
        let _ = self.serial.write(offset, value);
    }

    pub fn output(&self) -> &W {
        self.serial.writer()
    }
}
