//! What the vCPU threads see of the machine: port I/O (serial, the i8042
//! reset line, the test exit port) and the virtio-mmio register windows.
//! Shared by every vCPU thread, so each device sits behind its own lock.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{MMIO_BASE, MMIO_WINDOW_SIZE};
use crate::devices::serial::{SerialConsole, COM1, PORTS};
use crate::devices::virtio::mmio::MmioTransport;
use crate::event_loop::lock;

/// Writing a byte here ends the run with that byte as the guest's status
/// (like QEMU's isa-debug-exit); used by test guests.
pub const EXIT_PORT: u16 = 0xf4;
/// The i8042 command port; 0xfe written there pulses the CPU reset line,
/// which is how Linux reboots with `reboot=k`.
pub const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The guest wrote its status to [`EXIT_PORT`].
    Status(u8),
    /// A vCPU executed HLT with nothing to wake it (only reported when KVM
    /// hands HLT to user space).
    Halted,
    /// The guest reset (i8042, triple fault, KVM system event).
    Shutdown,
    /// The VMM was asked to stop the machine.
    Stopped,
}

pub struct Bus<W: Write> {
    serial: Mutex<SerialConsole<W>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    /// Tells the event loop to look again at the devices' host descriptors.
    wake: EventFd,
}

impl<W: Write> Bus<W> {
    pub fn new(
        serial: SerialConsole<W>,
        virtio: Vec<Arc<Mutex<MmioTransport>>>,
        wake: EventFd,
    ) -> Self {
        Bus {
            serial: Mutex::new(serial),
            virtio,
            wake,
        }
    }

    /// The virtio transports, in window order (set before the run starts).
    pub fn set_virtio(&mut self, virtio: Vec<Arc<Mutex<MmioTransport>>>) {
        self.virtio = virtio;
    }

    pub fn serial(&self) -> std::sync::MutexGuard<'_, SerialConsole<W>> {
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A port write; returns how the run ends if it ends here.
    pub fn pio_out(&self, port: u16, data: &[u8]) -> Option<Exit> {
        let byte = data.first().copied().unwrap_or(0);
        match port {
            EXIT_PORT => return Some(Exit::Status(byte)),
            I8042_COMMAND if byte == I8042_RESET => return Some(Exit::Shutdown),
            p if (COM1..COM1 + PORTS).contains(&p) => self.serial().write((p - COM1) as u8, byte),
            _ => {}
        }
        None
    }

    pub fn pio_in(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if (COM1..COM1 + PORTS).contains(&p) => self.serial().read((p - COM1) as u8),
            // i8042 status: both buffers empty, so a reset is never waited for.
            I8042_COMMAND => 0,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn virtio_at(&self, addr: u64) -> Option<(&Mutex<MmioTransport>, u64)> {
        let offset = addr.checked_sub(MMIO_BASE)?;
        let index = usize::try_from(offset / MMIO_WINDOW_SIZE).ok()?;
        self.virtio
            .get(index)
            .map(|t| (t.as_ref(), offset % MMIO_WINDOW_SIZE))
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.virtio_at(addr) {
            Some((t, off)) => lock(t).read(off, data),
            None => data.fill(0xff),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((t, off)) = self.virtio_at(addr) {
            let mut t = lock(t);
            t.write(off, data);
            // A register write may have started a device with host-side
            // descriptors (activation): the event loop must watch them.
            if !t.device().host_interest().is_empty() {
                let _ = self.wake.write(1);
            }
        }
    }
}
