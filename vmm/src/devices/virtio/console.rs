//! virtio-console (device ID 3) with VIRTIO_CONSOLE_F_MULTIPORT: each port
//! moves bytes between a guest queue pair and a host file descriptor (a
//! Unix socket, a pipe, anything non-blocking-capable). With MULTIPORT the
//! device announces its ports over the control queues and names them, so a
//! Linux guest finds e.g. `kiln.agent` in /sys/class/virtio-ports/*/name.
//!
//! Both directions are bounded: the device holds at most [`BUFFER_LIMIT`]
//! bytes per direction and per port. Guest→host: when the host side does not
//! keep up, the device stops taking the guest's tx buffers (the guest blocks
//! on a full queue). Host→guest: when the guest has no rx buffers, or has
//! not opened the port yet (Linux drops data for closed ports), the device
//! stops reading the host side.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::{
    read_config_bytes, ActivateError, HostInterest, IrqLine, VirtioDevice, INT_VRING,
    VIRTIO_F_VERSION_1,
};

pub const DEVICE_TYPE: u32 = 3;
pub const QUEUE_SIZE: u16 = 128;
/// VIRTIO_CONSOLE_F_MULTIPORT.
pub const F_MULTIPORT: u64 = 1 << 1;
/// Bytes buffered per port and direction.
pub const BUFFER_LIMIT: usize = 64 * 1024;
/// At most this much is taken from one tx chain; the rest is dropped, so a
/// chain that names guest memory many times over cannot cost host memory.
const MAX_CHAIN: usize = 1 << 20;
/// Control messages waiting for the driver's control rx buffers. The
/// driver causes at most a few per port; more means it is misbehaving.
const MAX_PENDING_CONTROL: usize = 64;

/// Control message events (virtio 1.2, 5.3.6.2).
pub mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const DEVICE_ADD: u16 = 1;
    pub const PORT_READY: u16 = 3;
    pub const CONSOLE_PORT: u16 = 4;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
}

const CONTROL_LEN: usize = 8;

/// A control message: port id, event, value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    pub id: u32,
    pub event: u16,
    pub value: u16,
}

impl Control {
    pub fn to_bytes(self) -> [u8; CONTROL_LEN] {
        let mut b = [0u8; CONTROL_LEN];
        b[0..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..6].copy_from_slice(&self.event.to_le_bytes());
        b[6..8].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    pub fn from_bytes(b: [u8; CONTROL_LEN]) -> Control {
        Control {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("a console needs at least one port")]
    NoPorts,
    #[error("making the host side of port {0} non-blocking: {1}")]
    NonBlocking(usize, io::Error),
}

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

struct Port {
    name: String,
    console: bool,
    host: Option<File>,
    /// The host side reached end of file (or failed): nothing more to read.
    host_eof: bool,
    /// Guest output waiting for the host side to accept it.
    to_host: VecDeque<u8>,
    /// Host input waiting for guest rx buffers.
    from_host: VecDeque<u8>,
    /// Whether the guest has the port open (always, without MULTIPORT).
    guest_open: bool,
    /// The guest was told the host side closed.
    told_eof: bool,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    irq: Arc<IrqLine>,
    /// Queues that got used entries since the last interrupt decision.
    used: Vec<bool>,
}

pub struct Console {
    ports: Vec<Port>,
    queue_sizes: Vec<u16>,
    acked_features: u64,
    pending_control: VecDeque<Vec<u8>>,
    active: Option<Active>,
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

impl Console {
    pub fn new(ports: Vec<PortConfig>) -> Result<Console, ConsoleError> {
        if ports.is_empty() {
            return Err(ConsoleError::NoPorts);
        }
        let n = ports.len();
        let ports = ports
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let host = match p.host {
                    Some(fd) => {
                        set_nonblocking(fd.as_raw_fd())
                            .map_err(|e| ConsoleError::NonBlocking(i, e))?;
                        Some(File::from(fd))
                    }
                    None => None,
                };
                Ok(Port {
                    name: p.name,
                    console: p.console,
                    host,
                    host_eof: false,
                    to_host: VecDeque::new(),
                    from_host: VecDeque::new(),
                    guest_open: false,
                    told_eof: false,
                })
            })
            .collect::<Result<Vec<_>, ConsoleError>>()?;
        // Port 0's pair, the control pair, then a pair per further port.
        let queues = 2 + if n > 1 { 2 * n } else { 0 };
        Ok(Console {
            ports,
            queue_sizes: vec![QUEUE_SIZE; queues],
            acked_features: 0,
            pending_control: VecDeque::new(),
            active: None,
        })
    }

    fn multiport(&self) -> bool {
        self.acked_features & F_MULTIPORT != 0
    }

    /// (rx, tx) queue indexes of `port`.
    fn port_queues(port: usize) -> (usize, usize) {
        if port == 0 {
            (0, 1)
        } else {
            (2 + 2 * port, 3 + 2 * port)
        }
    }

    const CONTROL_RX: usize = 2;
    const CONTROL_TX: usize = 3;

    /// Queues a control message (with an optional payload) for the driver.
    fn send_control(&mut self, msg: Control, payload: &[u8]) {
        if self.pending_control.len() >= MAX_PENDING_CONTROL {
            return;
        }
        let mut v = msg.to_bytes().to_vec();
        v.extend_from_slice(payload);
        self.pending_control.push_back(v);
    }

    /// Moves everything that can move, in both directions and on the
    /// control queues, then interrupts the driver once if needed. Called on
    /// every queue notification and host-side readiness.
    pub fn pump(&mut self) {
        let Some(active) = self.active.as_mut() else {
            // Not running: still take host input, up to the bound.
            for port in &mut self.ports {
                read_host(port);
            }
            return;
        };
        active.used.iter_mut().for_each(|u| *u = false);
        if self.multiport() {
            self.control_tx();
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let multiport = self.acked_features & F_MULTIPORT != 0;
        let mut eofs = Vec::new();
        for (i, port) in self.ports.iter_mut().enumerate() {
            if i > 0 && !multiport {
                break;
            }
            let (rx, tx) = Self::port_queues(i);
            guest_to_host(active, tx, port);
            // Alternate until neither the host nor the guest side moves.
            loop {
                let got = read_host(port);
                let gave = host_to_guest(active, rx, port);
                if got == 0 && gave == 0 {
                    break;
                }
            }
            if multiport && port.host_eof && port.from_host.is_empty() && !port.told_eof {
                port.told_eof = true;
                eofs.push(i as u32);
            }
        }
        for id in eofs {
            self.send_control(
                Control {
                    id,
                    event: event::PORT_OPEN,
                    value: 0,
                },
                &[],
            );
        }
        if multiport {
            self.control_rx();
        }
        if let Some(active) = self.active.as_mut() {
            for (q, used) in active.queues.iter_mut().zip(&active.used) {
                if *used && q.needs_notification(&active.mem).unwrap_or(true) {
                    let _ = active.irq.trigger(INT_VRING);
                    break;
                }
            }
        }
    }

    /// Handles the driver's control messages.
    fn control_tx(&mut self) {
        let mut msgs = Vec::new();
        if let Some(active) = self.active.as_mut() {
            let Some(q) = active.queues.get_mut(Self::CONTROL_TX) else {
                return;
            };
            if !q.ready() {
                return;
            }
            while let Some(chain) = q.pop_descriptor_chain(&active.mem) {
                let head = chain.head_index();
                if let Ok(mut r) = Reader::new(&active.mem, chain) {
                    let mut b = [0u8; CONTROL_LEN];
                    if r.read_exact(&mut b).is_ok() {
                        msgs.push(Control::from_bytes(b));
                    }
                }
                if q.add_used(&active.mem, head, 0).is_err() {
                    break;
                }
                if let Some(u) = active.used.get_mut(Self::CONTROL_TX) {
                    *u = true;
                }
            }
        }
        for m in msgs {
            self.handle_control(m);
        }
    }

    fn handle_control(&mut self, m: Control) {
        match m.event {
            event::DEVICE_READY if m.value == 1 => {
                for id in 0..self.ports.len() as u32 {
                    self.send_control(
                        Control {
                            id,
                            event: event::DEVICE_ADD,
                            value: 0,
                        },
                        &[],
                    );
                }
            }
            event::PORT_READY if m.value == 1 => {
                let Some(port) = self.ports.get(m.id as usize) else {
                    return;
                };
                let (console, name, connected) = (
                    port.console,
                    port.name.clone().into_bytes(),
                    port.host.is_some() && !port.host_eof,
                );
                if console {
                    self.send_control(
                        Control {
                            id: m.id,
                            event: event::CONSOLE_PORT,
                            value: 1,
                        },
                        &[],
                    );
                }
                if !name.is_empty() {
                    self.send_control(
                        Control {
                            id: m.id,
                            event: event::PORT_NAME,
                            value: 1,
                        },
                        &name,
                    );
                }
                if connected {
                    self.send_control(
                        Control {
                            id: m.id,
                            event: event::PORT_OPEN,
                            value: 1,
                        },
                        &[],
                    );
                }
            }
            event::PORT_OPEN => {
                if let Some(port) = self.ports.get_mut(m.id as usize) {
                    port.guest_open = m.value == 1;
                }
            }
            // Anything else (failed readiness, unknown events, bad ids)
            // concerns only the driver.
            _ => {}
        }
    }

    /// Delivers pending control messages into the driver's control rx
    /// buffers.
    fn control_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(q) = active.queues.get_mut(Self::CONTROL_RX) else {
            return;
        };
        if !q.ready() {
            return;
        }
        while let Some(msg) = self.pending_control.front() {
            let Some(chain) = q.pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            let written = match Writer::new(&active.mem, chain) {
                Ok(mut w) if w.available_bytes() >= msg.len() => {
                    w.write_all(msg).map_or(0, |()| msg.len() as u32)
                }
                // A buffer too small or outside memory: returned empty, and
                // the message waits for the next buffer.
                _ => 0,
            };
            if written > 0 {
                self.pending_control.pop_front();
            }
            if q.add_used(&active.mem, head, written).is_err() {
                break;
            }
            if let Some(u) = active.used.get_mut(Self::CONTROL_RX) {
                *u = true;
            }
        }
    }

    /// The host-side descriptors and what the device waits for on each.
    pub fn interest(&self) -> Vec<HostInterest> {
        self.ports
            .iter()
            .filter_map(|p| {
                let host = p.host.as_ref()?;
                Some(HostInterest {
                    fd: host.as_raw_fd(),
                    read: !p.host_eof && p.from_host.len() < BUFFER_LIMIT,
                    write: !p.to_host.is_empty(),
                })
            })
            .collect()
    }
}

/// Reads what the host side has, up to the port's bound; returns how many
/// bytes were read.
fn read_host(port: &mut Port) -> usize {
    let Some(host) = port.host.as_mut() else {
        return 0;
    };
    let mut total = 0;
    let mut buf = [0u8; 4096];
    while !port.host_eof && port.from_host.len() < BUFFER_LIMIT {
        let room = (BUFFER_LIMIT - port.from_host.len()).min(buf.len());
        match host.read(&mut buf[..room]) {
            Ok(0) => port.host_eof = true,
            Ok(n) => {
                port.from_host.extend(&buf[..n]);
                total += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => port.host_eof = true,
        }
    }
    total
}

/// Writes buffered guest output to the host side until it would block.
fn flush_to_host(port: &mut Port) {
    let Some(host) = port.host.as_mut() else {
        port.to_host.clear();
        return;
    };
    let mut gone = false;
    while !port.to_host.is_empty() {
        let (a, _) = port.to_host.as_slices();
        match host.write(a) {
            Ok(0) => break,
            Ok(n) => {
                port.to_host.drain(..n);
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
        port.to_host.clear();
        port.host = None;
        port.host_eof = true;
    }
}

/// Takes the guest's output from queue `tx` while the host side keeps up.
fn guest_to_host(active: &mut Active, tx: usize, port: &mut Port) {
    flush_to_host(port);
    let Some(q) = active.queues.get_mut(tx) else {
        return;
    };
    if !q.ready() {
        return;
    }
    while port.to_host.len() < BUFFER_LIMIT {
        let Some(chain) = q.pop_descriptor_chain(&active.mem) else {
            break;
        };
        let head = chain.head_index();
        if let Ok(mut r) = Reader::new(&active.mem, chain) {
            let n = r.available_bytes().min(MAX_CHAIN);
            let mut buf = vec![0u8; n];
            // A descriptor the device may not read makes the chain fail
            // alone: its bytes are dropped.
            if r.read_exact(&mut buf).is_ok() {
                port.to_host.extend(buf);
            }
        }
        // Hand the bytes on before the guest sees the buffer used, so a
        // guest that writes and then stops the VM loses nothing.
        flush_to_host(port);
        if q.add_used(&active.mem, head, 0).is_err() {
            break;
        }
        if let Some(u) = active.used.get_mut(tx) {
            *u = true;
        }
    }
}

/// Fills the guest's rx buffers on queue `rx` from the port's host input;
/// returns how many bytes moved.
fn host_to_guest(active: &mut Active, rx: usize, port: &mut Port) -> usize {
    if !port.guest_open {
        return 0;
    }
    let Some(q) = active.queues.get_mut(rx) else {
        return 0;
    };
    if !q.ready() {
        return 0;
    }
    let mut total = 0;
    while !port.from_host.is_empty() {
        let Some(chain) = q.pop_descriptor_chain(&active.mem) else {
            break;
        };
        let head = chain.head_index();
        let mut written = 0;
        if let Ok(mut w) = Writer::new(&active.mem, chain) {
            let n = w.available_bytes().min(port.from_host.len());
            let data: Vec<u8> = port.from_host.iter().take(n).copied().collect();
            if w.write_all(&data).is_ok() {
                port.from_host.drain(..n);
                written = n;
            }
        }
        total += written;
        if q.add_used(&active.mem, head, written as u32).is_err() {
            break;
        }
        if let Some(u) = active.used.get_mut(rx) {
            *u = true;
        }
    }
    total
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        if self.ports.len() > 1 {
            VIRTIO_F_VERSION_1 | F_MULTIPORT
        } else {
            VIRTIO_F_VERSION_1
        }
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows (u16 each), max_nr_ports (u32), emerg_wr (u32).
        let mut config = [0u8; 12];
        config[4..8].copy_from_slice(&(self.ports.len() as u32).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<IrqLine>,
    ) -> Result<(), ActivateError> {
        let expected = if self.multiport() {
            self.queue_sizes.len()
        } else {
            2
        };
        if queues.len() < expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        for (i, q) in queues.iter().enumerate().take(expected) {
            // Unused queues stay not ready; those in use must be sound.
            if q.ready() && !q.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        let multiport = self.multiport();
        for (i, p) in self.ports.iter_mut().enumerate() {
            // Without MULTIPORT port 0 is the only one and always open.
            p.guest_open = !multiport && i == 0;
        }
        let used = vec![false; queues.len()];
        self.active = Some(Active {
            mem,
            queues,
            irq,
            used,
        });
        self.pump();
        Ok(())
    }

    fn queue_notify(&mut self, _index: u32) {
        self.pump();
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.pending_control.clear();
        for p in &mut self.ports {
            p.guest_open = false;
            p.told_eof = false;
        }
    }

    fn host_interest(&self) -> Vec<HostInterest> {
        self.interest()
    }

    fn host_ready(&mut self) {
        self.pump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::tests::{add_chain, memory};
    use std::os::unix::net::UnixStream;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const BUF: u64 = 0x10_0000;

    /// A device with `ports` ports, each connected to a socket whose other
    /// end is returned, activated with the given features.
    struct Rig {
        mem: &'static GuestMemoryMmap,
        vqs: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
        console: Console,
        irq: Arc<IrqLine>,
        hosts: Vec<UnixStream>,
        next_desc: Vec<u16>,
        next_used: Vec<u16>,
    }

    impl Rig {
        fn new(ports: usize, multiport: bool) -> Rig {
            let mem: &'static GuestMemoryMmap = Box::leak(Box::new(memory()));
            let mut hosts = Vec::new();
            let configs = (0..ports)
                .map(|i| {
                    let (a, b) = UnixStream::pair().expect("pair");
                    hosts.push(b);
                    PortConfig {
                        name: if i == 1 {
                            "kiln.agent".into()
                        } else {
                            String::new()
                        },
                        console: i == 0,
                        host: Some(OwnedFd::from(a)),
                    }
                })
                .collect();
            let mut console = Console::new(configs).expect("console");
            let n = console.queue_max_sizes().len();
            // Rings one after another, 64 KiB apart, above the data buffers.
            let vqs: Vec<_> = (0..n)
                .map(|i| {
                    MockSplitQueue::create(mem, GuestAddress(0x80_0000 + i as u64 * 0x1_0000), 16)
                })
                .collect();
            let features = if multiport {
                VIRTIO_F_VERSION_1 | F_MULTIPORT
            } else {
                VIRTIO_F_VERSION_1
            };
            console.ack_features(features);
            let irq = Arc::new(IrqLine::new().expect("irq"));
            let queues = vqs
                .iter()
                .map(|vq| vq.create_queue().expect("queue"))
                .collect();
            console
                .activate(mem.clone(), queues, irq.clone())
                .expect("activate");
            Rig {
                mem,
                vqs,
                console,
                irq,
                hosts,
                next_desc: vec![0; n],
                next_used: vec![0; n],
            }
        }

        fn add(&mut self, q: usize, descs: &[(u64, u32, bool)]) {
            add_chain(&self.vqs[q], self.next_desc[q], descs);
            self.next_desc[q] += descs.len() as u16;
            self.console.queue_notify(q as u32);
        }

        /// The used entries of queue `q` not seen yet, as (id, len).
        fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
            let vq = &self.vqs[q];
            let idx = vq.used().idx().load();
            let mut out = Vec::new();
            while self.next_used[q] != idx {
                let e = vq
                    .used()
                    .ring()
                    .ref_at(usize::from(self.next_used[q] % 16))
                    .expect("used")
                    .load();
                out.push((e.id(), e.len()));
                self.next_used[q] += 1;
            }
            out
        }

        fn put(&self, addr: u64, data: &[u8]) {
            self.mem
                .write_slice(data, GuestAddress(addr))
                .expect("write");
        }

        fn get(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.mem
                .read_slice(&mut v, GuestAddress(addr))
                .expect("read");
            v
        }

        fn host_read(&mut self, port: usize) -> Vec<u8> {
            let h = &mut self.hosts[port];
            h.set_nonblocking(true).expect("nonblocking");
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = h.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            out
        }

        /// Sends a control message from the driver.
        fn control(&mut self, id: u32, ev: u16, value: u16) {
            let at = 0x70_0000 + u64::from(self.next_desc[3]) * 16;
            self.put(
                at,
                &Control {
                    id,
                    event: ev,
                    value,
                }
                .to_bytes(),
            );
            self.add(3, &[(at, 8, false)]);
        }

        /// Gives the device control rx buffers and returns the messages
        /// it wrote into them.
        fn control_messages(&mut self, buffers: usize) -> Vec<(Control, Vec<u8>)> {
            let base = 0x60_0000 + u64::from(self.next_desc[2]) * 0x100;
            for i in 0..buffers {
                self.add(2, &[(base + i as u64 * 0x100, 0x100, true)]);
            }
            let used = self.used(2);
            used.iter()
                .filter(|(_, len)| *len > 0)
                .map(|&(id, len)| {
                    let addr = 0x60_0000 + u64::from(id as u16) * 0x100;
                    let b = self.get(addr, len as usize);
                    let c = Control::from_bytes(b[..8].try_into().expect("8 bytes"));
                    (c, b[8..].to_vec())
                })
                .collect()
        }
    }

    #[test]
    fn guest_output_reaches_the_host_in_order_across_chains() {
        let mut r = Rig::new(1, false);
        r.put(BUF, b"hello, ");
        r.put(BUF + 0x1000, b"host");
        r.put(BUF + 0x2000, b"!\n");
        // One single-descriptor chain and one chained over two descriptors.
        r.add(1, &[(BUF, 7, false)]);
        r.add(1, &[(BUF + 0x1000, 4, false), (BUF + 0x2000, 2, false)]);
        assert_eq!(r.host_read(0), b"hello, host!\n");
        assert_eq!(r.used(1), vec![(0, 0), (1, 0)]);
        assert_ne!(r.irq.status() & INT_VRING, 0);
    }

    #[test]
    fn host_input_waits_for_rx_buffers_and_splits_across_them() {
        let mut r = Rig::new(1, false);
        r.hosts[0].write_all(b"0123456789").expect("host write");
        r.console.host_ready();
        // No rx buffers yet: nothing used, nothing lost.
        assert!(r.used(0).is_empty());
        r.add(0, &[(BUF, 4, true)]);
        r.add(0, &[(BUF + 0x1000, 3, true), (BUF + 0x2000, 16, true)]);
        assert_eq!(r.used(0), vec![(0, 4), (1, 6)]);
        assert_eq!(r.get(BUF, 4), b"0123");
        assert_eq!(r.get(BUF + 0x1000, 3), b"456");
        assert_eq!(r.get(BUF + 0x2000, 3), b"789");
    }

    #[test]
    fn host_input_is_bounded_while_the_guest_reads_nothing() {
        let mut r = Rig::new(1, false);
        r.hosts[0].set_nonblocking(true).expect("nonblocking");
        let chunk = vec![0x41u8; 16 * 1024];
        let mut sent = 0;
        // Fill the socket and the device until the host side blocks.
        for _ in 0..64 {
            r.console.host_ready();
            match r.hosts[0].write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        r.console.host_ready();
        assert!(sent > BUFFER_LIMIT, "the socket took only {sent} bytes");
        assert_eq!(r.console.ports[0].from_host.len(), BUFFER_LIMIT);
        let i = &r.console.interest()[0];
        assert!(!i.read, "a full buffer must stop reading the host side");
        // A guest buffer frees room, and reading resumes.
        r.add(0, &[(BUF, 0x1000, true)]);
        assert_eq!(r.used(0), vec![(0, 0x1000)]);
        assert_eq!(r.console.ports[0].from_host.len(), BUFFER_LIMIT);
    }

    #[test]
    fn malformed_chains_fail_alone() {
        let mut r = Rig::new(1, false);
        r.put(BUF, b"ok");
        // tx: a descriptor outside guest memory, then a device-writable one
        // (which a tx chain must not have), then a good one.
        r.add(1, &[(0xFFFF_FFFF_0000, 8, false)]);
        r.add(1, &[(BUF + 0x1000, 8, true)]);
        r.add(1, &[(BUF, 2, false)]);
        assert_eq!(r.host_read(0), b"ok");
        assert_eq!(r.used(1).len(), 3);
        // rx: a read-only buffer gets nothing; the data goes to the next.
        r.hosts[0].write_all(b"xy").expect("write");
        r.add(0, &[(BUF, 8, false)]);
        r.add(0, &[(BUF + 0x1000, 8, true)]);
        assert_eq!(r.used(0), vec![(0, 0), (1, 2)]);
        assert_eq!(r.get(BUF + 0x1000, 2), b"xy");
    }

    #[test]
    fn multiport_announces_and_names_the_ports() {
        let mut r = Rig::new(2, true);
        let mut cfg = [0u8; 4];
        r.console.read_config(4, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg), 2, "max_nr_ports");
        assert_eq!(r.console.queue_max_sizes().len(), 6);

        r.control(0, event::DEVICE_READY, 1);
        let msgs = r.control_messages(4);
        let adds: Vec<_> = msgs.iter().map(|(c, _)| (c.id, c.event)).collect();
        assert_eq!(adds, vec![(0, event::DEVICE_ADD), (1, event::DEVICE_ADD)]);

        r.control(0, event::PORT_READY, 1);
        r.control(1, event::PORT_READY, 1);
        let msgs = r.control_messages(8);
        let got: Vec<_> = msgs
            .iter()
            .map(|(c, p)| (c.id, c.event, c.value, p.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, event::CONSOLE_PORT, 1, vec![]),
                (0, event::PORT_OPEN, 1, vec![]),
                (1, event::PORT_NAME, 1, b"kiln.agent".to_vec()),
                (1, event::PORT_OPEN, 1, vec![]),
            ]
        );
    }

    #[test]
    fn multiport_holds_host_data_until_the_guest_opens_the_port() {
        let mut r = Rig::new(2, true);
        r.hosts[1].write_all(b"frame").expect("write");
        r.add(4, &[(BUF, 64, true)]);
        assert!(r.used(4).is_empty(), "delivered to a closed port");
        r.control(1, event::PORT_OPEN, 1);
        assert_eq!(r.used(4), vec![(0, 5)]);
        assert_eq!(r.get(BUF, 5), b"frame");
        // Port 1's tx queue is queue 5; port 0's output does not mix in.
        r.put(BUF + 0x1000, b"reply");
        r.add(5, &[(BUF + 0x1000, 5, false)]);
        assert_eq!(r.host_read(1), b"reply");
        assert!(r.host_read(0).is_empty());
    }

    #[test]
    fn host_hangup_closes_the_port_for_the_guest() {
        let mut r = Rig::new(2, true);
        r.control(1, event::PORT_OPEN, 1);
        r.hosts.remove(1);
        r.console.host_ready();
        let msgs = r.control_messages(2);
        assert_eq!(
            msgs.iter()
                .map(|(c, _)| (c.id, c.event, c.value))
                .collect::<Vec<_>>(),
            vec![(1, event::PORT_OPEN, 0)]
        );
    }

    #[test]
    fn bad_control_messages_are_ignored() {
        let mut r = Rig::new(2, true);
        // A control rx buffer too small for the message is returned empty
        // and the message waits for the next one.
        r.control(1, event::PORT_READY, 1);
        r.add(2, &[(0x60_0000, 4, true)]);
        assert_eq!(r.used(2), vec![(0, 0)]);
        let msgs = r.control_messages(2);
        assert_eq!(msgs[0].0.event, event::PORT_NAME);
        assert_eq!(msgs[0].1, b"kiln.agent");
        assert_eq!(msgs[1].0.event, event::PORT_OPEN);
        // Unknown port, unknown event, short message: used, no answer.
        let before = r.next_desc[3];
        r.control(7, event::PORT_READY, 1);
        r.control(0, 99, 1);
        r.put(0x70_f000, &[1, 2]);
        r.add(3, &[(0x70_f000, 2, false)]);
        assert_eq!(r.next_desc[3] - before, 3);
        assert!(r.control_messages(2).is_empty());
    }

    #[test]
    fn guest_output_stops_being_taken_when_the_host_does_not_read() {
        let mut r = Rig::new(1, false);
        let data = vec![0x42u8; 0x8000];
        r.put(BUF, &data);
        let mut taken = 0;
        for _ in 0..16 {
            r.add(1, &[(BUF, 0x8000, false)]);
            taken += r.used(1).len();
        }
        assert!(taken < 16, "the device took everything ({taken} chains)");
        assert!(r.console.interest()[0].write);
        // Once the host reads, the rest flows.
        let mut got = r.host_read(0).len();
        for _ in 0..64 {
            r.console.host_ready();
            got += r.host_read(0).len();
        }
        assert_eq!(r.used(1).len(), 16 - taken);
        assert_eq!(got, 16 * 0x8000);
    }
}
